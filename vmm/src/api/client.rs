//! A client for the control API, used by `luvmm ctl`, `luvmm restore --from-socket` and the
//! benchmarks.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use luvmm_liveupdate::unix::FdReader;

use super::http::{parse_response, request_bytes, HttpError};

/// Most fds a reply may carry: a state memfd, RAM memfds, and the iommufd plus each passthrough
/// device's cdev and interrupt eventfds.
const MAX_FDS: usize = 64;

/// How long a client waits for its reply by default: the VMM serves one client at a time and
/// gives each at most `server::READ_TIMEOUT` to send its request, so a few queued clients fit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Talking to a VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no reply from {path} within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("bad reply from {path}")]
    Http {
        path: PathBuf,
        #[source]
        source: HttpError,
    },
}

/// A reply: status, body, and any fds that came with it.
#[derive(Debug)]
pub struct ApiReply {
    pub status: u16,
    pub body: String,
    pub fds: Vec<OwnedFd>,
}

impl ApiReply {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends one request to the API socket at `socket` and reads the whole reply, giving up after
/// `timeout` without one.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<ApiReply, ClientError> {
    let io_err = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout {
            path: socket.to_path_buf(),
            timeout,
        },
        _ => ClientError::Io {
            path: socket.to_path_buf(),
            source,
        },
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(io_err)?;
    stream
        .write_all(&request_bytes(method, path, body))
        .map_err(io_err)?;
    // The server closes the connection after its reply.
    let mut reader = FdReader::<MAX_FDS>::new(&stream);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(io_err)?;
    let fds = reader.into_fds();
    let (status, body) = parse_response(&bytes).map_err(|source| ClientError::Http {
        path: socket.to_path_buf(),
        source,
    })?;
    Ok(ApiReply { status, body, fds })
}
