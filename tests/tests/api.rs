//! The control API: every endpoint, and every way a client can get it wrong, with the VMM
//! still serving and the guest still running afterwards.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use luvmm_tests::{read_reply, run_luvmm, TestDir, Vm, TIMEOUT};
use luvmm_vmm::vmm::VmPhase;

#[test]
fn every_endpoint_answers() {
    let dir = TestDir::new("api-endpoints");
    let vm = Vm::boot(&dir, "vm", &[]);
    let mode = std::fs::metadata(&vm.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "API socket mode {mode:o}");

    // The typed client accepts only each endpoint's own success status (200 with JSON, else
    // 204), so every `expect` below asserts the status too.
    let client = vm.client();
    let status = client.status().expect("GET /vm");
    assert_eq!(status.phase, VmPhase::Running);
    assert_eq!(status.vcpus, 1);
    assert_eq!(status.memory.regions[0].size, 64u64 << 20);

    client.check().expect("PUT /vm/check");
    client.pause().expect("PUT /vm/pause");
    client.pause().expect("pause is idempotent");
    // An empty JSON object is no parameters, as no body is.
    assert_eq!(vm.api("PUT", "/vm/resume", "{}").0, 204);
    // Handover needs a current saved state.
    let refused = client
        .handover()
        .expect_err("a handover without a saved state");
    assert_eq!(refused.status(), Some(409), "{refused}");
    client.save(None).expect("PUT /vm/save");
    client.resume().expect("PUT /vm/resume");
    assert!(vm.check().ok);

    client.shutdown(false).expect("PUT /vm/shutdown");
    let socket = vm.socket.clone();
    assert!(vm.wait_exit().success());
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn bad_requests_get_http_errors_and_the_vmm_keeps_running() {
    let dir = TestDir::new("api-errors");
    let vm = Vm::boot(&dir, "vm", &[]);
    let cases: &[(&str, &str, &str, u16)] = &[
        ("PUT", "/vm/save", "{not json", 400),
        ("PUT", "/vm/save", r#"{"export_path": 7}"#, 400),
        ("PUT", "/vm/save", r#"{"unknown": 1}"#, 400),
        ("PUT", "/vm/pause", "[]", 400),
        ("GET", "/nowhere", "", 404),
        ("PUT", "/vm/reboot", "", 404),
        ("GET", "/vm/pause", "", 405),
        ("POST", "/vm", "", 405),
        ("DELETE", "/vm/save", "", 405),
    ];
    for &(method, path, body, expected) in cases {
        let (status, reply) = vm.api(method, path, body);
        assert_eq!(status, expected, "{method} {path} {body:?}: {reply}");
        let value: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert!(value["error"].is_string(), "{reply}");
    }

    // A wrong type names its field, in JSON's words.
    let (status, reply) = vm.api("PUT", "/vm/save", r#"{"export_path": 7}"#);
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply.contains("export_path: expected path string, found integer `7`"),
        "{reply}"
    );

    // Not HTTP at all.
    let mut raw = UnixStream::connect(&vm.socket).unwrap();
    raw.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    assert_eq!(read_reply(&mut raw).0, 400);

    // Too large.
    let mut big = UnixStream::connect(&vm.socket).unwrap();
    big.write_all(b"PUT /vm/save HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut big).0, 413);

    assert_eq!(vm.phase(), VmPhase::Running);
    assert!(vm.check().ok);
}

#[test]
fn a_whole_request_is_served_before_an_unfinished_one() {
    let dir = TestDir::new("api-whole-first");
    let vm = Vm::boot(&dir, "vm", &[]);
    let mut first = UnixStream::connect(&vm.socket).unwrap();
    first.write_all(b"PUT /vm/pause HTTP/1.1\r\n").unwrap();

    // The second client's request is whole: it is answered while the first one's is not,
    // and so before the pause the first one asks for.
    let mut second = UnixStream::connect(&vm.socket).unwrap();
    second.set_read_timeout(Some(TIMEOUT)).unwrap();
    second.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    let (status, body) = read_reply(&mut second);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(value["phase"], "running", "{body}");

    first.write_all(b"Host: x\r\n\r\n").unwrap();
    let (status, body) = read_reply(&mut first);
    assert_eq!(status, 204, "{body}");
    assert_eq!(vm.phase(), VmPhase::Paused);
    vm.client().resume().expect("PUT /vm/resume");

    // A client that connects and leaves without a word does not hold anyone up.
    drop(UnixStream::connect(&vm.socket).unwrap());
    assert_eq!(vm.phase(), VmPhase::Running);
}

/// Idle clients hold nobody up: with as many connected and silent as the VMM lets wait, `ctl`
/// is answered within a timeout shorter than theirs; one more client gets the VMM's 503
/// text, not a broken pipe; each idle one gets 408 at its deadline.
#[test]
fn idle_clients_hold_nobody_up() {
    let dir = TestDir::new("api-idle-clients");
    let vm = Vm::boot(&dir, "vm", &[]);
    let socket = vm.socket.to_str().unwrap();
    let mut idle: Vec<UnixStream> = (0..15)
        .map(|_| {
            let mut stream = UnixStream::connect(&vm.socket).unwrap();
            stream.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
            stream
        })
        .collect();
    let (status, stderr) = run_luvmm(&["ctl", "--socket", socket, "--timeout", "2", "status"]);
    assert!(status.success(), "ctl behind 15 idle clients: {stderr}");

    idle.push(UnixStream::connect(&vm.socket).unwrap());
    let (status, stderr) = run_luvmm(&["ctl", "--socket", socket, "--timeout", "2", "status"]);
    assert!(!status.success());
    assert!(
        stderr.contains("503") && stderr.contains("too many API clients waiting; retry"),
        "{stderr}"
    );
    assert!(!stderr.contains("Broken pipe"), "{stderr}");

    for stream in &mut idle {
        let (status, body) = read_reply(stream);
        assert_eq!(status, 408, "{body}");
        assert!(body.contains("no complete request within 5 s"), "{body}");
    }
    assert!(vm.check().ok);
}

/// A request cut short by a half-close is answered with what was missing; a second request
/// on the same connection is refused with its own reply, never dropped unanswered.
#[test]
fn half_closed_and_pipelined_requests_are_answered() {
    let dir = TestDir::new("api-half-close");
    let vm = Vm::boot(&dir, "vm", &[]);

    let mut short = UnixStream::connect(&vm.socket).unwrap();
    short
        .write_all(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}")
        .unwrap();
    short.shutdown(std::net::Shutdown::Write).unwrap();
    let (status, body) = read_reply(&mut short);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("the client closed its side after") && body.contains("Content-Length"),
        "{body}"
    );

    let mut pipelined = UnixStream::connect(&vm.socket).unwrap();
    pipelined
        .write_all(b"GET /vm HTTP/1.1\r\n\r\nPUT /vm/pause HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut pipelined, &mut text).unwrap();
    let statuses: Vec<&str> = text
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|reply| reply.split_whitespace().next())
        .collect();
    assert_eq!(statuses, ["200", "400"], "{text}");
    assert!(text.contains("one request per connection"), "{text}");
    // The second request was refused, not done.
    assert_eq!(vm.phase(), VmPhase::Running);
}

#[test]
fn the_ctl_client_gives_up_on_a_silent_vmm() {
    let dir = TestDir::new("api-ctl-timeout");
    let socket = dir.join("silent.sock");
    // Accepts and reads, never answers.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let holder = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let (status, stderr) = run_luvmm(&[
        "ctl",
        "--socket",
        socket.to_str().unwrap(),
        "--timeout",
        "1",
        "status",
    ]);
    assert!(!status.success());
    assert!(stderr.contains("no reply from"), "{stderr}");
    assert!(stderr.contains("within 1 s"), "{stderr}");
    drop(holder.join().unwrap());
    let (status, stderr) = run_luvmm(&["ctl", "--socket", "x", "--timeout", "0", "status"]);
    assert!(!status.success());
    assert!(stderr.contains("is not a number of seconds"), "{stderr}");
}

#[test]
fn ctl_says_a_request_to_a_paused_guest_waits_for_the_resume() {
    let dir = TestDir::new("api-ctl-paused");
    let vm = Vm::boot(&dir, "vm", &[]);
    let socket = vm.socket.to_str().unwrap();
    let (status, stderr) = run_luvmm(&["ctl", "--socket", socket, "check"]);
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("paused"), "{stderr}");
    vm.client().pause().expect("PUT /vm/pause");
    let (status, stderr) = run_luvmm(&["ctl", "--socket", socket, "check"]);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("the VM is paused: the guest answers once it is resumed"),
        "{stderr}"
    );
    vm.client().resume().expect("PUT /vm/resume");
    assert!(vm.check().ok);
}

