//! The control API: HTTP/1.1 + JSON on a Unix socket, as Firecracker and Cloud Hypervisor do.
//!
//! | method | path           | body                          | reply                          |
//! |--------|----------------|-------------------------------|--------------------------------|
//! | GET    | `/vm`          |                               | 200 status                     |
//! | PUT    | `/vm/pause`    |                               | 204                            |
//! | PUT    | `/vm/resume`   |                               | 204                            |
//! | PUT    | `/vm/save`     | `{"export_path": "FILE"}`?    | 200 `{state_bytes, pause_to_saved_ms}` |
//! | PUT    | `/vm/check`    |                               | 204 (the guest prints a check) |
//! | PUT    | `/vm/guest-request` | `{"request": "devices"}` (`check`, `devices`, `irq_in_flight`, `irq_landed`) | 204 |
//! | PUT    | `/vm/update/stage` | `{"vm_id", "agent_socket", "require_preserved_devices"?}` | 200 stage report (RAM in the session, the guest running) |
//! | PUT    | `/vm/update/prepare` | `{"vm_id", "agent_socket", "require_preserved_devices"?}` | 200 prepare report (VM `preserved`) |
//! | PUT    | `/vm/update/check` | `{"agent_socket"}`       | 200 this VM's pre-flight (devices, blockers, warnings) |
//! | PUT    | `/vm/update/cancel` |                          | 204 (session released, VM resumed) |
//! | PUT    | `/vm/handover` | `{"resume_if_target_exits": true}`? | 200 manifest + fds (SCM_RIGHTS) |
//! | PUT    | `/vm/handover/complete` | `{"token"}` (the manifest's) | 204 (the target took the VM) |
//! | PUT    | `/vm/shutdown` | `{"force": true}`? (needed while handing over) | 204     |
//!
//! Errors are `{"error": "..."}` with 400 (bad body), 403 (a handover token that does not
//! match), 404 (unknown path), 405 (wrong method), 408 (no complete request within the read timeout), 409 (wrong phase), 413 (too large), 503
//! (too many clients queued) or 500.
//!
//! Each endpoint's method and path are written once, in [`Endpoint::route`], and its body
//! types once too: [`route`] parses requests with them and [`client::VmmClient`] sends them.

pub mod client;
pub mod http;
pub mod server;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use luvmm_devices::guest_control::GuestRequest;

use crate::update::prepare::PrepareOptions;
use crate::update::{self, UpdateError};
use crate::vmm::{ExportError, Vmm, VmmError};
use http::{Request, Response};
use luvmm_resources::errors::error_chain;
use luvmm_resources::json::{decode_object, kind};

/// One operation the API can ask of the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum VmmAction {
    Status,
    Pause,
    Resume,
    Save { export_path: Option<PathBuf> },
    Check,
    GuestRequest(GuestRequest),
    StageUpdate(PrepareBody),
    PrepareUpdate(PrepareBody),
    CheckUpdate(CheckBody),
    CancelUpdate,
    StageHandover,
    Handover(HandoverBody),
    CompleteHandover(CompleteHandoverBody),
    Shutdown(ShutdownBody),
}

impl VmmAction {
    /// The endpoint that carries this action.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            VmmAction::Status => Endpoint::Status,
            VmmAction::Pause => Endpoint::Pause,
            VmmAction::Resume => Endpoint::Resume,
            VmmAction::Save { .. } => Endpoint::Save,
            VmmAction::Check => Endpoint::Check,
            VmmAction::GuestRequest(_) => Endpoint::GuestRequest,
            VmmAction::StageUpdate(_) => Endpoint::StageUpdate,
            VmmAction::PrepareUpdate(_) => Endpoint::PrepareUpdate,
            VmmAction::CheckUpdate(_) => Endpoint::CheckUpdate,
            VmmAction::CancelUpdate => Endpoint::CancelUpdate,
            VmmAction::StageHandover => Endpoint::StageHandover,
            VmmAction::Handover(_) => Endpoint::Handover,
            VmmAction::CompleteHandover(_) => Endpoint::CompleteHandover,
            VmmAction::Shutdown(_) => Endpoint::Shutdown,
        }
    }

    /// The JSON body that asks for this action, in the shape its endpoint parses; `None` for
    /// an action without parameters. Fails only on a path that is not UTF-8.
    pub fn body(&self) -> Result<Option<String>, serde_json::Error> {
        let body = match self {
            VmmAction::Save { export_path } => serde_json::to_string(&SaveBody {
                export_path: export_path.clone(),
            })?,
            VmmAction::GuestRequest(request) => {
                serde_json::to_string(&GuestRequestBody { request: *request })?
            }
            VmmAction::StageUpdate(body) | VmmAction::PrepareUpdate(body) => {
                serde_json::to_string(body)?
            }
            VmmAction::CheckUpdate(body) => serde_json::to_string(body)?,
            VmmAction::Handover(body) => serde_json::to_string(body)?,
            VmmAction::CompleteHandover(body) => serde_json::to_string(body)?,
            VmmAction::Shutdown(body) => serde_json::to_string(body)?,
            _ => return Ok(None),
        };
        Ok(Some(body))
    }
}

