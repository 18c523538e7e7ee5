//! The agent's fd holder: a small process that keeps a copy of every incoming session the
//! agent retrieved, and of the files a failed restore left with it, so that an agent killed
//! after the kexec and started again gets them back. A session is retrieved once per boot and
//! closing its last fd ends it: with the agent the only holder, the agent's death would lose
//! every VM whose restore had failed. systemd's fd store does this job on hosts that have it;
//! this is for hosts without. The holder serves the agent's user alone (its socket is 0600),
//! and exits when the agent says every VM of the update is restored or released.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::agent::server::{bind_socket, AgentError};
use crate::agent::wire::{recv_line, send_line, KeptFiles, Reply, MAX_REPLY, MAX_REQUEST};

/// How long a request to the holder may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new holder has to come up.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// The holder's socket, beside the agent's.
pub fn holder_socket(agent_socket: &Path) -> PathBuf {
    agent_socket.with_extension("holder")
}

/// What the agent asks of its holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum HoldRequest {
    /// Keep the attached fds, and `note`, under `name` (replacing what was there).
    Put { name: String, note: String },
    /// A copy of what is kept under `name`: its note in the reply's `kept`, its fds attached.
    Take { name: String },
    /// Close what is kept under `name`.
    Release { name: String },
    /// Every VM is restored or released: close everything and exit.
    Done {},
}

/// Serves the holder on `socket` until the agent says it is done.
pub fn hold(socket: &Path) -> Result<(), AgentError> {
    let listener = bind_socket(socket)?;
    log::info!("agent holder: serving {}", socket.display());
    let mut held: BTreeMap<String, KeptFiles> = BTreeMap::new();
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("agent holder: accept: {e}");
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let request = match recv_line(&stream, MAX_REQUEST) {
            Ok((line, fds)) => serde_json::from_slice::<HoldRequest>(&line)
                .map(|request| (request, fds))
                .map_err(|e| format!("bad request: {e}")),
            // A connection closed at once: someone looking whether a holder answers here.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => continue,
            Err(e) => Err(format!("cannot read the request: {e}")),
        };
        let done = matches!(request, Ok((HoldRequest::Done {}, _)));
        let (reply, fds) = match request {
            Ok((request, fds)) => serve(&mut held, request, fds),
            Err(message) => (Reply::error(message), Vec::new()),
        };
        let refs: Vec<&OwnedFd> = fds.iter().collect();
        if let Err(e) = send_line(&stream, &reply, &refs) {
            log::warn!("agent holder: cannot reply: {e}");
        }
        if done {
            log::info!("agent holder: every VM is restored or released; exiting");
            let _ = std::fs::remove_file(socket);
            return Ok(());
        }
    }
}

fn serve(
    held: &mut BTreeMap<String, KeptFiles>,
    request: HoldRequest,
    fds: Vec<OwnedFd>,
) -> (Reply, Vec<OwnedFd>) {
    match request {
        HoldRequest::Put { name, note } => {
            log::info!("agent holder: keeps {name} ({} fds)", fds.len());
            held.insert(name, KeptFiles { note, fds });
            (Reply::ok(), Vec::new())
        }
        HoldRequest::Take { name } => {
            let Some(kept) = held.get(&name) else {
                return (Reply::ok(), Vec::new());
            };
            match kept.try_clone() {
                Ok(copy) => copy.into_reply(),
                Err(e) => (
                    Reply::error(format!("cannot copy {name}'s fds: {e}")),
                    Vec::new(),
                ),
            }
        }
        HoldRequest::Release { name } => {
            if held.remove(&name).is_some() {
                log::info!("agent holder: let go of {name}");
            }
            (Reply::ok(), Vec::new())
        }
        HoldRequest::Done {} => {
            held.clear();
            (Reply::ok(), Vec::new())
        }
    }
}

/// The agent's end of its holder.
pub struct Holder {
    socket: PathBuf,
}

