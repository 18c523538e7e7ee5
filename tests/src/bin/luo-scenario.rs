//! luvmm's LUO scenario, run inside the nested bed's L1 VM against a real LUO kernel.
//!
//! `luo-scenario stage1 --kernel K --initrd I` runs the checks that need no kexec, prepares two
//! sessions of seeded memfds, leaves a child holding them, and kexecs into `K` with
//! `luvmm.stage=2` added to the command line. `luo-scenario stage2` retrieves everything in
//! another order, verifies every byte, and finishes. Every result is one serial line:
//!
//!     LUVMM-L1 test NAME ok
//!     LUVMM-L1 test NAME FAIL what went wrong
//!     LUVMM-L1 figure NAME VALUE UNIT
//!     LUVMM-L1 stage N done pass=P fail=F

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use luvmm_liveupdate::agent::ledger::{AGENT_SESSION, LEDGER_TOKEN};
use luvmm_liveupdate::agent::AgentClient;
use luvmm_liveupdate::luo::uapi::{SessionArg, LIVEUPDATE_IOCTL_CREATE_SESSION};
use luvmm_liveupdate::luo::{kexec, LiveUpdate, LuoError, OutgoingSession, SessionName, Token};
use luvmm_tests::l1::{flag, line, Report};

/// Sessions carried across the kexec and the memfds in them: (session, token, MiB).
const CARRIED: &[(&str, Token, u64)] = &[
    ("luvmm-a", 0xa1, 2),
    ("luvmm-a", 0xa2, 3),
    ("luvmm-a", 0xa3, 4),
    ("luvmm-b", 0xb1, 4),
    ("luvmm-b", 0xb2, 2),
];
/// Preserved in `luvmm-b` but deliberately never retrieved: FINISH discards it.
const DISCARDED: (&str, Token, u64) = ("luvmm-b", 0xbd, 1);
/// A VM session whose agent ledger does not read back: the next kernel's agent must refuse
/// to start, then hand it out once the operator names the VM (`--rebuild-ledger`).
const ORPHAN: (&str, Token, u64) = ("luvmm-orphan", 0x100, 2);

fn name(s: &str) -> SessionName {
    SessionName::new(s).expect("scenario names are valid")
}

fn memfd(label: &str, bytes: u64) -> Result<File, String> {
    let cname = std::ffi::CString::new(label).map_err(|e| e.to_string())?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(bytes).map_err(|e| format!("ftruncate: {e}"))?;
    Ok(file)
}

/// The seeded pattern: one 64-bit word per 8 bytes, derived from the token and the offset.
fn pattern_word(token: Token, offset: u64) -> u64 {
    (offset ^ token.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// `bytes` as a buffer's length, for a file this process holds in memory.
fn capacity(bytes: u64) -> Result<usize, String> {
    usize::try_from(bytes).map_err(|_| format!("{bytes} bytes do not fit in memory"))
}

fn fill(file: &mut File, token: Token, bytes: u64) -> Result<(), String> {
    let mut buf = Vec::with_capacity(capacity(bytes)?);
    for offset in (0..bytes).step_by(8) {
        buf.extend_from_slice(&pattern_word(token, offset).to_le_bytes());
    }
    file.write_all(&buf).map_err(|e| format!("fill: {e}"))
}

fn verify(file: &mut File, token: Token, bytes: u64) -> Result<(), String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len != bytes {
        return Err(format!("token {token:#x}: size {len}, expected {bytes}"));
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(capacity(bytes)?);
    file.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    for (i, word) in buf.chunks_exact(8).enumerate() {
        let offset = i as u64 * 8;
        let found = u64::from_le_bytes(word.try_into().map_err(|_| "short word")?);
        if found != pattern_word(token, offset) {
            return Err(format!(
                "token {token:#x}: first bad byte at offset {offset:#x}"
            ));
        }
    }
    Ok(())
}

fn expect_err(
    what: &str,
    result: Result<impl Sized, LuoError>,
    matches: fn(&LuoError) -> bool,
) -> Result<(), String> {
    match result {
        Ok(_) => Err(format!("{what}: succeeded")),
        Err(e) if matches(&e) => Ok(()),
        Err(e) => Err(format!("{what}: wrong error: {e}")),
    }
}

/// Creates a session with a raw name, bypassing `SessionName`, to see what the kernel says.
fn raw_create(device: &File, name: &[u8]) -> i32 {
    let mut arg = SessionArg::new(&[]);
    let n = name.len().min(arg.name.len());
    arg.name[..n].copy_from_slice(&name[..n]);
    // SAFETY: CREATE_SESSION reads and writes a 72-byte SessionArg whose size field says so.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(device, LIVEUPDATE_IOCTL_CREATE_SESSION(), &mut arg)
    };
    if ret < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        // SAFETY: on success the kernel installed a session fd for us; close it.
        drop(unsafe { OwnedFd::from_raw_fd(arg.fd) });
        0
    }
}