/// An endpoint of the API. Its method and path are written in [`Endpoint::route`] and nowhere
/// else: the router finds requests by them and the client sends them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Status,
    Pause,
    Resume,
    Save,
    Check,
    GuestRequest,
    StageUpdate,
    PrepareUpdate,
    CheckUpdate,
    CancelUpdate,
    StageHandover,
    Handover,
    CompleteHandover,
    Shutdown,
}

impl Endpoint {
    pub const ALL: [Endpoint; 14] = [
        Endpoint::Status,
        Endpoint::Pause,
        Endpoint::Resume,
        Endpoint::Save,
        Endpoint::Check,
        Endpoint::GuestRequest,
        Endpoint::StageUpdate,
        Endpoint::PrepareUpdate,
        Endpoint::CheckUpdate,
        Endpoint::CancelUpdate,
        Endpoint::StageHandover,
        Endpoint::Handover,
        Endpoint::CompleteHandover,
        Endpoint::Shutdown,
    ];

    /// The method and path that reach this endpoint.
    pub fn route(self) -> (&'static str, &'static str) {
        match self {
            Endpoint::Status => ("GET", "/vm"),
            Endpoint::Pause => ("PUT", "/vm/pause"),
            Endpoint::Resume => ("PUT", "/vm/resume"),
            Endpoint::Save => ("PUT", "/vm/save"),
            Endpoint::Check => ("PUT", "/vm/check"),
            Endpoint::GuestRequest => ("PUT", "/vm/guest-request"),
            Endpoint::StageUpdate => ("PUT", "/vm/update/stage"),
            Endpoint::PrepareUpdate => ("PUT", "/vm/update/prepare"),
            Endpoint::CheckUpdate => ("PUT", "/vm/update/check"),
            Endpoint::CancelUpdate => ("PUT", "/vm/update/cancel"),
            Endpoint::StageHandover => ("PUT", "/vm/handover/stage"),
            Endpoint::Handover => ("PUT", "/vm/handover"),
            Endpoint::CompleteHandover => ("PUT", "/vm/handover/complete"),
            Endpoint::Shutdown => ("PUT", "/vm/shutdown"),
        }
    }

    pub fn method(self) -> &'static str {
        self.route().0
    }

    pub fn path(self) -> &'static str {
        self.route().1
    }

    /// The status [`dispatch`] answers a success with: 200 where it sends JSON, else 204.
    pub fn success_status(self) -> u16 {
        match self {
            Endpoint::Status
            | Endpoint::Save
            | Endpoint::StageUpdate
            | Endpoint::PrepareUpdate
            | Endpoint::CheckUpdate
            | Endpoint::StageHandover
            | Endpoint::Handover => 200,
            Endpoint::Pause
            | Endpoint::Resume
            | Endpoint::Check
            | Endpoint::GuestRequest
            | Endpoint::CancelUpdate
            | Endpoint::CompleteHandover
            | Endpoint::Shutdown => 204,
        }
    }

    fn from_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }

    /// The action a request to this endpoint with `body` asks for.
    fn parse(self, body: &[u8]) -> Result<VmmAction, Response> {
        match self {
            Endpoint::Status => Ok(VmmAction::Status),
            Endpoint::Pause => no_body(body).map(|_| VmmAction::Pause),
            Endpoint::Resume => no_body(body).map(|_| VmmAction::Resume),
            Endpoint::Check => no_body(body).map(|_| VmmAction::Check),
            Endpoint::GuestRequest => {
                required_body::<GuestRequestBody>(body).map(|r| VmmAction::GuestRequest(r.request))
            }
            Endpoint::StageUpdate => required_body::<PrepareBody>(body).map(VmmAction::StageUpdate),
            Endpoint::PrepareUpdate => {
                required_body::<PrepareBody>(body).map(VmmAction::PrepareUpdate)
            }
            Endpoint::CancelUpdate => no_body(body).map(|_| VmmAction::CancelUpdate),
            Endpoint::CheckUpdate => required_body::<CheckBody>(body).map(VmmAction::CheckUpdate),
            Endpoint::StageHandover => no_body(body).map(|_| VmmAction::StageHandover),
            Endpoint::Handover => parse_body::<HandoverBody>(body).map(VmmAction::Handover),
            Endpoint::CompleteHandover => {
                required_body::<CompleteHandoverBody>(body).map(VmmAction::CompleteHandover)
            }
            Endpoint::Shutdown => parse_body::<ShutdownBody>(body).map(VmmAction::Shutdown),
            Endpoint::Save => parse_body::<SaveBody>(body).map(|s| VmmAction::Save {
                export_path: s.export_path,
            }),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (method, path) = self.route();
        write!(f, "{method} {path}")
    }
}