impl Holder {
    /// The holder on `socket`; if none answers there, `command` is started (detached, in a
    /// process group of its own, so that it outlives the agent) to serve it, and waited for.
    pub fn ensure(socket: &Path, mut command: Command) -> std::io::Result<Holder> {
        let holder = Holder {
            socket: socket.to_path_buf(),
        };
        if UnixStream::connect(socket).is_ok() {
            return Ok(holder);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        let started = Instant::now();
        while UnixStream::connect(socket).is_err() {
            if started.elapsed() > START_TIMEOUT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no holder answered on {} in time", socket.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(holder)
    }

    fn call(
        &self,
        request: &HoldRequest,
        fds: &[&OwnedFd],
    ) -> std::io::Result<(Reply, Vec<OwnedFd>)> {
        let stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        send_line(&stream, request, fds)?;
        let (line, fds) = recv_line(&stream, MAX_REPLY)?;
        let reply: Reply = serde_json::from_slice(&line).map_err(std::io::Error::other)?;
        match reply.ok {
            true => Ok((reply, fds)),
            false => Err(std::io::Error::other(reply.error.unwrap_or_default())),
        }
    }

    /// Leaves a copy of `fds`, with `note`, under `name`.
    pub fn put(&self, name: &str, note: &str, fds: &[&OwnedFd]) -> std::io::Result<()> {
        let request = HoldRequest::Put {
            name: name.into(),
            note: note.into(),
        };
        self.call(&request, fds).map(drop)
    }

    /// What is kept under `name`, if anything: its note and a copy of its fds.
    pub fn take(&self, name: &str) -> std::io::Result<Option<KeptFiles>> {
        let (reply, fds) = self.call(&HoldRequest::Take { name: name.into() }, &[])?;
        Ok(reply.kept.map(|note| KeptFiles { note, fds }))
    }

    /// Lets go of what is kept under `name`.
    pub fn release(&self, name: &str) -> std::io::Result<()> {
        self.call(&HoldRequest::Release { name: name.into() }, &[])
            .map(drop)
    }

    /// Ends the holder: every VM is restored or released.
    pub fn done(self) -> std::io::Result<()> {
        self.call(&HoldRequest::Done {}, &[]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use nix::sys::memfd::{memfd_create, MFdFlags};

    use super::*;

    #[test]
    fn the_holder_gives_back_what_it_keeps_and_exits_when_told() {
        let dir = std::env::temp_dir().join(format!("luvmm-holder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.holder");
        let serving = {
            let socket = socket.clone();
            std::thread::spawn(move || hold(&socket))
        };
        while UnixStream::connect(&socket).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let holder = Holder {
            socket: socket.clone(),
        };
        let session = memfd_create("session", MFdFlags::MFD_CLOEXEC).unwrap();
        let inode = |fd: &OwnedFd| {
            std::fs::File::from(fd.try_clone().unwrap())
                .metadata()
                .unwrap()
                .ino()
        };
        holder.put("session/vm1", "", &[&session]).unwrap();
        holder
            .put("kept/vm1", "{\"ioas_id\":1}", &[&session, &session])
            .unwrap();
        assert!(holder.take("session/vm2").unwrap().is_none());
        let kept = holder.take("kept/vm1").unwrap().unwrap();
        assert_eq!(kept.note, "{\"ioas_id\":1}");
        assert_eq!(kept.fds.len(), 2);
        assert_eq!(inode(&kept.fds[0]), inode(&session));
        // A copy taken leaves the holder's own in place.
        assert_eq!(holder.take("session/vm1").unwrap().unwrap().fds.len(), 1);
        holder.release("kept/vm1").unwrap();
        assert!(holder.take("kept/vm1").unwrap().is_none());
        // A connection that closes at once (a probe) is no request.
        drop(UnixStream::connect(&socket).unwrap());
        holder.release("session/vm1").unwrap();
        assert!(holder.take("session/vm1").unwrap().is_none());
        holder.done().unwrap();
        serving.join().unwrap().unwrap();
        assert!(!socket.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
