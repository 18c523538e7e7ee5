//! The API socket as an event-manager subscriber.
//!
//! Clients are served one at a time, in the order they connected: the first one's request is
//! read and answered while the others wait, unread, in a queue. A client has `READ_TIMEOUT` from
//! its turn to send its whole request, so one that connects and says nothing delays the next
//! by that much, never for ever. Each connection carries one request and is closed after the
//! reply, which may carry fds (`SCM_RIGHTS`) for a handover.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use luvmm_liveupdate::unix::{self, BindError};
use luvmm_resources::sync::lock;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::http::{parse_request, HttpError, Response};
use super::{dispatch, route, Reply};
use crate::vmm::Vmm;

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
}

/// How long the client being served has to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Most connections queued at once, the one being served included; more get 503 at once.
const MAX_QUEUED: usize = 16;

/// Serves the control API for one VMM.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    /// Connections in arrival order; the front one is being served.
    queue: VecDeque<Client>,
    /// Fires at `deadline`.
    timer: TimerFd,
    /// When the front client must have sent its whole request.
    deadline: Option<Instant>,
    vmm: Arc<Mutex<Vmm>>,
}

struct Client {
    stream: UnixStream,
    received: Vec<u8>,
}

impl ApiServer {
    /// Creates the socket with mode 0600, never reachable with wider permissions.
    pub fn bind(path: &Path, vmm: Arc<Mutex<Vmm>>) -> Result<ApiServer, ApiSocketError> {
        let listener = unix::bind_owner_only(path).map_err(|e| match e {
            BindError::Exists { path } => ApiSocketError::Exists { path },
            BindError::Create { path, source } => ApiSocketError::Bind { path, source },
        })?;
        if let Err(source) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(path);
            return Err(ApiSocketError::Bind {
                path: path.to_path_buf(),
                source,
            });
        }
        // Non-blocking, so a read after the deadline was reset returns at once.
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| ApiSocketError::Timer(e.into()))?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            listener,
            queue: VecDeque::new(),
            timer,
            deadline: None,
            vmm,
        })
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
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
            Some(Ok(req)) => Some(self.handle(req)),
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

    fn handle(&self, req: super::http::Request) -> Reply {
        let action = match route(&req) {
            Ok(action) => action,
            Err(resp) => return resp.into(),
        };
        log::debug!("api: {} {} -> {action:?}", req.method, req.path);
        let mut vmm = lock(&self.vmm);
        dispatch(&mut vmm, action)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.listener.as_raw_fd(), self.timer.as_fd().as_raw_fd()] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                log::error!("api: cannot watch fd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_all(ops);
        } else if fd == self.timer.as_fd().as_raw_fd() {
            self.check_deadline(ops);
        } else if self
            .queue
            .front()
            .is_some_and(|c| c.stream.as_raw_fd() == fd)
        {
            self.serve_front(ops);
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