/// What `PUT /vm/update/check` takes.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    pub agent_socket: PathBuf,
}

/// What `PUT /vm/update/stage` and `PUT /vm/update/prepare` take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareBody {
    pub vm_id: String,
    pub agent_socket: PathBuf,
    #[serde(default)]
    pub require_preserved_devices: bool,
}

impl PrepareBody {
    fn options(&self) -> PrepareOptions<'_> {
        PrepareOptions {
            vm_id: &self.vm_id,
            require_preserved_devices: self.require_preserved_devices,
        }
    }
}

/// What `PUT /vm/handover` takes. A target that runs the guest only once it confirmed asks
/// for `resume_if_target_exits`: if it exits before confirming, the VMM resumes the VM. A
/// client that may pass the fds on to another process must not.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverBody {
    #[serde(default)]
    pub resume_if_target_exits: bool,
    /// A target built ahead (`PUT /vm/handover/stage`) asks for the VM as it runs: it is
    /// paused and saved then, and runs on if the handover cannot be made.
    #[serde(default)]
    pub pause: bool,
}

/// What `PUT /vm/handover/complete` takes: the token of the manifest the target received.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteHandoverBody {
    pub token: String,
}

/// What `PUT /vm/shutdown` takes. `force` is needed while a handover waits for its target.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownBody {
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestRequestBody {
    request: GuestRequest,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveBody {
    export_path: Option<PathBuf>,
}

/// Maps a request to an action, or to the error response it deserves.
pub fn route(req: &Request) -> Result<VmmAction, Response> {
    let Some(endpoint) = Endpoint::from_path(&req.path) else {
        return Err(Response::error(
            404,
            &format!("no such endpoint: {}", req.path),
        ));
    };
    let allowed = endpoint.method();
    if req.method != allowed {
        let mut resp = Response::error(405, &format!("{} {}: use {allowed}", req.method, req.path));
        resp.allow = Some(allowed);
        return Err(resp);
    }
    endpoint.parse(&req.body)
}

/// Endpoints without parameters take no body, or an empty JSON object.
fn no_body(body: &[u8]) -> Result<(), Response> {
    match json_object(body)? {
        Some(fields) if !fields.is_empty() => {
            Err(Response::error(400, "this endpoint takes no parameters"))
        }
        _ => Ok(()),
    }
}

/// An empty body means defaults; anything else must be a JSON object of the right shape.
fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, Response> {
    match json_object(body)? {
        None => Ok(T::default()),
        Some(fields) => {
            decode_object(fields).map_err(|e| Response::error(400, &format!("bad JSON body: {e}")))
        }
    }
}

/// A body that must be there, as a JSON object of the right shape.
fn required_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Response> {
    match json_object(body)? {
        None => Err(Response::error(400, "this endpoint needs a JSON body")),
        Some(fields) => {
            decode_object(fields).map_err(|e| Response::error(400, &format!("bad JSON body: {e}")))
        }
    }
}

/// The body as a JSON object; `None` for an empty body.
fn json_object(
    body: &[u8],
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(fields)) => Ok(Some(fields)),
        Ok(other) => Err(Response::error(
            400,
            &format!("the body must be a JSON object, not {}", kind(&other)),
        )),
        Err(e) => Err(Response::error(400, &format!("bad JSON body: {e}"))),
    }
}

