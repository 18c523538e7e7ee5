//! Plays VMMs against a real `luvmm agent serve` in the nested bed's L1, across a real kexec.
//!
//! `agent-scenario stage1 --socket S --kernel K --initrd I`: subscribes VMs, checks the
//! refusals, preserves a seeded memfd in VM `vm1`'s session, says it is ready, **closes its
//! own copy of the session** (a VMM killed after it is ready: the agent's copy must carry the
//! update), readies VM `vmbad` with a RAM memfd and a garbage state memfd, and asks the agent
//! for the kexec into `K` with `luvmm.stage=2`.
//! `agent-scenario stage2 --socket S`: the next kernel's agent must know `vm1` from the ledger
//! it preserved; the session is claimed (once), the memfd retrieved and checked byte for
//! byte, and the session finished. `hold` and `noisy` play a VMM that never gets ready, and
//! one whose device's freeze refuses the kexec (see each). Every result is one line:
//!
//!     LUVMM-L1 test agent_NAME ok | FAIL why
//!     LUVMM-L1 stage N done pass=P fail=F

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use luvmm_liveupdate::agent::{AgentClient, Ledger, VmPhase};
use luvmm_liveupdate::luo::kexec;
use luvmm_resources::state::{RAM_TOKEN_BASE, STATE_TOKEN};
use luvmm_tests::l1::{flag, line, Report};
use luvmm_tests::vfio_raw::{open_bound, Iommu};
use vmm_sys_util::eventfd::EventFd;

const TOKEN: u64 = 7;
const MIB: usize = 1 << 20;
const SEED: u64 = 0x5eed_a6e7;

/// The pattern word at 8-byte index `i`.
fn word(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ SEED
}

fn seeded_memfd() -> std::io::Result<File> {
    let fd = nix::sys::memfd::memfd_create("agent-scenario", nix::sys::memfd::MFdFlags::empty())?;
    let mut file = File::from(fd);
    let bytes: Vec<u8> = (0..4 * MIB / 8)
        .flat_map(|i| word(i).to_le_bytes())
        .collect();
    file.write_all(&bytes)?;
    Ok(file)
}

fn verify(file: &mut File) -> Result<(), String> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    file.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() != 4 * MIB {
        return Err(format!("{} bytes, not {}", bytes.len(), 4 * MIB));
    }
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        if got != word(i) {
            return Err(format!("word {i}: {got:#x}, not {:#x}", word(i)));
        }
    }
    Ok(())
}

/// VM `vmbad`, ready with a RAM memfd and a state memfd that is not a luvmm state: after the
/// kexec `luvmm restore --session vmbad` must refuse it having retrieved nothing but the
/// state (agent.sh counts the kernel's memfd retrieves).
fn corrupt_vm(agent: &AgentClient) -> Result<luvmm_liveupdate::luo::OutgoingSession, String> {
    let session = agent.subscribe("vmbad", None).map_err(|e| e.to_string())?;
    let fd = nix::sys::memfd::memfd_create("state", nix::sys::memfd::MFdFlags::empty())
        .map_err(|e| e.to_string())?;
    let mut state = File::from(fd);
    state.write_all(&[0xa5; 4096]).map_err(|e| e.to_string())?;
    let ram = seeded_memfd().map_err(|e| e.to_string())?;
    session
        .preserve(state.as_fd(), STATE_TOKEN)
        .and_then(|_| session.preserve(ram.as_fd(), RAM_TOKEN_BASE))
        .map_err(|e| e.to_string())?;
    agent.ready("vmbad", &[]).map_err(|e| e.to_string())?;
    Ok(session)
}

/// `result` must be an error whose message holds `needle`.
fn refused<T, E: std::fmt::Display>(result: Result<T, E>, needle: &str) -> Result<(), String> {
    match result {
        Ok(_) => Err(format!("accepted; wanted an error saying {needle:?}")),
        Err(e) if e.to_string().contains(needle) => Ok(()),
        Err(e) => Err(format!("refused with {e}; wanted {needle:?}")),
    }
}