#[test]
fn ctl_drives_the_vmm_from_the_command_line() {
    let dir = TestDir::new("api-ctl");
    let vm = Vm::boot(&dir, "vm", &[]);
    let socket = vm.socket.to_str().unwrap();
    for request in ["status", "pause", "resume", "check"] {
        let (status, stderr) = run_luvmm(&["ctl", "--socket", socket, request]);
        assert!(status.success(), "ctl {request}: {stderr}");
    }
    let (status, stderr) = run_luvmm(&["ctl", "--socket", "/nonexistent.sock", "status"]);
    assert!(!status.success());
    assert!(
        stderr.contains("cannot connect to /nonexistent.sock"),
        "{stderr}"
    );
    let (status, _) = run_luvmm(&["ctl", "--socket", socket, "shutdown"]);
    assert!(status.success());
    assert!(vm.wait_exit().success());
}

#[test]
fn a_socket_path_in_use_is_refused() {
    let dir = TestDir::new("api-socket-in-use");
    let vm = Vm::boot(&dir, "vm", &[]);
    let (status, stderr) = run_luvmm(&[
        "run",
        "--payload",
        luvmm_tests::payload().to_str().unwrap(),
        "--api-socket",
        vm.socket.to_str().unwrap(),
        "--serial",
        "none",
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("a process is serving on it already"),
        "{stderr}"
    );
    assert_eq!(vm.phase(), VmPhase::Running);
}

#[test]
fn the_update_preflight_names_every_blocker_and_exits_3() {
    let dir = TestDir::new("preflight");
    let agent = dir.join("agent.sock");
    let out = std::process::Command::new(luvmm_tests::luvmm_bin())
        .args([
            "update",
            "check",
            "--kernel",
            "/nonexistent/bzImage",
            "--json",
        ])
        .arg("--agent-socket")
        .arg(&agent)
        .output()
        .expect("run luvmm update check");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let blockers = report["blockers"].as_array().expect("a list of blockers");
    let by_kind = |kind: &str| {
        blockers
            .iter()
            .find(|b| b["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind:?} blocker in {blockers:#?}"))
    };
    let reason = |kind: &str| by_kind(kind)["reason"].as_str().unwrap_or("").to_string();
    assert!(reason("no_agent").contains("no luvmm agent is listening on"));
    assert!(reason("kernel_load").contains("cannot open kernel /nonexistent/bzImage"));
    assert_eq!(
        by_kind("unknown_handlers")["kernel"],
        "/nonexistent/bzImage"
    );
}

#[test]
fn nothing_lost_a_restore_with_an_unusable_output_is_refused_before_the_claim() {
    let dir = TestDir::new("session-bad-outputs");
    let agent = dir.join("agent.sock");
    let bad_serial = dir.join("no/such/dir/a.log");
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let restore = |extra: &[&str]| {
        let mut args = vec!["restore", "--session", "vm1", "--agent-socket"];
        args.push(agent.to_str().unwrap());
        args.extend_from_slice(extra);
        run_luvmm(&args)
    };
    // No agent listens: had anything been asked of it, the error would say so.
    for (extra, expected) in [
        (
            ["--serial", bad_serial.to_str().unwrap()],
            "cannot be opened for writing",
        ),
        (
            ["--api-socket", taken.to_str().unwrap()],
            "something that is not a socket is there already",
        ),
    ] {
        let (status, stderr) = restore(&extra);
        assert!(!status.success());
        assert!(
            stderr.contains("refused before anything was taken") && stderr.contains(expected),
            "{stderr}"
        );
        assert!(!stderr.contains("agent"), "the agent was asked: {stderr}");
    }
}

#[test]
fn a_restore_from_a_session_needs_the_agent() {
    let dir = TestDir::new("session-no-agent");
    let agent = dir.join("agent.sock");
    let (status, stderr) = run_luvmm(&[
        "restore",
        "--session",
        "vm1",
        "--agent-socket",
        agent.to_str().unwrap(),
        "--agent-wait",
        "0",
        "--serial",
        "none",
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("asked the agent for 0 s: no luvmm agent is listening on"),
        "{stderr}"
    );
    // A prepare needs it too, and leaves the guest running.
    let vm = Vm::boot(&dir, "vm", &[]);
    let refused = vm
        .client()
        .prepare_update("vm1", &agent, false)
        .expect_err("a prepare without an agent");
    assert_eq!(refused.status(), Some(500), "{refused}");
    assert!(
        refused.to_string().contains("no luvmm agent is listening"),
        "{refused}"
    );
    assert_eq!(vm.phase(), VmPhase::Running);
    assert!(vm.check().ok);
    let refused = vm
        .client()
        .cancel_update()
        .expect_err("a cancel without a prepare");
    assert_eq!(refused.status(), Some(409), "{refused}");
}
