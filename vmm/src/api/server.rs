//! The API socket as an event-manager subscriber.
//!
//! Clients are served one at a time, in the order they connected: the first one's request is
//! read and answered while the others wait, unread, in a queue. A client has `READ_TIMEOUT` from
//! its turn to send its whole request, so one that connects and says nothing delays the next
//! by that much, never for ever. Each connection carries one request and is closed after the
//! reply, which may carry fds (`SCM_RIGHTS`) for a handover.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use luvmm_liveupdate::unix::{self, BindError};
use luvmm_resources::sync::lock;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::http::{parse_request, HttpError, Response};
use super::{dispatch, route, Reply, VmmAction};
use crate::outputs::same_file;
use crate::vmm::{open_pidfd, Vmm};

/// The API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiSocketError {
    #[error("API socket {path} already exists (another luvmm, or a stale file to remove)")]
    Exists { path: PathBuf },
    #[error("cannot create API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the API read timer")]
    Timer(#[source] std::io::Error),
    #[error("cannot move API socket {from} to {path}")]
    Place {
        from: PathBuf,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// The API socket's listener, bound before the VM runs so that a path it cannot use fails
/// the start, not a running VM.
pub struct ApiSocket {
    listener: UnixListener,
    /// Where the socket is reachable: its path, or a temporary name beside it until `place`.
    bound_at: PathBuf,
    path: PathBuf,
    /// The socket's inode (device, number): only this socket is ever removed at `bound_at`,
    /// never one another process put there since.
    inode: (u64, u64),
}

impl ApiSocket {
    /// Binds at `path` now, mode 0600, never replacing anything there.
    pub fn bind(path: &Path) -> Result<ApiSocket, ApiSocketError> {
        let listener = unix::bind_owner_only(path).map_err(bind_error)?;
        ApiSocket::new(listener, path.to_path_buf(), path)
    }

    /// Binds beside `path` (`PATH.<pid>.tmp`), mode 0600, for [`ApiSocket::place`] to move
    /// there once the VM is this process's: a target binds before it confirms a handover,
    /// and may take the path of its source's socket only after the source let the VM go.
    pub fn bind_aside(path: &Path) -> Result<ApiSocket, ApiSocketError> {
        let (listener, tmp) = unix::bind_owner_only_aside(path).map_err(bind_error)?;
        ApiSocket::new(listener, tmp, path)
    }

    fn new(
        listener: UnixListener,
        bound_at: PathBuf,
        path: &Path,
    ) -> Result<ApiSocket, ApiSocketError> {
        let inode = match std::fs::symlink_metadata(&bound_at) {
            Ok(meta) => (meta.dev(), meta.ino()),
            Err(source) => {
                let _ = std::fs::remove_file(&bound_at);
                return Err(ApiSocketError::Bind {
                    path: bound_at,
                    source,
                });
            }
        };
        Ok(ApiSocket {
            listener,
            bound_at,
            path: path.to_path_buf(),
            inode,
        })
    }

    /// Moves the socket to its path, which must be free, or hold the socket of `replacing`
    /// (the source a VM was taken over from): anything else there is left alone.
    pub fn place(&mut self, replacing: Option<&Path>) -> Result<(), ApiSocketError> {
        if self.bound_at == self.path {
            return Ok(());
        }
        let flags = if replacing.is_some_and(|source| same_file(&self.path, source)) {
            RenameFlags::empty()
        } else {
            RenameFlags::RENAME_NOREPLACE
        };
        renameat2(AT_FDCWD, &self.bound_at, AT_FDCWD, &self.path, flags).map_err(|source| {
            ApiSocketError::Place {
                from: self.bound_at.clone(),
                path: self.path.clone(),
                source,
            }
        })?;
        self.bound_at = self.path.clone();
        Ok(())
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.bound_at)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.bound_at);
        }
    }
}

