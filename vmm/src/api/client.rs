//! A client for the control API, used by `luvmm ctl`, `luvmm restore --from-socket`, the
//! benchmarks and the tests. [`VmmClient`] has one method per endpoint, built from the same
//! [`Endpoint`] routes and body types the server parses, and returns typed replies.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use luvmm_devices::guest_control::GuestRequest;
use luvmm_liveupdate::unix::FdReader;
use luvmm_resources::layout::MSI_GSI_START;

use super::http::{parse_response, request_bytes, HttpError};
use super::{
    CheckBody, CompleteHandoverBody, Endpoint, HandoverBody, PrepareBody, ShutdownBody, VmmAction,
};
use crate::update::check::VmCheck;
use crate::update::prepare::PrepareReport;
use crate::update::stage::StageReport;
use crate::vmm::{HandoverManifest, SaveReport, StageManifest, VmStatus};
use crate::vstate::interrupts::MAX_GSI;

/// Most fds a reply may carry: those of a handover. Besides a few memfds (the state, the RAM
/// below and above the 32-bit hole) and the iommufd, each passthrough device brings its cdev and
/// two INTx eventfds, one per slot of the guest's PCI bus at most, and one eventfd per MSI or
/// MSI-X vector; every vector has its own GSI, of which a VM has `MAX_GSI - MSI_GSI_START`.
/// Eight devices with 64 MSI-X vectors each take 540.
const MAX_FDS: usize = 8 + GUEST_PCI_SLOTS * 3 + (MAX_GSI - MSI_GSI_START) as usize;
/// Slots of the guest's one PCI bus.
const GUEST_PCI_SLOTS: usize = 32;

