//! The interfaces others build on, held to their written descriptions: the control API to
//! `vmm/api/openapi.json` (every route in both, every response of a live VMM valid against
//! the schema the document gives for its status), the agent's wire protocol to
//! `liveupdate/agent-protocol.schema.json`, and what the operator commands print with
//! `--json` to `vmm/cli/reports.schema.json` (the drill's report in every drill test).

use std::collections::BTreeSet;
use std::process::Command;

use luvmm_devices::guest_control::GuestRequest;
use luvmm_tests::schema::{assert_report, assert_valid, document, validator};
use luvmm_tests::{api_with_phrase, luvmm_bin, TestDir, Vm};
use luvmm_vmm::api::{
    CheckBody, CompleteHandoverBody, Endpoint, HandoverBody, PrepareBody, ShutdownBody, VmmAction,
};
use serde_json::{json, Value};

/// The standard reason phrase of each status the API sends.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => panic!("status {status} is not one the API documents"),
    }
}

#[test]
fn api_matches_its_openapi_document() {
    let doc = document("vmm/api/openapi.json");
    // Every route in the server is in the document, and nothing else is.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item")
                .keys()
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = Endpoint::ALL
        .iter()
        .map(|e| (e.method().to_string(), e.path().to_string()))
        .collect();
    assert_eq!(
        documented, served,
        "the document and the server's routes differ"
    );
    for endpoint in Endpoint::ALL {
        let op = &doc["paths"][endpoint.path()][endpoint.method().to_lowercase()];
        let ok = endpoint.success_status().to_string();
        assert!(
            op["responses"][&ok].is_object(),
            "{endpoint}: the document lacks its success status {ok}"
        );
        assert_eq!(
            op["responses"][&ok]["content"].is_object(),
            endpoint.success_status() == 200,
            "{endpoint}: a body with 200 and none with 204"
        );
    }

    // What the typed client sends is what the document says each endpoint takes.
    let update = PrepareBody {
        vm_id: "vm1".into(),
        agent_socket: "/run/luvmm/agent.sock".into(),
        require_preserved_devices: true,
    };
    let actions = [
        VmmAction::Save {
            export_path: Some("/tmp/state.bin".into()),
        },
        VmmAction::Save { export_path: None },
        VmmAction::GuestRequest(GuestRequest::IrqInFlight),
        VmmAction::StageUpdate(update.clone()),
        VmmAction::PrepareUpdate(update),
        VmmAction::CheckUpdate(CheckBody {
            agent_socket: "/run/luvmm/agent.sock".into(),
        }),
        VmmAction::Handover(HandoverBody {
            resume_if_target_exits: true,
            pause: true,
        }),
        VmmAction::CompleteHandover(CompleteHandoverBody {
            token: "0123abcd".into(),
        }),
        VmmAction::Shutdown(ShutdownBody { force: true }),
        VmmAction::Pause,
    ];
    for action in actions {
        let endpoint = action.endpoint();
        let pointer = format!(
            "/paths/{}/{}/requestBody",
            endpoint.path().replace('/', "~1"),
            endpoint.method().to_lowercase()
        );
        match action.body().expect("a body") {
            Some(body) => {
                let instance: Value = serde_json::from_str(&body).expect("JSON");
                let schema = format!("{pointer}/content/application~1json/schema");
                assert_valid(&doc, &schema, &instance, &format!("{endpoint} request"));
            }
            None => assert!(
                doc.pointer(&pointer).is_none(),
                "{endpoint}: the document asks for a body the client does not send"
            ),
        }
    }

    // A live VMM, every route asked, each answer checked against what the document says of
    // its status.
    let dir = TestDir::new("api-openapi");
    let vm = Vm::boot(&dir, "vm", &[]);
    let agent = dir.join("no-agent.sock");
    let update = json!({"vm_id": "vm1", "agent_socket": agent}).to_string();
    let check = json!({"agent_socket": agent}).to_string();
    let exported = dir.join("state.bin");
    let save_to = json!({"export_path": exported}).to_string();
    let steps: Vec<(&str, &str, String, u16)> = vec![
        ("GET", "/vm", String::new(), 200),
        ("PUT", "/vm/check", String::new(), 204),
        (
            "PUT",
            "/vm/guest-request",
            r#"{"request": "check"}"#.into(),
            204,
        ),
        ("PUT", "/vm/update/check", check, 500),
        ("PUT", "/vm/update/stage", update.clone(), 500),
        ("PUT", "/vm/update/prepare", update, 500),
        ("PUT", "/vm/update/cancel", String::new(), 409),
        ("PUT", "/vm/save", String::new(), 200),
        ("PUT", "/vm/handover/stage", String::new(), 200),
        ("PUT", "/vm/pause", String::new(), 204),
        (
            "PUT",
            "/vm/save",
            r#"{"export_path": "relative"}"#.into(),
            400,
        ),
        ("PUT", "/vm/save", save_to, 200),
        ("PUT", "/vm/handover", "{}".into(), 200),
        (
            "PUT",
            "/vm/handover/complete",
            r#"{"token": "x"}"#.into(),
            403,
        ),
        ("PUT", "/vm/shutdown", String::new(), 409),
        ("PUT", "/vm/resume", String::new(), 204),
        ("GET", "/vm", String::new(), 200),
        ("PUT", "/vm/pause", "[1]".into(), 400),
        ("PUT", "/vm/shutdown", r#"{"force": false}"#.into(), 204),
    ];
    let mut asked = BTreeSet::new();
    for (method, path, body, expected) in steps {
        let (status, phrase, reply) = api_with_phrase(&vm.socket, method, path, &body);
        let what = format!("{method} {path} {body}");
        assert_eq!(status, expected, "{what}: {reply}");
        assert_eq!(phrase, reason_phrase(status), "{what}");
        let pointer = format!(
            "/paths/{}/{}/responses/{status}",
            path.replace('/', "~1"),
            method.to_lowercase()
        );
        let documented = doc
            .pointer(&pointer)
            .unwrap_or_else(|| panic!("{what}: status {status} is not in the document"));
        match documented.pointer("/content/application~1json/schema") {
            Some(_) => {
                let instance: Value = serde_json::from_str(&reply)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {reply}"));
                let schema = format!("{pointer}/content/application~1json/schema");
                assert_valid(&doc, &schema, &instance, &what);
            }
            None => assert!(reply.is_empty(), "{what}: a body where none is documented"),
        }
        asked.insert((method.to_string(), path.to_string()));
    }
    assert_eq!(asked, served, "every route asked");
    assert!(vm.wait_exit().success());

    // Errors outside any route have the one error shape too (a second VMM: the first is shut
    // down).
    let dir = TestDir::new("api-openapi-errors");
    let vm = Vm::boot(&dir, "vm", &[]);
    for (method, path, expected) in [("GET", "/nope", 404), ("GET", "/vm/pause", 405)] {
        let (status, phrase, reply) = api_with_phrase(&vm.socket, method, path, "");
        assert_eq!(
            (status, phrase.as_str()),
            (expected, reason_phrase(expected))
        );
        let instance: Value = serde_json::from_str(&reply).expect("a JSON error");
        assert_valid(&doc, "/components/schemas/Error", &instance, path);
    }
    vm.client().shutdown(false).expect("PUT /vm/shutdown");
    assert!(vm.wait_exit().success());
}

#[test]
fn the_agents_messages_match_their_schemas() {
    use luvmm_liveupdate::agent::ledger::Claimant;
    use luvmm_liveupdate::agent::wire::{Reply, Request};
    use luvmm_liveupdate::agent::Ledger;
    use luvmm_liveupdate::luo::probe::HandlerStatus;

    let doc = document("liveupdate/agent-protocol.schema.json");
    let vm = || "vm-1".to_string();
    let requests = [
        Request::Subscribe {
            vm: vm(),
            launch: Some(json!({"serial": {"file": "/var/log/vm-1.log"}, "vcpus": 2})),
        },
        Request::Subscribe {
            vm: vm(),
            launch: None,
        },
        Request::Ready {
            vm: vm(),
            devices: vec!["0000:00:03.0".into()],
        },
        Request::Release { vm: vm() },
        Request::Status { vm: None },
        Request::Status { vm: Some(vm()) },
        Request::Update {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: Some("console=ttyS0 liveupdate=on".into()),
            deadline_s: Some(60),
        },
        Request::Update {
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            cmdline: None,
            deadline_s: None,
        },
        Request::Watch { vm: vm() },
        Request::Claim { vm: vm() },
        Request::Finished { vm: vm() },
        Request::Failed {
            vm: vm(),
            reason: "a device is missing".into(),
        },
        Request::Probe {},
        Request::Keep {
            vm: vm(),
            note: "{}".into(),
        },
        Request::Kept { vm: vm() },
    ];
    let mut ops = BTreeSet::new();
    for request in &requests {
        let instance = serde_json::to_value(request).expect("a request encodes");
        assert_valid(&doc, "/$defs/Request", &instance, "a request");
        ops.insert(instance["op"].as_str().unwrap_or_default().to_string());
    }
    // Every op the schema describes is one the agent parses, and the other way round.
    let described: BTreeSet<String> = doc["$defs"]["Request"]["oneOf"]
        .as_array()
        .expect("the requests")
        .iter()
        .filter_map(|r| r["properties"]["op"]["const"].as_str().map(str::to_string))
        .collect();
    assert_eq!(described, ops, "the schema's ops and the agent's differ");
    for request in doc["$defs"]["Request"]["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let mut least = json!({});
        for field in request["required"].as_array().into_iter().flatten() {
            let field = field.as_str().unwrap_or_default();
            least[field] = match field {
                "op" => request["properties"]["op"]["const"].clone(),
                "vm" => json!("vm-1"),
                _ => json!("x"),
            };
        }
        let parsed: Result<Request, _> = serde_json::from_value(least.clone());
        assert!(
            parsed.is_ok(),
            "{least}: the schema's least request is refused: {parsed:?}"
        );
    }
    // A name the agent refuses is refused by the schema too.
    let bad = json!({"op": "subscribe", "vm": "bad.id"});
    assert!(!validator(&doc, "/$defs/Request").is_valid(&bad));

    // Replies, with a ledger that went through every phase the agent writes.
    let mut ledger = Ledger::default();
    let claimant = Claimant {
        pid: 4242,
        started: 17,
    };
    for name in ["a", "b", "c"] {
        ledger.subscribe(name, 1_000).expect("subscribe");
        ledger
            .record_launch(name, json!({"api_socket": "/run/a.sock"}))
            .expect("launch");
        ledger
            .ready(name, 2_000, &["0000:00:03.0".to_string()])
            .expect("ready");
    }
    let mut ledger = ledger.after_kexec(9_000);
    ledger
        .claim("a", 9_100, claimant, &|_| true)
        .expect("claim a");
    ledger.finished("a", 9_500).expect("finish a");
    ledger
        .claim("b", 9_100, claimant, &|_| true)
        .expect("claim b");
    ledger
        .failed("b", "MSR 0x4c55564d: not listed", 9_200, claimant)
        .expect("fail b");
    ledger
        .claim("c", 9_300, claimant, &|_| true)
        .expect("claim c");
    let replies = [
        Reply {
            ledger: Some(ledger),
            ..Reply::ok()
        },
        Reply::error("no VM \"vm9\" is known to the agent".into()),
        Reply {
            session: Some("luvmm-vm-1".into()),
            ..Reply::ok()
        },
        Reply {
            handlers: Some(vec![
                HandlerStatus::Present,
                HandlerStatus::Absent,
                HandlerStatus::Unknown("EBADF".into()),
            ]),
            ..Reply::ok()
        },
        Reply {
            kept: Some("{}".into()),
            ..Reply::ok()
        },
    ];
    for reply in &replies {
        let instance = serde_json::to_value(reply).expect("a reply encodes");
        assert_valid(&doc, "/$defs/Reply", &instance, "a reply");
    }
}

/// What `update check`, `update run`, `update status` and `host-check` print with `--json`,
/// from the commands themselves where this host can run them.
#[test]
fn operator_reports_match_their_schemas() {
    let json_of = |args: &[&str]| -> (Option<i32>, Value) {
        let out = Command::new(luvmm_bin())
            .args(args)
            .output()
            .expect("run luvmm");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {stdout}"));
        (out.status.code(), report)
    };
    let (code, host) = json_of(&["host-check", "--json"]);
    assert_eq!(code, Some(3), "no LUO here: {host}");
    assert_report("HostCheckReport", &host);

    let dir = TestDir::new("interfaces-reports");
    let agent = dir.join("agent.sock");
    let agent = agent.to_str().expect("a UTF-8 path");
    let (code, check) = json_of(&[
        "update",
        "check",
        "--kernel",
        "/nonexistent",
        "--agent-socket",
        agent,
        "--json",
    ]);
    assert_eq!(code, Some(3), "{check}");
    assert_report("UpdateCheckReport", &check);

    let vm = Vm::boot(&dir, "vm", &[]);
    let named = format!("vm1={}", vm.socket.display());
    let (code, run) = json_of(&[
        "update",
        "run",
        "--kernel",
        "/nonexistent",
        "--vm",
        &named,
        "--vm-dir",
        dir.path().to_str().expect("a UTF-8 path"),
        "--agent-socket",
        agent,
        "--json",
    ]);
    assert_eq!(code, Some(3), "{run}");
    assert_report("UpdateRunReport", &run);

    // `update status` needs an agent after a kexec: its report, from the ledger such an agent
    // keeps, through the function the command prints.
    let mut ledger = luvmm_liveupdate::agent::Ledger::default();
    for vm in ["a", "b"] {
        ledger.subscribe(vm, 1_000).expect("subscribe");
        ledger.ready(vm, 2_000, &[]).expect("ready");
    }
    let mut ledger = ledger.after_kexec(9_000);
    let claimant = luvmm_liveupdate::agent::ledger::Claimant { pid: 1, started: 1 };
    ledger
        .claim("a", 9_100, claimant, &|_| true)
        .expect("claim");
    ledger.finished("a", 9_500).expect("finished");
    let status = luvmm::host_update::status::gather(&ledger);
    assert_report(
        "UpdateStatusReport",
        &serde_json::to_value(&status).expect("JSON"),
    );
}