fn stage1(socket: &Path, kernel: &Path, initrd: &Path) -> i32 {
    let mut report = Report::new("agent_");
    let agent = AgentClient::new(socket);
    let session = match agent.subscribe("vm1", None) {
        Ok(session) => session,
        Err(e) => {
            report.check("subscribe", Err(e.to_string()));
            return report.done(1);
        }
    };
    report.check(
        "subscribe",
        match session.kernel_name() {
            Ok(name) if name == "luvmm-vm1" => Ok(()),
            other => Err(format!("the kernel names the session {other:?}")),
        },
    );
    report.check(
        "second_subscribe_refused",
        refused(
            agent.subscribe("vm1", None),
            "session luvmm-vm1 is already handed out",
        ),
    );
    report.check(
        "bad_vm_id_refused",
        refused(agent.subscribe("a.b", None), "invalid VM id"),
    );
    report.check(
        "release",
        agent
            .subscribe("vm2", None)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                drop(s);
                agent.release("vm2").map_err(|e| e.to_string())
            }),
    );
    report.check(
        "update_waits_for_every_vm",
        refused(
            agent.update(kernel, Some(initrd), None, None),
            "[\"vm1\"] are not ready",
        ),
    );
    let preserved = seeded_memfd().map_err(|e| e.to_string()).and_then(|memfd| {
        session
            .preserve(memfd.as_fd(), TOKEN)
            .map_err(|e| e.to_string())
    });
    report.check("preserve", preserved);
    report.check("ready", agent.ready("vm1", &[]).map_err(|e| e.to_string()));
    let corrupt = corrupt_vm(&agent);
    report.check(
        "corrupt_vm_ready",
        corrupt.as_ref().map(drop).map_err(|e| e.clone()),
    );
    report.check(
        "status_before",
        match agent.status() {
            Ok(ledger)
                if vm_phases(&ledger)
                    == [
                        ("vm1".to_string(), VmPhase::Ready),
                        ("vmbad".to_string(), VmPhase::Ready),
                    ] =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        },
    );
    // The VMMs die after saying they are ready: their copies of the sessions close with them.
    drop(session);
    drop(corrupt);
    let cmdline = match kexec::current_cmdline() {
        Ok(c) => format!("{c} luvmm.stage=2"),
        Err(e) => {
            report.check("cmdline", Err(e.to_string()));
            return report.done(1);
        }
    };
    let code = report.done(1);
    line("kexec now");
    if let Err(e) = agent.update(kernel, Some(initrd), Some(&cmdline), None) {
        line(&format!("test agent_update FAIL {e}"));
        return 1;
    }
    // The agent replies, then jumps: the kexec takes this process too.
    std::thread::sleep(std::time::Duration::from_secs(60));
    line("test agent_update FAIL still running a minute after the agent took the update");
    code.max(1)
}

fn vm_phases(ledger: &Ledger) -> Vec<(String, VmPhase)> {
    ledger.vms.iter().map(|r| (r.vm.clone(), r.phase)).collect()
}

fn stage2(socket: &Path) -> i32 {
    let mut report = Report::new("agent_");
    let agent = AgentClient::new(socket);
    let ledger = agent.status();
    report.check(
        "ledger_crossed_the_kexec",
        match &ledger {
            Ok(l)
                if l.updates == 1
                    && vm_phases(l)
                        == [
                            ("vm1".into(), VmPhase::Incoming),
                            ("vmbad".into(), VmPhase::Incoming),
                        ] =>
            {
                let vm = &l.vms[0].times_ms;
                let agent_times = &l.times_ms;
                match (
                    vm.get("subscribed"),
                    vm.get("ready"),
                    agent_times.get("kexec"),
                    agent_times.get("agent_started"),
                ) {
                    (Some(s), Some(r), Some(k), Some(a)) if s <= r && r <= k && k <= a => Ok(()),
                    other => Err(format!("phase times out of order: {other:?}")),
                }
            }
            other => Err(format!("{other:?}")),
        },
    );
    match agent.claim("vm1") {
        Ok(session) => {
            report.check("claim", Ok(()));
            let retrieved = session
                .retrieve(TOKEN)
                .map_err(|e| e.to_string())
                .and_then(|fd| verify(&mut File::from(fd)));
            report.check("memfd_intact", retrieved);
            report.check("finish", session.finish().map_err(|e| e.to_string()));
        }
        Err(e) => report.check("claim", Err(e.to_string())),
    }
    report.check(
        "second_claim_refused",
        refused(
            agent.claim("vm1"),
            "session luvmm-vm1 is claimed by a restore still running",
        ),
    );
    report.check(
        "unknown_vm_refused",
        refused(agent.claim("vm9"), "no VM \"vm9\" is known to the agent"),
    );
    report.check(
        "no_agent",
        refused(
            AgentClient::new(Path::new("/tmp/nobody.sock")).status(),
            "no luvmm agent is listening on /tmp/nobody.sock",
        ),
    );
    report.done(2)
}