fn without_kexec(report: &mut Report) -> Result<(), LuoError> {
    let device = LiveUpdate::open()?;
    report.check(
        "exclusive_open",
        expect_err("second open", LiveUpdate::open(), |e| {
            matches!(e, LuoError::Busy)
        }),
    );

    let first = device.create_session(&name("dup"))?;
    report.check(
        "duplicate_name",
        expect_err("second dup", device.create_session(&name("dup")), |e| {
            matches!(e, LuoError::SessionExists { .. })
        }),
    );
    first.cancel();

    report.check("typed_name_checks", {
        let empty = SessionName::new("");
        let long = SessionName::new(&"n".repeat(64));
        match (empty, long) {
            (Err(LuoError::InvalidName { .. }), Err(LuoError::InvalidName { .. })) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    let session = device.create_session(&name("checks"))?;
    let null = File::open("/dev/null").map_err(LuoError::Open)?;
    report.check(
        "preserve_dev_null",
        expect_err("/dev/null", session.preserve(null.as_fd(), 1), |e| {
            matches!(e, LuoError::NotPreservable { .. })
        }),
    );

    let mut once = memfd("once", 1 << 20).map_err(|e| LuoError::Open(std::io::Error::other(e)))?;
    fill(&mut once, 7, 1 << 20).map_err(|e| LuoError::Open(std::io::Error::other(e)))?;
    session.preserve(once.as_fd(), 7)?;
    report.check(
        "same_memfd_twice_one_session",
        expect_err("again", session.preserve(once.as_fd(), 8), |e| {
            matches!(e, LuoError::AlreadyPreserved { .. })
        }),
    );
    let other = device.create_session(&name("checks-2"))?;
    report.check(
        "same_memfd_two_sessions",
        expect_err("other session", other.preserve(once.as_fd(), 7), |e| {
            matches!(e, LuoError::AlreadyPreserved { .. })
        }),
    );
    let another = memfd("another", 4096).map_err(|e| LuoError::Open(std::io::Error::other(e)))?;
    report.check(
        "token_in_use",
        expect_err("token 7 again", session.preserve(another.as_fd(), 7), |e| {
            matches!(e, LuoError::TokenInUse { .. })
        }),
    );
    report.check(
        "retrieve_on_outgoing",
        expect_err("retrieve", session.retrieve(7), |e| {
            matches!(e, LuoError::Invalid { .. })
        }),
    );
    report.check(
        "frozen_while_preserved",
        match once.set_len(2 << 20) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
            other => Err(format!("resize of a preserved memfd: {other:?}")),
        },
    );
    report.check(
        "get_name",
        match session.kernel_name() {
            Ok(n) if n == "checks" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    other.cancel();
    session.cancel();
    report.check(
        "resizable_after_cancel",
        once.set_len(2 << 20).map_err(|e| e.to_string()),
    );
    report.check("contents_kept_after_cancel", verify_prefix(&mut once));

    // The kernel's own checks, past the typed ones: empty name and 64 bytes without a NUL.
    drop(device);
    let raw_device = File::options()
        .read(true)
        .write(true)
        .open("/dev/liveupdate")
        .map_err(LuoError::Open)?;
    report.check(
        "kernel_refuses_empty_name",
        match raw_create(&raw_device, b"") {
            libc::EINVAL => Ok(()),
            errno => Err(format!("errno {errno}")),
        },
    );
    report.check(
        "kernel_refuses_unterminated_name",
        match raw_create(&raw_device, &[b'n'; 64]) {
            libc::EINVAL => Ok(()),
            errno => Err(format!("errno {errno}")),
        },
    );
    Ok(())
}

fn verify_prefix(file: &mut File) -> Result<(), String> {
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut word = [0u8; 8];
    file.read_exact(&mut word).map_err(|e| e.to_string())?;
    (u64::from_le_bytes(word) == pattern_word(7, 0))
        .then_some(())
        .ok_or_else(|| "first word changed".to_string())
}

/// PRESERVE_FD time against memfd size: the preserve step pins and fills the whole file, so
/// it belongs before the guest is paused.
fn preserve_figures(device: &LiveUpdate, sizes_mib: &[u64]) -> Result<(), LuoError> {
    for &mib in sizes_mib {
        let file =
            memfd("figure", mib << 20).map_err(|e| LuoError::Open(std::io::Error::other(e)))?;
        let session = device.create_session(&name("figure"))?;
        let started = Instant::now();
        session.preserve(file.as_fd(), 1)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        line(&format!("figure preserve_fd_{mib}mib {ms:.2} ms"));
        session.cancel();
    }
    Ok(())
}

fn prepare_carried(device: &LiveUpdate) -> Result<Vec<OutgoingSession>, String> {
    let mut sessions: Vec<OutgoingSession> = Vec::new();
    let extra = [DISCARDED, ORPHAN];
    for &(session_name, token, mib) in CARRIED.iter().chain(&extra) {
        if !sessions.iter().any(|s| s.name().as_str() == session_name) {
            sessions.push(
                device
                    .create_session(&name(session_name))
                    .map_err(|e| e.to_string())?,
            );
        }
        let session = sessions
            .iter()
            .find(|s| s.name().as_str() == session_name)
            .ok_or("session vanished")?;
        let mut file = memfd(&format!("carried-{token:x}"), mib << 20)?;
        fill(&mut file, token, mib << 20)?;
        session
            .preserve(file.as_fd(), token)
            .map_err(|e| e.to_string())?;
        // LUO holds its own reference: our fd can go.
    }
    // The agent's own session, with a ledger that is not JSON.
    let agent = device
        .create_session(&name(AGENT_SESSION))
        .map_err(|e| e.to_string())?;
    let mut garbage = memfd("garbage-ledger", 4096)?;
    garbage
        .write_all(b"{\"vms\": [not json")
        .map_err(|e| e.to_string())?;
    agent
        .preserve(garbage.as_fd(), LEDGER_TOKEN)
        .map_err(|e| e.to_string())?;
    sessions.push(agent);
    Ok(sessions)
}

/// `luo-scenario claim-orphan --socket S`: claims the orphan VM's session from the agent
/// rebuilt by the operator, checks its memfd and finishes it.
fn claim_orphan(socket: &Path) -> i32 {
    let mut report = Report::new("");
    let agent = AgentClient::new(socket);
    let vm = &ORPHAN.0["luvmm-".len()..];
    let result = agent
        .claim(vm)
        .map_err(|e| e.to_string())
        .and_then(|session| {
            let fd = session.retrieve(ORPHAN.1).map_err(|e| e.to_string())?;
            verify(&mut File::from(fd), ORPHAN.1, ORPHAN.2 << 20)?;
            session.finish().map_err(|e| e.to_string())?;
            agent.finished(vm).map_err(|e| e.to_string())
        });
    let code = i32::from(result.is_err());
    report.check("nothing_lost_orphan_claimed_from_a_rebuilt_ledger", result);
    code
}

/// Leaves a child that holds the session fds until the machine is gone, as the luvmm agent
/// will: closing them would unpreserve everything.
fn hold_in_child(sessions: Vec<OutgoingSession>) -> Result<(), String> {
    let fds: Vec<OwnedFd> = sessions.into_iter().map(OutgoingSession::into_fd).collect();
    // SAFETY: fork() in a single-threaded program; the child only calls setsid and pause.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: plain syscalls without pointers.
            unsafe {
                libc::setsid();
                loop {
                    libc::pause();
                }
            }
        }
        _child => {
            drop(fds);
            Ok(())
        }
    }
}

fn stage1(kernel: PathBuf, initrd: PathBuf) -> i32 {
    let mut report = Report::new("");
    if let Err(e) = without_kexec(&mut report) {
        report.check("setup_without_kexec", Err(e.to_string()));
    }
    let device = match LiveUpdate::open() {
        Ok(d) => d,
        Err(e) => {
            report.check("open", Err(e.to_string()));
            return report.done(1);
        }
    };
    if let Err(e) = preserve_figures(&device, &[16, 64, 256, 1024]) {
        report.check("preserve_figures", Err(e.to_string()));
    }
    let sessions = match prepare_carried(&device) {
        Ok(s) => s,
        Err(e) => {
            report.check("prepare_carried", Err(e));
            return report.done(1);
        }
    };
    report.check("prepare_carried", Ok(()));
    drop(device);
    if let Err(e) = hold_in_child(sessions) {
        report.check("hold_sessions", Err(e));
        return report.done(1);
    }
    let cmdline = match kexec::current_cmdline() {
        Ok(c) => format!("{c} luvmm.stage=2"),
        Err(e) => {
            report.check("cmdline", Err(e.to_string()));
            return report.done(1);
        }
    };
    if let Err(e) = kexec::load(&kernel, Some(&initrd), Some(&cmdline)) {
        report.check("kexec_load", Err(e.to_string()));
        return report.done(1);
    }
    report.check("kexec_load", Ok(()));
    report.done(1);
    line("kexec now");
    match kexec::reboot_into_loaded() {
        Err(e) => {
            line(&format!("test kexec FAIL {e}"));
            1
        }
        Ok(never) => match never {},
    }
}

fn stage2() -> i32 {
    let mut report = Report::new("");
    line("stage 2 start");
    let device = match LiveUpdate::open() {
        Ok(d) => d,
        Err(e) => {
            report.check("open_after_kexec", Err(e.to_string()));
            return report.done(2);
        }
    };
    // The other order: session b before a, and each session's tokens backwards.
    let mut by_session: Vec<(&str, Vec<(Token, u64)>)> = Vec::new();
    for &(s, t, m) in CARRIED {
        match by_session.iter_mut().find(|(n, _)| *n == s) {
            Some((_, v)) => v.push((t, m)),
            None => by_session.push((s, vec![(t, m)])),
        }
    }
    by_session.reverse();
    for (session_name, mut files) in by_session {
        let session = match device.retrieve_session(&name(session_name)) {
            Ok(s) => s,
            Err(e) => {
                report.check(&format!("retrieve_{session_name}"), Err(e.to_string()));
                continue;
            }
        };
        report.check(&format!("retrieve_{session_name}"), Ok(()));
        files.reverse();
        for (token, mib) in files {
            let result = session
                .retrieve(token)
                .map_err(|e| e.to_string())
                .and_then(|fd| verify(&mut File::from(fd), token, mib << 20));
            report.check(&format!("verify_{session_name}_{token:x}"), result);
        }
        report.check(
            &format!("unknown_token_{session_name}"),
            expect_err("token 0xdead", session.retrieve(0xdead), |e| {
                matches!(e, LuoError::TokenNotFound { .. })
            }),
        );
        report.check(
            &format!("session_name_{session_name}"),
            match session.kernel_name() {
                Ok(n) if n == session_name => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        // luvmm-b still holds the memfd that nobody retrieves: FINISH must discard it.
        report.check(
            &format!("finish_{session_name}"),
            session.finish().map_err(|e| e.to_string()),
        );
        if session_name == DISCARDED.0 {
            // FINISH empties the session's file list, so the kernel answers ENOENT
            // (luo_retrieve_file on an empty list), which luvmm names TokenNotFound.
            report.check(
                "discarded_after_finish",
                expect_err(
                    "retrieve after FINISH",
                    session.retrieve(DISCARDED.1),
                    |e| matches!(e, LuoError::TokenNotFound { .. }),
                ),
            );
        }
        drop(session);
        report.check(
            &format!("retrieve_{session_name}_again"),
            expect_err(
                "second retrieve",
                device.retrieve_session(&name(session_name)),
                |e| {
                    matches!(
                        e,
                        LuoError::SessionNotFound { .. } | LuoError::SessionAlreadyRetrieved { .. }
                    )
                },
            ),
        );
    }
    report.done(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| flag(&args, name).map(PathBuf::from);
    let code = match args.first().map(String::as_str) {
        Some("stage1") => match (value("--kernel"), value("--initrd")) {
            (Some(kernel), Some(initrd)) => stage1(kernel, initrd),
            _ => {
                eprintln!("usage: luo-scenario stage1 --kernel K --initrd I");
                2
            }
        },
        Some("stage2") => stage2(),
        Some("claim-orphan") => match value("--socket") {
            Some(socket) => claim_orphan(&socket),
            None => {
                eprintln!("usage: luo-scenario claim-orphan --socket S");
                2
            }
        },
        _ => {
            eprintln!("usage: luo-scenario stage1 --kernel K --initrd I | stage2");
            2
        }
    };
    std::process::exit(code);
}
