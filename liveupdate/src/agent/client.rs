//! What a VMM (or an operator's tool) calls to talk to the agent.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::ledger::Ledger;
use crate::agent::wire::{recv_line, send_line, KeptFiles, Reply, Request, MAX_REPLY};
use crate::luo::probe::HandlerStatus;
use crate::luo::{IncomingSession, OutgoingSession, SessionName};

/// How long a client waits for the agent's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("no luvmm agent is listening on {socket} (start one with `luvmm agent serve`)")]
    NotRunning { socket: PathBuf },
    #[error("talking to the agent on {socket}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent refused {op}: {message}")]
    Refused { op: &'static str, message: String },
    #[error("the agent's reply to {op} does not parse: {reason}")]
    BadReply { op: &'static str, reason: String },
    /// On a host whose systemd holds the sessions, its fd store stands in for the agent.
    #[error("systemd's fd store")]
    FdStore(#[source] Box<crate::fdstore::FdStoreError>),
}

/// The agent behind a socket.
pub struct AgentClient {
    socket: PathBuf,
}

impl AgentClient {
    pub fn new(socket: &Path) -> AgentClient {
        AgentClient {
            socket: socket.to_path_buf(),
        }
    }

    fn call(
        &self,
        op: &'static str,
        request: &Request,
    ) -> Result<(Reply, Vec<OwnedFd>), AgentClientError> {
        self.call_with(op, request, &[])
    }

    fn call_with(
        &self,
        op: &'static str,
        request: &Request,
        fds: &[&OwnedFd],
    ) -> Result<(Reply, Vec<OwnedFd>), AgentClientError> {
        self.exchange(op, request, fds)
            .map(|(_, reply, fds)| (reply, fds))
    }

    /// One request and its reply, on a connection left open for whatever follows.
    fn exchange(
        &self,
        op: &'static str,
        request: &Request,
        fds: &[&OwnedFd],
    ) -> Result<(UnixStream, Reply, Vec<OwnedFd>), AgentClientError> {
        let io = |source| AgentClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                AgentClientError::NotRunning {
                    socket: self.socket.clone(),
                }
            }
            _ => io(e),
        })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        send_line(&stream, request, fds).map_err(io)?;
        let (line, fds) = recv_line(&stream, MAX_REPLY).map_err(io)?;
        let reply: Reply =
            serde_json::from_slice(&line).map_err(|e| AgentClientError::BadReply {
                op,
                reason: e.to_string(),
            })?;
        if !reply.ok {
            return Err(AgentClientError::Refused {
                op,
                message: reply.error.unwrap_or_default(),
            });
        }
        Ok((stream, reply, fds))
    }

    /// The session fd a reply must carry, with its name.
    fn session_fd(
        op: &'static str,
        reply: Reply,
        fds: Vec<OwnedFd>,
    ) -> Result<(OwnedFd, SessionName), AgentClientError> {
        let bad = |reason: &str| AgentClientError::BadReply {
            op,
            reason: reason.to_string(),
        };
        let name = reply.session.ok_or_else(|| bad("no session name"))?;
        let name = SessionName::new(&name).map_err(|e| bad(&e.to_string()))?;
        let mut fds = fds.into_iter();
        match (fds.next(), fds.next()) {
            (Some(fd), None) => Ok((fd, name)),
            _ => Err(bad("not exactly one session fd")),
        }
    }

    /// Subscribes VM `vm`: its new outgoing session (the agent keeps a copy until the kexec),
    /// with what its restore needs again (`launch`, kept in the ledger).
    pub fn subscribe(
        &self,
        vm: &str,
        launch: Option<&serde_json::Value>,
    ) -> Result<OutgoingSession, AgentClientError> {
        let op = "subscribe";
        let request = Request::Subscribe {
            vm: vm.into(),
            launch: launch.cloned(),
        };
        let (reply, fds) = self.call(op, &request)?;
        let (fd, name) = Self::session_fd(op, reply, fds)?;
        Ok(OutgoingSession::from_fd(fd, name))
    }

    /// Tells the agent VM `vm` has preserved everything and is paused, and which host
    /// devices it needs after the kexec.
    pub fn ready(&self, vm: &str, devices: &[String]) -> Result<(), AgentClientError> {
        let request = Request::Ready {
            vm: vm.into(),
            devices: devices.to_vec(),
        };
        self.call("ready", &request).map(drop)
    }

    /// Calls VM `vm`'s update off: the agent closes its copy of the session.
    pub fn release(&self, vm: &str) -> Result<(), AgentClientError> {
        self.call("release", &Request::Release { vm: vm.into() })
            .map(drop)
    }

    /// Tells the agent VM `vm` is restored and its session finished, so that it may take
    /// part in the next update.
    pub fn finished(&self, vm: &str) -> Result<(), AgentClientError> {
        self.call("finished", &Request::Finished { vm: vm.into() })
            .map(drop)
    }

    /// Tells the agent the restore that claimed VM `vm` (this process) failed, for `reason`:
    /// the agent keeps the session for the next restore, and its ledger says why.
    pub fn failed(&self, vm: &str, reason: &str) -> Result<(), AgentClientError> {
        let request = Request::Failed {
            vm: vm.into(),
            reason: reason.into(),
        };
        self.call("failed", &request).map(drop)
    }

    /// Leaves `fds` and `note` with the agent for the next restore of VM `vm`, should this one
    /// (which holds the claim) fail; they replace what was left before.
    pub fn keep(&self, vm: &str, note: &str, fds: &[&OwnedFd]) -> Result<(), AgentClientError> {
        let request = Request::Keep {
            vm: vm.into(),
            note: note.into(),
        };
        self.call_with("keep", &request, fds).map(drop)
    }

    /// What earlier restores of VM `vm` left with the agent; asked by the claimant.
    pub fn kept(&self, vm: &str) -> Result<Option<KeptFiles>, AgentClientError> {
        let (reply, fds) = self.call("kept", &Request::Kept { vm: vm.into() })?;
        Ok(reply.kept.map(|note| KeptFiles { note, fds }))
    }

    /// Asks to be told of each change of VM `vm`'s record (see [`AgentWatch`]).
    pub fn watch(&self, vm: &str) -> Result<AgentWatch, AgentClientError> {
        let op = "watch";
        let (stream, _, _) = self.exchange(op, &Request::Watch { vm: vm.into() }, &[])?;
        stream
            .set_nonblocking(true)
            .map_err(|source| AgentClientError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        Ok(AgentWatch {
            stream,
            pending: Vec::new(),
        })
    }

    /// The agent's ledger.
    pub fn status(&self) -> Result<Ledger, AgentClientError> {
        self.ledger_of(None)
    }

    /// The agent's ledger with only VM `vm`'s record.
    pub fn status_of(&self, vm: &str) -> Result<Ledger, AgentClientError> {
        self.ledger_of(Some(vm))
    }

    fn ledger_of(&self, vm: Option<&str>) -> Result<Ledger, AgentClientError> {
        let op = "status";
        let request = Request::Status {
            vm: vm.map(str::to_string),
        };
        let (reply, _) = self.call(op, &request)?;
        reply.ledger.ok_or_else(|| AgentClientError::BadReply {
            op,
            reason: "no ledger".into(),
        })
    }

    /// Asks for the kexec into `kernel`: at once, refused unless every VM is ready; or, with
    /// `deadline`, as soon as every VM is ready within it, after which the agent calls the
    /// update off for everyone. On success without a deadline the host is on its way into
    /// the next kernel.
    pub fn update(
        &self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: Option<&str>,
        deadline: Option<Duration>,
    ) -> Result<(), AgentClientError> {
        let request = Request::Update {
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            cmdline: cmdline.map(str::to_string),
            deadline_s: deadline.map(|d| d.as_secs().max(1)),
        };
        self.call("update", &request).map(drop)
    }

    /// Whether this kernel can preserve a memfd and each of `fds`: the memfd handler's status,
    /// then one per fd. Nothing stays preserved.
    pub fn probe(&self, fds: &[&OwnedFd]) -> Result<Vec<HandlerStatus>, AgentClientError> {
        let op = "probe";
        let (reply, _) = self.call_with(op, &Request::Probe {}, fds)?;
        match reply.handlers {
            Some(handlers) if handlers.len() == fds.len() + 1 => Ok(handlers),
            other => Err(AgentClientError::BadReply {
                op,
                reason: format!("{other:?}"),
            }),
        }
    }

    /// After the kexec: VM `vm`'s incoming session, handed out once.
    pub fn claim(&self, vm: &str) -> Result<IncomingSession, AgentClientError> {
        let op = "claim";
        let (reply, fds) = self.call(op, &Request::Claim { vm: vm.into() })?;
        let (fd, name) = Self::session_fd(op, reply, fds)?;
        Ok(IncomingSession::from_fd(fd, name))
    }
}

/// A connection on which the agent tells of each change of one VM's record.
pub struct AgentWatch {
    stream: UnixStream,
    /// Bytes of a line not whole yet.
    pending: Vec<u8>,
}

impl AgentWatch {
    /// What the agent told since the last call, without waiting: the VM's latest record (a
    /// ledger with that VM only, empty once it left), or `None` when nothing new came. An
    /// error when the connection ended (the VM's update is over, or the agent went away)
    /// or the agent sent something that does not parse.
    pub fn told(&mut self) -> std::io::Result<Option<Ledger>> {
        let mut chunk = [0u8; 16 * 1024];
        let mut latest = None;
        loop {
            match std::io::Read::read(&mut self.stream, &mut chunk) {
                Ok(0) if latest.is_some() => return Ok(latest),
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(latest),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let reply: Reply = serde_json::from_slice(&line[..end])
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                latest = reply.ledger.or(latest);
            }
            if self.pending.len() > MAX_REPLY {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a line longer than the agent may send",
                ));
            }
        }
    }
}