/// `agent-scenario hold --socket S --vm ID --seconds N`: a VMM that subscribes and never gets
/// ready (it holds the session N seconds, then exits).
fn hold(socket: &Path, args: &[String]) -> i32 {
    let value = |name: &str| flag(args, name);
    let (Some(vm), Some(seconds)) = (
        value("--vm"),
        value("--seconds").and_then(|s| s.parse().ok()),
    ) else {
        eprintln!("usage: agent-scenario hold --socket S --vm ID --seconds N");
        return 2;
    };
    match AgentClient::new(socket).subscribe(vm, None) {
        Ok(session) => {
            println!("holding {}", session.name());
            std::thread::sleep(std::time::Duration::from_secs(seconds));
            0
        }
        Err(e) => {
            eprintln!("agent-scenario hold: {e}");
            1
        }
    }
}

/// VM `--vm` subscribes, preserves device `--vfio` (bound to an iommufd, with MSI on) in its
/// session and says it is ready, then holds it all for `--seconds`: at the kexec that device's
/// freeze fails, so `reboot()` fails after the kernel froze every VM that subscribed earlier.
fn noisy(socket: &Path, args: &[String]) -> i32 {
    let value = |name: &str| flag(args, name);
    let (Some(vm), Some(bdf), Some(seconds)) = (
        value("--vm"),
        value("--vfio"),
        value("--seconds").and_then(|s| s.parse().ok()),
    ) else {
        eprintln!("usage: agent-scenario noisy --socket S --vm ID --vfio BDF --seconds N");
        return 2;
    };
    let agent = AgentClient::new(socket);
    let held = (|| {
        let session = agent.subscribe(vm, None).map_err(|e| e.to_string())?;
        let iommu = Iommu::new().map_err(|e| format!("iommufd: {e}"))?;
        let device = open_bound(bdf, &iommu).map_err(|e| format!("open {bdf}: {e}"))?;
        let msi = EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?;
        device
            .set_msi(Some(&msi))
            .map_err(|e| format!("MSI on: {e}"))?;
        session
            .preserve(device.fd(), TOKEN)
            .map_err(|e| format!("preserve {bdf}: {e}"))?;
        agent
            .ready(vm, &[bdf.to_string()])
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((session, device, msi, iommu))
    })();
    match held {
        Ok(held) => {
            println!("ready {} with {bdf} and its MSI on", held.0.name());
            std::thread::sleep(std::time::Duration::from_secs(seconds));
            0
        }
        Err(e) => {
            eprintln!("agent-scenario noisy: {e}");
            1
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| flag(&args, name).map(PathBuf::from);
    let code = match (
        args.first().map(String::as_str),
        value("--socket"),
        value("--kernel"),
        value("--initrd"),
    ) {
        (Some("stage1"), Some(socket), Some(kernel), Some(initrd)) => {
            stage1(&socket, &kernel, &initrd)
        }
        (Some("stage2"), Some(socket), _, _) => stage2(&socket),
        (Some("hold"), Some(socket), _, _) => hold(&socket, &args),
        (Some("noisy"), Some(socket), _, _) => noisy(&socket, &args),
        _ => {
            eprintln!(
                "usage: agent-scenario stage1 --socket S --kernel K --initrd I | stage2 --socket S \
                 | hold --socket S --vm ID --seconds N \
                 | noisy --socket S --vm ID --vfio BDF --seconds N"
            );
            2
        }
    };
    std::process::exit(code);
}
