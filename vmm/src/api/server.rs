//! The API socket as an event-manager subscriber.
//!
//! One client at a time: a connection made while another is open gets `503` once its request
//! is in, and the VMM keeps serving the first. Each connection carries one request and is closed after the
//! reply, which may carry fds (`SCM_RIGHTS`) for a handover.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

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
}

/// Most connections held at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 16;

/// Serves the control API for one VMM.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    clients: Vec<Client>,
    vmm: Arc<Mutex<Vmm>>,
}

struct Client {
    stream: UnixStream,
    received: Vec<u8>,
    /// The one client being served; the others get 503 once their request is in.
    admitted: bool,
}

impl ApiServer {
    /// Creates the socket with mode 0600: it is bound under a temporary name, restricted, then
    /// renamed into place, so it is never reachable with wider permissions.
    pub fn bind(path: &Path, vmm: Arc<Mutex<Vmm>>) -> Result<ApiServer, ApiSocketError> {
        if path.exists() {
            return Err(ApiSocketError::Exists {
                path: path.to_path_buf(),
            });
        }
        let bind_err = |source| ApiSocketError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|_| std::fs::rename(&tmp, path))
            .and_then(|_| listener.set_nonblocking(true));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(bind_err(e));
        }
        Ok(ApiServer {
            path: path.to_path_buf(),
            listener,
            clients: Vec::new(),
            vmm,
        })
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, ops),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("api: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream, ops: &mut EventOps) {
        if self.clients.len() >= MAX_CONNECTIONS {
            log::warn!("api: {MAX_CONNECTIONS} connections open; closing a new one");
            return;
        }
        if let Err(e) = stream
            .set_nonblocking(true)
            .and_then(|_| ops.add(Events::new(&stream, EventSet::IN)).map_err(to_io))
        {
            log::warn!("api: cannot watch client: {e}");
            return;
        }
        let admitted = !self.clients.iter().any(|c| c.admitted);
        self.clients.push(Client {
            stream,
            received: Vec::new(),
            admitted,
        });
    }

    /// Reads what `fd`'s client sent; once its request is complete (or broken), answers it
    /// and closes the connection.
    fn serve_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(index) = self.clients.iter().position(|c| c.stream.as_raw_fd() == fd) else {
            return;
        };
        let client = &mut self.clients[index];
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
        let client = self.clients.swap_remove(index);
        let _ = ops.remove(Events::empty(&client.stream));
        let reply = match request {
            None => return,
            Some(Err(HttpError::TooLarge)) => {
                Response::error(413, &HttpError::TooLarge.to_string()).into()
            }
            Some(Err(e)) => Response::error(400, &e.to_string()).into(),
            Some(Ok(_)) if !client.admitted => {
                Response::error(503, "another API client is connected; retry").into()
            }
            Some(Ok(req)) => self.handle(req),
        };
        send_reply(&client.stream, &reply);
    }

    fn handle(&self, req: super::http::Request) -> Reply {
        let action = match route(&req) {
            Ok(action) => action,
            Err(resp) => return resp.into(),
        };
        log::debug!("api: {} {} -> {action:?}", req.method, req.path);
        let mut vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
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
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("api: cannot watch the listening socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept_all(ops);
        } else {
            self.serve_client(events.fd(), ops);
        }
    }
}

fn to_io(e: event_manager::Error) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

/// Writes the reply; fds go with the first bytes. A client that went away is only logged.
fn send_reply(stream: &UnixStream, reply: &Reply) {
    let bytes = reply.response.to_bytes();
    if let Err(e) = stream.set_nonblocking(false) {
        log::warn!("api: {e}");
    }
    let result = if reply.fds.is_empty() {
        (&*stream).write_all(&bytes)
    } else {
        send_with_fds(stream, &bytes, &reply.fds)
    };
    if let Err(e) = result {
        log::warn!("api: cannot send reply: {e}");
    }
}

fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )?;
    (&*stream).write_all(&bytes[sent..])
}
