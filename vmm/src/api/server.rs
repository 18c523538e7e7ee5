//! The API socket as an event-manager subscriber.
//!
//! Every connection is read as its bytes arrive, and its request is answered as soon as it is
//! whole, one at a time: a client that connects and says nothing holds up nobody, and gets 408
//! `READ_TIMEOUT` after it connected. Each connection carries one request and is closed after
//! the reply, which may carry fds (`SCM_RIGHTS`) for a handover; a second request on the same
//! connection is refused with its own reply, a request cut short by a half-close is answered
//! with what was missing.

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

use super::http::{cut_short, parse_request, HttpError, Response};
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

/// How long a client has, from its connection, to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Most connections waiting for their reply at once; more get 503 at once.
const MAX_WAITING: usize = 16;

/// Serves the control API for one VMM.
pub struct ApiServer {
    socket: ApiSocket,
    /// Connections whose request is not whole yet, in arrival order.
    clients: Vec<Client>,
    /// Fires at the earliest client's deadline.
    timer: TimerFd,
    /// Pidfds of handover targets being watched (the VMM holds them).
    targets: Vec<RawFd>,
    vmm: Arc<Mutex<Vmm>>,
}

struct Client {
    stream: UnixStream,
    received: Vec<u8>,
    /// When it must have sent its whole request.
    deadline: Instant,
}

