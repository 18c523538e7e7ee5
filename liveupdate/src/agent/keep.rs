//! How the agent keeps its ledger within a boot. The previous kernel's agent session can be
//! retrieved once per boot, and closing it finishes it, so an agent killed after the kexec
//! could never read that ledger again: each agent writes the ledger to a file beside its
//! socket (`/run` is a tmpfs: it dies with the boot, as it should), stamped with the boot, and
//! an agent started again in the same boot takes the ledger from there. What it must never do
//! is start over with an empty ledger while VM sessions wait in the kernel: nobody could
//! claim them, and LUO has no call that lists them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent::ledger::{session_of, Claimant, Ledger, LedgerError, VmPhase, VmRecord};

/// What the previous kernel left for the agent.
pub enum Previous {
    /// No agent session: no kexec with a ledger led to this boot (or it was finished).
    None,
    /// The agent session, and whether its ledger reads back.
    Preserved(std::io::Result<Ledger>),
    /// The agent session was retrieved earlier in this boot, by an agent now gone.
    AlreadyTaken,
}

/// The agent cannot know which VM sessions wait in the kernel.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error(
        "the previous kernel's agent ledger does not read back; the VM sessions it listed \
         (luvmm-<vm id>) still wait in the kernel, untouched, but LUO cannot list them: start \
         the agent with --rebuild-ledger VM[,VM...] naming the VMs to restore"
    )]
    Unreadable(#[source] std::io::Error),
    #[error(
        "the previous kernel's agent ledger was taken earlier in this boot and {file} holds no \
         copy of it; VM sessions (luvmm-<vm id>) may still wait in the kernel: start the agent \
         with --rebuild-ledger VM[,VM...] naming the VMs to restore"
    )]
    Gone { file: PathBuf },
    #[error("--rebuild-ledger is for a ledger that cannot be read; this one reads back")]
    RebuildNotNeeded,
    #[error("--rebuild-ledger")]
    Rebuild(#[source] LedgerError),
}

/// The ledger file: the ledger, and the boot it belongs to.
#[derive(Debug, Serialize, Deserialize)]
pub struct Saved {
    boot_id: String,
    ledger: Kept,
}

/// What the file keeps. Once the previous kernel's ledger is read (or found unreadable) its
/// session is finished and gone from the kernel, so the file is the only record left of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    Ledger(Ledger),
    /// The previous kernel's ledger did not read back: every later start must refuse too.
    Unreadable {
        reason: String,
    },
}

/// Where the agent on `socket` keeps its ledger: beside it.
pub fn ledger_file(socket: &Path) -> PathBuf {
    socket.with_extension("ledger")
}

/// This boot's id: a ledger file from another boot is not this boot's.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// The ledger file of this boot, if there is one that reads.
pub fn load(path: &Path) -> Option<Kept> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<Saved>(&bytes) {
        Ok(saved) if saved.boot_id == boot_id() => Some(saved.ledger),
        Ok(_) => None,
        Err(e) => {
            log::warn!(
                "agent: the ledger file {} does not read: {e}",
                path.display()
            );
            None
        }
    }
}

