//! The API socket as an event-manager subscriber.
//!
//! One client at a time: a second connection while one is open gets `503` at once, and the
//! VMM keeps serving the first. Each connection carries one request and is closed after the
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

/// Serves the control API for one VMM.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    client: Option<Client>,
    vmm: Arc<Mutex<Vmm>>,
}

struct Client {
    stream: UnixStream,
    received: Vec<u8>,
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
            client: None,
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
        if self.client.is_some() {
            let busy = Response::error(503, "another API client is connected; retry");
            send_reply(&stream, &busy.into());
            return;
        }
        if let Err(e) = stream
            .set_nonblocking(true)
            .and_then(|_| ops.add(Events::new(&stream, EventSet::IN)).map_err(to_io))
        {
            log::warn!("api: cannot watch client: {e}");
            return;
        }
        self.client = Some(Client {
            stream,
            received: Vec::new(),
        });
    }

    fn serve_client(&mut self, ops: &mut EventOps) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let outcome = loop {
            match client.stream.read(&mut chunk) {
                Ok(0) => break Some(None),
                Ok(n) => client.received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(_) => break Some(None),
            }
            match parse_request(&client.received) {
                Ok(None) => continue,
                Ok(Some(req)) => break Some(Some(Ok(req))),
                Err(e) => break Some(Some(Err(e))),
            }
        };
        let Some(request) = outcome else {
            return;
        };
        if let Some(client) = self.client.take() {
            let _ = ops.remove(Events::empty(&client.stream));
            if let Some(request) = request {
                let reply = match request {
                    Ok(req) => self.handle(req),
                    Err(HttpError::TooLarge) => {
                        Response::error(413, &HttpError::TooLarge.to_string()).into()
                    }
                    Err(e) => Response::error(400, &e.to_string()).into(),
                };
                send_reply(&client.stream, &reply);
            }
        }
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
        } else if self
            .client
            .as_ref()
            .is_some_and(|c| c.stream.as_raw_fd() == events.fd())
        {
            self.serve_client(ops);
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