/// What a client's bytes so far make.
enum Reading {
    /// Not a whole request yet.
    More,
    /// The client went away without a byte.
    Gone,
    /// A whole request, and whether more bytes came after it.
    Request(super::http::Request, bool),
    /// Not a request: the reply says why.
    Refused(Response),
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
            clients: Vec::new(),
            timer,
            targets: Vec::new(),
            vmm,
        })
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.socket.listener.accept() {
                Ok((stream, _)) => self.admit(stream, ops),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("api: accept failed: {e}");
                    break;
                }
            }
        }
        self.arm_timer();
    }

    /// Watches a new client, or turns it away when too many wait.
    fn admit(&mut self, stream: UnixStream, ops: &mut EventOps) {
        if self.clients.len() >= MAX_WAITING {
            log::warn!("api: {MAX_WAITING} clients waiting; turning a new one away");
            let busy = Response::error(503, "too many API clients waiting; retry");
            send_reply(&stream, &busy.into());
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("api: cannot set up a client: {e}");
            return;
        }
        if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
            log::warn!("api: cannot watch a client: {e:?}");
            return;
        }
        self.clients.push(Client {
            stream,
            received: Vec::new(),
            deadline: Instant::now() + READ_TIMEOUT,
        });
    }

    /// Sets the timer to the earliest deadline, or off when no client waits.
    fn arm_timer(&mut self) {
        let armed = match self.clients.iter().map(|c| c.deadline).min() {
            Some(deadline) => self.timer.set(
                Expiration::OneShot(TimeSpec::from_duration(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                )),
                TimerSetTimeFlags::empty(),
            ),
            None => self.timer.unset(),
        };
        if let Err(e) = armed {
            log::warn!("api: cannot set the read timer: {e}");
        }
    }

    /// Stops watching client `index`, for its answer; the timer moves to the next deadline.
    fn take(&mut self, index: usize, ops: &mut EventOps) -> Client {
        let client = self.clients.remove(index);
        let _ = ops.remove(Events::empty(&client.stream));
        self.arm_timer();
        client
    }

    /// Reads what client `index` sent; once its request is whole (or broken), answers it.
    fn serve(&mut self, index: usize, ops: &mut EventOps) {
        let reading = read_request(&mut self.clients[index]);
        if matches!(reading, Reading::More) {
            return;
        }
        let mut client = self.take(index, ops);
        let replies: Vec<Reply> = match reading {
            Reading::More | Reading::Gone => Vec::new(),
            Reading::Refused(response) => vec![response.into()],
            Reading::Request(req, more) => {
                let reply = self.handle(req, &client.stream, ops);
                let mut replies = vec![reply];
                // What came after the request, before or while it was handled.
                if more || has_more(&mut client.stream) {
                    replies.push(
                        Response::error(
                            400,
                            "one request per connection: what followed the first was not read",
                        )
                        .into(),
                    );
                }
                replies
            }
        };
        for reply in &replies {
            send_reply(&client.stream, reply);
        }
    }

    /// The read timer fired: every client past its deadline gets 408.
    fn check_deadlines(&mut self, ops: &mut EventOps) {
        // The count is not needed; reading it only clears the readiness.
        let _ = self.timer.wait();
        let now = Instant::now();
        while let Some(index) = self.clients.iter().position(|c| c.deadline <= now) {
            log::warn!(
                "api: a client sent no complete request within {} s",
                READ_TIMEOUT.as_secs()
            );
            let timeout = format!("no complete request within {} s", READ_TIMEOUT.as_secs());
            let client = self.take(index, ops);
            send_reply(&client.stream, &Response::error(408, &timeout).into());
        }
    }

    /// Answers `req`; `client` is its connection, watched when it is a handover's target.
    fn handle(
        &mut self,
        req: super::http::Request,
        client: &UnixStream,
        ops: &mut EventOps,
    ) -> Reply {
        let action = match route(&req) {
            Ok(action) => action,
            Err(resp) => return resp.into(),
        };
        log::debug!("api: {} {} -> {action:?}", req.method, req.path);
        let watch = matches!(&action, VmmAction::Handover(body) if body.resume_if_target_exits);
        let completing = matches!(&action, VmmAction::CompleteHandover(_));
        let shared = self.vmm.clone();
        let mut vmm = lock(&shared);
        let reply = dispatch(&mut vmm, action);
        if watch && reply.response.status == 200 {
            self.watch_target(client, &mut vmm, ops);
        }
        if completing && reply.response.status == 204 {
            if let Some(pid) = peer_pid(client) {
                vmm.record_moved_to(pid);
            }
        }
        reply
    }

    /// Watches `client`, the target of the handover just handed out, until it exits. A
    /// target that cannot be watched is only logged: the VM then waits for a `resume`.
    fn watch_target(&mut self, client: &UnixStream, vmm: &mut Vmm, ops: &mut EventOps) {
        let pidfd = peer_pid(client)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))
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
            self.check_deadlines(ops);
        } else if let Some(index) = self.clients.iter().position(|c| c.stream.as_raw_fd() == fd) {
            self.serve(index, ops);
        } else if self.targets.contains(&fd) {
            // The VMM closes the pidfd once it is done with it, which ends its watch.
            self.targets.retain(|&t| t != fd);
            lock(&self.vmm).target_exited(fd);
        }
    }
}

/// Reads what `client` has sent so far and says what it makes.
fn read_request(client: &mut Client) -> Reading {
    let mut chunk = [0u8; 4096];
    loop {
        match client.stream.read(&mut chunk) {
            Ok(0) if client.received.is_empty() => return Reading::Gone,
            // Closed (or half-closed) before the request was whole: say what was missing.
            Ok(0) => return Reading::Refused(refusal(cut_short(&client.received))),
            Ok(n) => client.received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Reading::More,
            Err(_) => return Reading::Gone,
        }
        match parse_request(&client.received) {
            Ok(None) => continue,
            Ok(Some(req)) => {
                let more = client.received.len() > req.wire_len;
                return Reading::Request(req, more);
            }
            Err(e) => return Reading::Refused(refusal(e)),
        }
    }
}

/// The process on the other end of `client`.
fn peer_pid(client: &UnixStream) -> Option<u32> {
    let peer = getsockopt(client, PeerCredentials).ok()?;
    u32::try_from(peer.pid()).ok()
}

/// Whether a client sent more bytes than were read.
fn has_more(stream: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(1))
}

/// The reply to bytes that are not a request.
fn refusal(e: HttpError) -> Response {
    let status = if e == HttpError::TooLarge { 413 } else { 400 };
    Response::error(status, &e.to_string())
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