fn bind_error(e: BindError) -> ApiSocketError {
    match e {
        BindError::Exists { path } => ApiSocketError::Exists { path },
        BindError::Create { path, source } => ApiSocketError::Bind { path, source },
    }
}

/// How long the client being served has to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Most connections queued at once, the one being served included; more get 503 at once.
const MAX_QUEUED: usize = 16;

/// Serves the control API for one VMM.
pub struct ApiServer {
    socket: ApiSocket,
    /// Connections in arrival order; the front one is being served.
    queue: VecDeque<Client>,
    /// Fires at `deadline`.
    timer: TimerFd,
    /// When the front client must have sent its whole request.
    deadline: Option<Instant>,
    /// Pidfds of handover targets being watched (the VMM holds them).
    targets: Vec<RawFd>,
    vmm: Arc<Mutex<Vmm>>,
}

struct Client {
    stream: UnixStream,
    received: Vec<u8>,
}

impl ApiServer {
    /// Serves the API of `vmm` on `socket`.
    pub fn new(socket: ApiSocket, vmm: Arc<Mutex<Vmm>>) -> Result<ApiServer, ApiSocketError> {
        let nonblocking = socket.listener.set_nonblocking(true);
        nonblocking.map_err(|source| ApiSocketError::Bind {
            path: socket.bound_at.clone(),
            source,
        })?;
        // Non-blocking, so a read after the deadline was reset returns at once.
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| ApiSocketError::Timer(e.into()))?;
        Ok(ApiServer {
            socket,
            queue: VecDeque::new(),
            timer,
            deadline: None,
            targets: Vec::new(),
            vmm,
        })
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.socket.listener.accept() {
                Ok((stream, _)) => self.enqueue(stream, ops),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("api: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn enqueue(&mut self, stream: UnixStream, ops: &mut EventOps) {
        if self.queue.len() >= MAX_QUEUED {
            log::warn!("api: {MAX_QUEUED} connections queued; turning a new one away");
            send_reply(
                &stream,
                &Response::error(503, "too many API clients waiting; retry").into(),
            );
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("api: cannot set up client: {e}");
            return;
        }
        self.queue.push_back(Client {
            stream,
            received: Vec::new(),
        });
        if self.queue.len() == 1 {
            self.start_front(ops);
        }
    }

    /// Gives the front client its turn: watch it, and start its read deadline. A client that
    /// cannot be watched is dropped and the next one gets its turn.
    fn start_front(&mut self, ops: &mut EventOps) {
        self.deadline = None;
        while let Some(client) = self.queue.front() {
            let watched = ops.add(Events::new(&client.stream, EventSet::IN));
            let armed = self.timer.set(
                Expiration::OneShot(TimeSpec::from_duration(READ_TIMEOUT)),
                TimerSetTimeFlags::empty(),
            );
            match (watched, armed) {
                (Ok(()), Ok(())) => {
                    self.deadline = Some(Instant::now() + READ_TIMEOUT);
                    return;
                }
                (watched, armed) => {
                    log::warn!("api: cannot serve a client: {watched:?} {armed:?}");
                    let _ = ops.remove(Events::empty(&client.stream));
                    self.queue.pop_front();
                }
            }
        }
        if let Err(e) = self.timer.unset() {
            log::warn!("api: cannot disarm the read timer: {e}");
        }
    }

    /// Ends the front client's turn with `reply` (none if it went away) and starts the next.
    fn finish_front(&mut self, reply: Option<Reply>, ops: &mut EventOps) {
        if let Some(client) = self.queue.pop_front() {
            let _ = ops.remove(Events::empty(&client.stream));
            if let Some(reply) = reply {
                send_reply(&client.stream, &reply);
            }
        }
        self.start_front(ops);
    }

    /// Reads what the front client sent; once its request is complete (or broken), answers it.
    fn serve_front(&mut self, ops: &mut EventOps) {
        let Some(client) = self.queue.front_mut() else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let request = loop {
            match client.stream.read(&mut chunk) {
                Ok(0) => break None,
                Ok(n) => client.received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
            match parse_request(&client.received) {
                Ok(None) => continue,
                Ok(Some(req)) => break Some(Ok(req)),
                Err(e) => break Some(Err(e)),
            }
        };
        let reply = match request {
            None => None,
            Some(Err(HttpError::TooLarge)) => {
                Some(Response::error(413, &HttpError::TooLarge.to_string()).into())
            }
            Some(Err(e)) => Some(Response::error(400, &e.to_string()).into()),
            Some(Ok(req)) => Some(self.handle(req, ops)),
        };
        self.finish_front(reply, ops);
    }

    /// The read timer fired: a front client past its deadline gets 408 and loses its turn.
    fn check_deadline(&mut self, ops: &mut EventOps) {
        // The count is not needed; reading it only clears the readiness.
        let _ = self.timer.wait();
        let expired = self.deadline.is_some_and(|d| Instant::now() >= d);
        if expired {
            log::warn!(
                "api: a client sent no complete request within {READ_TIMEOUT:?}; serving the next"
            );
            let timeout = format!("no complete request within {READ_TIMEOUT:?}");
            self.finish_front(Some(Response::error(408, &timeout).into()), ops);
        }
    }

    fn handle(&mut self, req: super::http::Request, ops: &mut EventOps) -> Reply {
        let action = match route(&req) {
            Ok(action) => action,
            Err(resp) => return resp.into(),
        };
        log::debug!("api: {} {} -> {action:?}", req.method, req.path);
        let watch = matches!(&action, VmmAction::Handover(body) if body.resume_if_target_exits);
        let shared = self.vmm.clone();
        let mut vmm = lock(&shared);
        let reply = dispatch(&mut vmm, action);
        if watch && reply.response.status == 200 {
            self.watch_target(&mut vmm, ops);
        }
        reply
    }

    /// Watches the front client, the target of the handover just handed out, until it exits.
    /// A target that cannot be watched is only logged: the VM then waits for a `resume`.
    fn watch_target(&mut self, vmm: &mut Vmm, ops: &mut EventOps) {
        let Some(client) = self.queue.front() else {
            return;
        };
        let pidfd = getsockopt(&client.stream, PeerCredentials)
            .map_err(std::io::Error::from)
            .and_then(|peer| {
                u32::try_from(peer.pid())
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))
            })
            .and_then(open_pidfd);
        let watched = match pidfd {
            Ok(pidfd) => vmm.watch_target(pidfd),
            Err(e) => {
                log::warn!("api: cannot watch the handover's target: {e}");
                return;
            }
        };
        if let Some(fd) = watched {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                log::warn!("api: cannot watch the handover's target: {e:?}");
            }
            self.targets.push(fd);
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.socket.listener.as_raw_fd(),
            self.timer.as_fd().as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                log::error!("api: cannot watch fd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.socket.listener.as_raw_fd() {
            self.accept_all(ops);
        } else if fd == self.timer.as_fd().as_raw_fd() {
            self.check_deadline(ops);
        } else if self
            .queue
            .front()
            .is_some_and(|c| c.stream.as_raw_fd() == fd)
        {
            self.serve_front(ops);
        } else if self.targets.contains(&fd) {
            // The VMM closes the pidfd once it is done with it, which ends its watch.
            self.targets.retain(|&t| t != fd);
            lock(&self.vmm).target_exited(fd);
        }
    }
}

/// Writes the reply; fds go with the first bytes. A client that went away is only logged.
fn send_reply(stream: &UnixStream, reply: &Reply) {
    if let Err(e) = stream.set_nonblocking(false) {
        log::warn!("api: {e}");
    }
    if let Err(e) = unix::send_with_fds(stream, &reply.response.to_bytes(), &reply.fds) {
        log::warn!("api: cannot send reply: {e}");
    }
}