/// Writes the ledger file (whole, or not at all: a new file renamed over the old), 0600.
pub fn save(path: &Path, kept: &Kept) -> std::io::Result<()> {
    let saved = Saved {
        boot_id: boot_id(),
        ledger: kept.clone(),
    };
    let json = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The ledger the agent starts with, and how it got it (for the log).
pub fn take_over(
    previous: Previous,
    saved: Option<Kept>,
    rebuild: &[String],
    file: &Path,
    now_ms: u64,
) -> Result<(Ledger, &'static str), TakeOverError> {
    let rebuilding = !rebuild.is_empty();
    match (previous, saved) {
        (Previous::Preserved(Ok(_)), _) | (_, Some(Kept::Ledger(_))) if rebuilding => {
            Err(TakeOverError::RebuildNotNeeded)
        }
        (Previous::Preserved(Ok(ledger)), _) => Ok((
            ledger.after_kexec(now_ms),
            "took the ledger over from the previous kernel",
        )),
        (Previous::Preserved(Err(e)), _) if !rebuilding => Err(TakeOverError::Unreadable(e)),
        (_, Some(Kept::Unreadable { reason })) if !rebuilding => {
            Err(TakeOverError::Unreadable(std::io::Error::other(reason)))
        }
        (_, Some(Kept::Ledger(ledger))) => Ok((
            restarted(ledger, now_ms),
            "started again in this boot: took the ledger from its file",
        )),
        (Previous::AlreadyTaken, None) if !rebuilding => Err(TakeOverError::Gone {
            file: file.to_path_buf(),
        }),
        (Previous::None, None) if !rebuilding => {
            let mut ledger = Ledger::default();
            ledger.times_ms.insert("agent_started".into(), now_ms);
            Ok((ledger, "no previous kernel's ledger: starting a new one"))
        }
        (_, _) => Ok((
            rebuilt(rebuild, now_ms)?,
            "rebuilt the ledger from the VMs the operator named",
        )),
    }
}

/// The ledger an agent killed in this boot left: the sessions from before the kexec are
/// what it can vouch for. A VM that subscribed to a next update since had its session's agent
/// copy close with that agent, so it must subscribe again.
fn restarted(mut ledger: Ledger, now_ms: u64) -> Ledger {
    let before = ledger.vms.len();
    ledger.vms.retain(|r| {
        matches!(
            r.phase,
            VmPhase::Incoming | VmPhase::Claimed | VmPhase::Failed | VmPhase::Finished
        )
    });
    if ledger.vms.len() != before {
        log::warn!(
            "agent: {} VM(s) preparing a next update lost the agent's copy of their session \
             with the last agent: they must prepare again",
            before - ledger.vms.len()
        );
    }
    ledger.times_ms.insert("agent_restarted".into(), now_ms);
    ledger
}

/// A ledger of `vms`, each with its session incoming, as the operator says.
fn rebuilt(vms: &[String], now_ms: u64) -> Result<Ledger, TakeOverError> {
    let mut ledger = Ledger::default();
    for vm in vms {
        let session = session_of(vm).map_err(TakeOverError::Rebuild)?;
        ledger.vms.push(VmRecord {
            vm: vm.clone(),
            session: session.to_string(),
            phase: VmPhase::Incoming,
            times_ms: [("rebuilt".to_string(), now_ms)].into(),
            devices: Vec::new(),
            claimant: None,
            failure: None,
            claims: 0,
            launch: None,
        });
    }
    ledger.updates = 1;
    ledger.times_ms.insert("ledger_rebuilt".into(), now_ms);
    Ok(ledger)
}

/// When process `pid` started, in clock ticks after boot (`/proc/PID/stat`, field 22).
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that claimed a session still runs (and is the same process).
pub fn alive(claimant: &Claimant) -> bool {
    process_start(claimant.pid) == Some(claimant.started)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_ledger() -> Ledger {
        let mut ledger = Ledger::default();
        for vm in ["vm1", "vm2"] {
            ledger.subscribe(vm, 1).unwrap();
            ledger.ready(vm, 2, &[]).unwrap();
        }
        ledger
    }

    #[test]
    fn nothing_lost_a_garbage_ledger_is_never_replaced_by_an_empty_one() {
        let file = Path::new("/nonexistent/agent.ledger");
        let garbage = || Previous::Preserved(Err(std::io::Error::other("not JSON")));
        let err = take_over(garbage(), None, &[], file, 5).unwrap_err();
        assert!(matches!(err, TakeOverError::Unreadable(_)), "{err}");
        assert!(err.to_string().contains("--rebuild-ledger"));
        // Started again in the same boot: the failed start finished the session (the kernel
        // no longer has it), and only the file remembers.
        let unreadable = Kept::Unreadable {
            reason: "not JSON".into(),
        };
        let err = take_over(Previous::None, Some(unreadable.clone()), &[], file, 6).unwrap_err();
        assert!(matches!(err, TakeOverError::Unreadable(_)), "{err}");
        let err = take_over(Previous::AlreadyTaken, None, &[], file, 6).unwrap_err();
        assert!(matches!(err, TakeOverError::Gone { .. }), "{err}");
        // The operator names the VMs: their sessions are handed out.
        let rebuild = ["vm1".to_string(), "vm2".to_string()];
        let (mut ledger, _) =
            take_over(Previous::None, Some(unreadable), &rebuild, file, 7).unwrap();
        assert!(ledger.vms.iter().all(|r| r.phase == VmPhase::Incoming));
        let me = Claimant { pid: 1, started: 1 };
        assert_eq!(
            ledger.claim("vm2", 8, me, &|_| true).unwrap().as_str(),
            "luvmm-vm2"
        );
        assert!(take_over(Previous::AlreadyTaken, None, &["a.b".into()], file, 9).is_err());
        let readable = Previous::Preserved(Ok(ready_ledger()));
        assert!(matches!(
            take_over(readable, None, &rebuild, file, 9),
            Err(TakeOverError::RebuildNotNeeded)
        ));
    }

    #[test]
    fn nothing_lost_an_agent_started_again_takes_the_ledger_from_its_file() {
        let dir = std::env::temp_dir().join(format!("luvmm-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = ledger_file(&dir.join("agent.sock"));
        let (mut ledger, _) =
            take_over(Previous::Preserved(Ok(ready_ledger())), None, &[], &file, 3).unwrap();
        let me = Claimant { pid: 1, started: 1 };
        ledger.claim("vm1", 4, me, &|_| true).unwrap();
        // A VM of this boot preparing the next update: its session died with the agent.
        ledger.subscribe("vm3", 5).unwrap();
        save(&file, &Kept::Ledger(ledger.clone())).unwrap();
        let saved = load(&file);
        let (again, how) = take_over(Previous::None, saved, &[], &file, 6).unwrap();
        assert!(how.contains("again"), "{how}");
        let phases: Vec<(&str, VmPhase)> =
            again.vms.iter().map(|r| (r.vm.as_str(), r.phase)).collect();
        assert_eq!(
            phases,
            [("vm1", VmPhase::Claimed), ("vm2", VmPhase::Incoming)]
        );
        // Another boot's file is not this boot's ledger.
        let other = serde_json::to_vec(&Saved {
            boot_id: "another boot".into(),
            ledger: Kept::Ledger(ledger),
        })
        .unwrap();
        std::fs::write(&file, other).unwrap();
        assert!(load(&file).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_claimant_is_alive_while_its_process_runs() {
        let me = std::process::id();
        let started = process_start(me).expect("this process has a start time");
        assert!(alive(&Claimant { pid: me, started }));
        assert!(!alive(&Claimant {
            pid: me,
            started: started + 1
        }));
        assert!(!alive(&Claimant {
            pid: u32::MAX,
            started
        }));
    }
}