/// How long a client waits for its reply by default: long enough for the VMM's slowest request
/// (a save of a large guest), served one at a time.
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
    #[error("no reply from {path} within {} s", timeout.as_secs_f64())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("bad reply from {path}")]
    Http {
        path: PathBuf,
        #[source]
        source: HttpError,
    },
    /// The VMM answered with another status than the endpoint's success: an error it
    /// explains in `message`, the `error` field of its reply.
    #[error("{path} refused {endpoint}: {status} {message}")]
    Refused {
        path: PathBuf,
        endpoint: Endpoint,
        status: u16,
        message: String,
    },
    #[error("the reply of {path} to {endpoint} does not parse")]
    Decode {
        path: PathBuf,
        endpoint: Endpoint,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the body of {endpoint}")]
    Encode {
        endpoint: Endpoint,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
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

/// A VM handed over: its manifest, and the fds in the order the manifest describes.
#[derive(Debug)]
pub struct Handover {
    pub manifest: HandoverManifest,
    pub fds: Vec<OwnedFd>,
}

/// What a target built ahead starts from: guest RAM's layout and vCPU count, and its memfds.
#[derive(Debug)]
pub struct Staged {
    pub manifest: StageManifest,
    pub fds: Vec<OwnedFd>,
}

/// The control API of the VMM behind one socket.
#[derive(Clone, Debug)]
pub struct VmmClient {
    socket: PathBuf,
    timeout: Duration,
}

impl VmmClient {
    /// A client that waits [`DEFAULT_TIMEOUT`] for each reply.
    pub fn new(socket: &Path) -> VmmClient {
        VmmClient {
            socket: socket.to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client, waiting `timeout` for each reply.
    pub fn with_timeout(self, timeout: Duration) -> VmmClient {
        VmmClient { timeout, ..self }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The VM's phase, vCPUs, memory layout and restore timings.
    pub fn status(&self) -> Result<VmStatus, ClientError> {
        self.call_json(&VmmAction::Status)
    }

    pub fn pause(&self) -> Result<(), ClientError> {
        self.call(&VmmAction::Pause).map(drop)
    }

    pub fn resume(&self) -> Result<(), ClientError> {
        self.call(&VmmAction::Resume).map(drop)
    }

    /// Pauses the VM and saves its state into a memfd, and into `export_path` if given.
    pub fn save(&self, export_path: Option<&Path>) -> Result<SaveReport, ClientError> {
        self.call_json(&VmmAction::Save {
            export_path: export_path.map(Path::to_path_buf),
        })
    }

    /// Asks the guest to check its memory (it prints a LUVMM-CHECK line).
    pub fn check(&self) -> Result<(), ClientError> {
        self.call(&VmmAction::Check).map(drop)
    }

    pub fn guest_request(&self, request: GuestRequest) -> Result<(), ClientError> {
        self.call(&VmmAction::GuestRequest(request)).map(drop)
    }

    /// Stages the VM's host live update through the agent at `agent_socket`: its RAM goes into
    /// its session while the guest runs on.
    pub fn stage_update(
        &self,
        vm_id: &str,
        agent_socket: &Path,
        require_preserved_devices: bool,
    ) -> Result<StageReport, ClientError> {
        self.call_json(&VmmAction::StageUpdate(PrepareBody {
            vm_id: vm_id.to_string(),
            agent_socket: agent_socket.to_path_buf(),
            require_preserved_devices,
        }))
    }

    /// Prepares the VM's host live update through the agent at `agent_socket` (from its stage,
    /// if it was staged).
    pub fn prepare_update(
        &self,
        vm_id: &str,
        agent_socket: &Path,
        require_preserved_devices: bool,
    ) -> Result<PrepareReport, ClientError> {
        self.call_json(&VmmAction::PrepareUpdate(PrepareBody {
            vm_id: vm_id.to_string(),
            agent_socket: agent_socket.to_path_buf(),
            require_preserved_devices,
        }))
    }

    /// This VM's part of the update pre-flight.
    pub fn check_update(&self, agent_socket: &Path) -> Result<VmCheck, ClientError> {
        self.call_json(&VmmAction::CheckUpdate(CheckBody {
            agent_socket: agent_socket.to_path_buf(),
        }))
    }

    /// Calls a prepared update off: the session is released and the VM resumes.
    pub fn cancel_update(&self) -> Result<(), ClientError> {
        self.call(&VmmAction::CancelUpdate).map(drop)
    }

    /// Asks for the VM: its saved state and memory (and devices) as fds. The VMM can still
    /// resume it until [`VmmClient::complete_handover`].
    pub fn handover(&self) -> Result<Handover, ClientError> {
        self.ask_handover(HandoverBody::default())
    }

    /// As [`VmmClient::handover`], for a target that runs the guest only once it confirmed:
    /// if this process exits before it confirms, the VMM resumes the VM by itself.
    pub fn handover_to_this_process(&self) -> Result<Handover, ClientError> {
        self.ask_handover(HandoverBody {
            resume_if_target_exits: true,
            pause: false,
        })
    }

    /// What a target builds on before it asks for the VM: guest RAM's memfds and layout and
    /// the vCPU count. The VM runs on.
    pub fn stage_handover(&self) -> Result<Staged, ClientError> {
        let reply = self.call(&VmmAction::StageHandover)?;
        let manifest = self.decode(Endpoint::StageHandover, &reply.body)?;
        Ok(Staged {
            manifest,
            fds: reply.fds,
        })
    }

    /// As [`VmmClient::handover_to_this_process`], for a target built ahead: the VMM pauses
    /// and saves a running VM now, and lets it run on if it cannot hand it over.
    pub fn pause_and_hand_over_to_this_process(&self) -> Result<Handover, ClientError> {
        self.ask_handover(HandoverBody {
            resume_if_target_exits: true,
            pause: true,
        })
    }

    fn ask_handover(&self, body: HandoverBody) -> Result<Handover, ClientError> {
        let endpoint = Endpoint::Handover;
        let reply = self.call(&VmmAction::Handover(body))?;
        let manifest = self.decode(endpoint, &reply.body)?;
        Ok(Handover {
            manifest,
            fds: reply.fds,
        })
    }

    /// Tells the VMM this process took its VM over, with the token of the manifest it
    /// received; after this the VMM refuses to resume it.
    pub fn complete_handover(&self, token: &str) -> Result<(), ClientError> {
        self.call(&VmmAction::CompleteHandover(CompleteHandoverBody {
            token: token.to_string(),
        }))
        .map(drop)
    }

    /// Stops the VMM; `force` also while a handover waits for its target, leaving it the VM.
    pub fn shutdown(&self, force: bool) -> Result<(), ClientError> {
        self.call(&VmmAction::Shutdown(ShutdownBody { force }))
            .map(drop)
    }

    /// Sends `action` and returns the reply whatever its status, for callers that show it as
    /// it came (`luvmm ctl`).
    pub fn send(&self, action: &VmmAction) -> Result<ApiReply, ClientError> {
        let endpoint = action.endpoint();
        let body = action
            .body()
            .map_err(|source| ClientError::Encode { endpoint, source })?;
        request(
            &self.socket,
            endpoint.method(),
            endpoint.path(),
            body.as_deref(),
            self.timeout,
        )
    }

    /// Sends `action`; anything but its endpoint's success status is an error.
    fn call(&self, action: &VmmAction) -> Result<ApiReply, ClientError> {
        let endpoint = action.endpoint();
        let reply = self.send(action)?;
        if reply.status != endpoint.success_status() {
            return Err(ClientError::Refused {
                path: self.socket.clone(),
                endpoint,
                status: reply.status,
                message: error_message(reply.body),
            });
        }
        Ok(reply)
    }

    /// Sends `action` and decodes the JSON it answers with.
    fn call_json<T: DeserializeOwned>(&self, action: &VmmAction) -> Result<T, ClientError> {
        let reply = self.call(action)?;
        self.decode(action.endpoint(), &reply.body)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: &str,
    ) -> Result<T, ClientError> {
        serde_json::from_str(body).map_err(|source| ClientError::Decode {
            path: self.socket.clone(),
            endpoint,
            source,
        })
    }
}

/// The `error` field of an error reply, or the whole body if it has none.
fn error_message(body: String) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    match serde_json::from_str::<ErrorBody>(&body) {
        Ok(reply) => reply.error,
        Err(_) => body,
    }
}

/// Sends one request to the API socket at `socket` and reads the whole reply, giving up after
/// `timeout` without one.
fn request(
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
    // A server that answers before it read the request (a 503 when too many clients wait)
    // breaks the pipe under the write: its reply is read all the same.
    let written = stream.write_all(&request_bytes(method, path, body));
    // The server closes the connection after its reply.
    let mut reader = FdReader::<MAX_FDS>::new(&stream);
    let mut bytes = Vec::new();
    let read = reader.read_to_end(&mut bytes);
    let fds = reader.into_fds();
    match (written, read, parse_response(&bytes)) {
        (_, _, Ok((status, body))) => Ok(ApiReply { status, body, fds }),
        (Err(e), _, _) | (Ok(()), Err(e), _) => Err(io_err(e)),
        (Ok(()), Ok(_), Err(source)) => Err(ClientError::Http {
            path: socket.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::{parse_request, Response};
    use std::os::unix::net::{UnixListener, UnixStream};

    /// A one-shot server on a temporary socket that reads one request and answers with
    /// `respond`.
    fn serve_with(
        name: &str,
        respond: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path = std::env::temp_dir().join(format!("luvmm-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while parse_request(&request).unwrap().is_none() {
                let n = stream.read(&mut chunk).unwrap();
                request.extend_from_slice(&chunk[..n]);
            }
            respond(&mut stream);
        });
        (path, server)
    }

    /// A one-shot server that answers with `response`.
    fn serve_once(name: &str, response: Response) -> (PathBuf, std::thread::JoinHandle<()>) {
        serve_with(name, move |stream| {
            stream.write_all(&response.to_bytes()).unwrap()
        })
    }

    #[test]
    fn nothing_lost_a_handover_of_8_devices_with_msix_brings_every_fd() {
        // State, two RAM memfds and the iommufd; per device its cdev, 32 MSI-X vectors and
        // INTx: more than one message carries (253), and than the old limit (64).
        const FDS: usize = 4 + 8 * (1 + 32 + 2);
        let (path, server) = serve_with("fds", |stream| {
            let null = std::fs::File::open("/dev/null").unwrap();
            let fds: Vec<&std::fs::File> = std::iter::repeat_n(&null, FDS).collect();
            let reply = Response::json(200, &serde_json::json!({})).to_bytes();
            luvmm_liveupdate::unix::send_with_fds(stream, &reply, &fds).unwrap();
        });
        let reply = VmmClient::new(&path)
            .send(&VmmAction::Handover(HandoverBody::default()))
            .unwrap();
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(reply.is_success(), "{reply:?}");
        assert_eq!(reply.fds.len(), FDS);
    }

    #[test]
    fn an_error_reply_becomes_a_refusal_with_the_servers_message() {
        let (path, server) = serve_once("refused", Response::error(409, "VM is paused"));
        let err = VmmClient::new(&path).resume().unwrap_err();
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(err.status(), Some(409));
        assert!(
            matches!(&err, ClientError::Refused { endpoint: Endpoint::Resume, message, .. }
                if message == "VM is paused"),
            "{err:?}"
        );
    }

    #[test]
    fn a_success_other_than_the_endpoints_own_is_refused() {
        let (path, server) = serve_once("wrong-success", Response::empty(204));
        let err = VmmClient::new(&path).status().unwrap_err();
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(err.status(), Some(204));
    }

    #[test]
    fn a_reply_that_does_not_decode_is_a_typed_error() {
        let body = serde_json::json!({ "phase": "dancing" });
        let (path, server) = serve_once("undecodable", Response::json(200, &body));
        let err = VmmClient::new(&path).status().unwrap_err();
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(
                err,
                ClientError::Decode {
                    endpoint: Endpoint::Status,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