/// A response plus the fds that travel with it.
pub struct Reply {
    pub response: Response,
    pub fds: Vec<OwnedFd>,
}

impl From<Response> for Reply {
    fn from(response: Response) -> Reply {
        Reply {
            response,
            fds: Vec::new(),
        }
    }
}

/// Runs `action` on the VMM.
pub fn dispatch(vmm: &mut Vmm, action: VmmAction) -> Reply {
    let done = |result: Result<(), VmmError>| match result {
        Ok(()) => Response::empty(204),
        Err(e) => error_response(&e),
    };
    match action {
        VmmAction::Status => Response::json(200, &vmm.status()).into(),
        VmmAction::Pause => done(vmm.pause()).into(),
        VmmAction::Resume => done(vmm.resume()).into(),
        VmmAction::Check => done(vmm.request(GuestRequest::Check)).into(),
        VmmAction::GuestRequest(request) => done(vmm.request(request)).into(),
        VmmAction::StageUpdate(body) => {
            let agent = vmm.update_holder(&body.agent_socket);
            json_or_error(update::stage::stage(vmm, agent, &body.options()))
        }
        VmmAction::PrepareUpdate(body) => {
            let agent = vmm.update_holder(&body.agent_socket);
            json_or_error(update::prepare::prepare(vmm, agent, &body.options()))
        }
        VmmAction::CancelUpdate => done(update::cancel::cancel(vmm)).into(),
        VmmAction::CheckUpdate(body) => {
            let agent = vmm.update_holder(&body.agent_socket);
            match update::check::check_vm(vmm, agent.as_ref()) {
                Ok(check) => Response::json(200, &check).into(),
                Err(e) => update_error_response(&e).into(),
            }
        }
        VmmAction::Save { export_path } => match vmm.save(export_path.as_deref()) {
            Ok(report) => Response::json(200, &report).into(),
            Err(e) => error_response(&e).into(),
        },
        VmmAction::StageHandover => with_fds(vmm.stage_handover()),
        VmmAction::Handover(body) => with_fds(if body.pause {
            vmm.pause_and_hand_over()
        } else {
            vmm.handover()
        }),
        VmmAction::CompleteHandover(body) => done(vmm.complete_handover(&body.token)).into(),
        VmmAction::Shutdown(body) => done(vmm.request_shutdown(body.force)).into(),
    }
}

/// A report of an update step, or why it failed.
fn json_or_error<T: Serialize>(result: Result<T, UpdateError>) -> Reply {
    match result {
        Ok(report) => Response::json(200, &report).into(),
        Err(e) => update_error_response(&e).into(),
    }
}

/// A manifest with the fds it describes, or the VM's refusal.
fn with_fds<T: Serialize>(handed: Result<(T, Vec<OwnedFd>), VmmError>) -> Reply {
    match handed {
        Ok((manifest, fds)) => Reply {
            response: Response::json(200, &manifest),
            fds,
        },
        Err(e) => error_response(&e).into(),
    }
}

/// A live update's error: the VM's own errors keep their status; any other is the host's.
fn update_error_response(e: &UpdateError) -> Response {
    match e {
        UpdateError::Vm(e) => error_response(e),
        UpdateError::AlreadyStaged { .. } | UpdateError::StagedAs { .. } => {
            Response::error(409, &error_chain(e))
        }
        _ => Response::error(500, &error_chain(e)),
    }
}

fn error_response(e: &VmmError) -> Response {
    let status = match e {
        VmmError::WrongPhase { .. }
        | VmmError::NoCurrentState
        | VmmError::NotMovable { .. }
        | VmmError::UpdateHeld { .. }
        | VmmError::HandoverPending => 409,
        VmmError::WrongToken => 403,
        // The caller named a destination the VMM will not write.
        VmmError::Export {
            source: ExportError::Relative | ExportError::NotRegular(_),
            ..
        } => 400,
        _ => 500,
    };
    Response::error(status, &error_chain(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            wire_len: 0,
        }
    }

    #[test]
    fn routes_map_to_actions() {
        assert_eq!(route(&req("GET", "/vm", "")), Ok(VmmAction::Status));
        assert_eq!(route(&req("PUT", "/vm/pause", "")), Ok(VmmAction::Pause));
        assert_eq!(
            route(&req("PUT", "/vm/resume", "{}")),
            Ok(VmmAction::Resume)
        );
        assert_eq!(
            route(&req("PUT", "/vm/save", r#"{"export_path": "/tmp/x"}"#)),
            Ok(VmmAction::Save {
                export_path: Some("/tmp/x".into())
            })
        );
        assert_eq!(
            route(&req("PUT", "/vm/save", "")),
            Ok(VmmAction::Save { export_path: None })
        );
        assert_eq!(
            route(&req("PUT", "/vm/handover/complete", r#"{"token": "ab"}"#)),
            Ok(VmmAction::CompleteHandover(CompleteHandoverBody {
                token: "ab".into()
            }))
        );
        assert_eq!(
            route(&req("PUT", "/vm/handover/complete", ""))
                .unwrap_err()
                .status,
            400,
            "a confirmation without its token"
        );
        assert_eq!(
            route(&req("PUT", "/vm/shutdown", "")),
            Ok(VmmAction::Shutdown(ShutdownBody { force: false }))
        );
    }

    /// Every action, each endpoint at least once.
    fn one_of_each() -> Vec<VmmAction> {
        vec![
            VmmAction::Status,
            VmmAction::Pause,
            VmmAction::Resume,
            VmmAction::Save { export_path: None },
            VmmAction::Save {
                export_path: Some("/tmp/state".into()),
            },
            VmmAction::Check,
            VmmAction::GuestRequest(GuestRequest::IrqInFlight),
            VmmAction::StageUpdate(PrepareBody {
                vm_id: "vm1".into(),
                agent_socket: "/run/agent.sock".into(),
                require_preserved_devices: false,
            }),
            VmmAction::PrepareUpdate(PrepareBody {
                vm_id: "vm1".into(),
                agent_socket: "/run/agent.sock".into(),
                require_preserved_devices: true,
            }),
            VmmAction::CheckUpdate(CheckBody {
                agent_socket: "/run/agent.sock".into(),
            }),
            VmmAction::CancelUpdate,
            VmmAction::Handover(HandoverBody::default()),
            VmmAction::StageHandover,
            VmmAction::Handover(HandoverBody {
                resume_if_target_exits: true,
                pause: false,
            }),
            VmmAction::Handover(HandoverBody {
                resume_if_target_exits: true,
                pause: true,
            }),
            VmmAction::CompleteHandover(CompleteHandoverBody {
                token: "0123".into(),
            }),
            VmmAction::Shutdown(ShutdownBody { force: false }),
            VmmAction::Shutdown(ShutdownBody { force: true }),
        ]
    }

    #[test]
    fn what_the_client_sends_routes_back_to_the_same_action() {
        for action in one_of_each() {
            let endpoint = action.endpoint();
            let body = action.body().unwrap();
            let bytes = http::request_bytes(endpoint.method(), endpoint.path(), body.as_deref());
            let req = http::parse_request(&bytes).unwrap().unwrap();
            assert_eq!(route(&req), Ok(action), "{endpoint}");
        }
    }

    #[test]
    fn every_endpoint_has_its_own_path() {
        for (i, endpoint) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(Endpoint::from_path(endpoint.path()), Some(*endpoint));
            assert!(
                !Endpoint::ALL[..i].contains(endpoint),
                "{endpoint} listed twice"
            );
        }
        let used: Vec<Endpoint> = one_of_each().iter().map(VmmAction::endpoint).collect();
        assert!(Endpoint::ALL.iter().all(|e| used.contains(e)));
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        assert_eq!(route(&req("GET", "/nope", "")).unwrap_err().status, 404);
        let wrong = route(&req("GET", "/vm/pause", "")).unwrap_err();
        assert_eq!((wrong.status, wrong.allow), (405, Some("PUT")));
        assert_eq!(
            route(&req("PUT", "/vm/save", "{oops")).unwrap_err().status,
            400
        );
        assert_eq!(
            route(&req("PUT", "/vm/save", r#"{"exprt": 1}"#))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            route(&req("PUT", "/vm/pause", "[1]")).unwrap_err().status,
            400
        );
    }
}
