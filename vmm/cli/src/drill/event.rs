//! What the drill's L1 half tells the host half: one JSON object per console line, after
//! [`PREFIX`]. The host stamps each line with its own clock when it arrives, which is the one
//! clock that runs on across the kexec.

use crate::preflight::CheckReport;
use luvmm_vmm::update::prepare::PrepareReport;
use luvmm_vmm::vmm::RestoreTimings;
use serde::{Deserialize, Serialize};

use super::watch::Opens;

/// Marks a drill line on the L1 console.
pub const PREFIX: &str = "LUVMM-DRILL ";

/// The timeline row of the L1 host itself (its boots, the agent, the kexec).
pub const HOST_ROW: &str = "host";

/// The L1 half reports what it saw; the host half judges it (see `report/`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// An L1 kernel started the drill's half (stage 1 is the first boot, N+1 follows the Nth
    /// kexec).
    Stage { stage: u32, kernel: String },
    /// `row` (a VM id, or [`HOST_ROW`]) entered `phase`; it lasts until the row's next phase.
    Phase { row: String, phase: String },
    /// The pre-flight before a round's prepare.
    Preflight { round: u32, report: CheckReport },
    /// A cancel-first round's cancelled prepare: the guest's checks around it and a device
    /// round after it.
    Cancelled {
        round: u32,
        vm: String,
        /// The VM's devices, in the order of its round lines.
        devices: Vec<String>,
        check_before: String,
        check_after: String,
        device_rounds: Vec<String>,
    },
    /// A VM is prepared and its guest paused; the kexec comes next.
    Prepared {
        round: u32,
        vm: String,
        check_before: String,
        report: PrepareReport,
        /// L1's `ShmemHugePages` (KiB) before the prepare: guest RAM in huge folios.
        shmem_huge_kib: u64,
    },
    /// A VM is restored after the kexec and its guest has checked itself and driven every
    /// device again.
    Restored {
        round: u32,
        vm: String,
        /// A Linux guest's checks while its driver recovered a device that came back reset.
        #[serde(default)]
        recovery_checks: Vec<String>,
        check_after: String,
        device_rounds: Vec<String>,
        timings: RestoreTimings,
        /// L1's `ShmemHugePages` (KiB) once the guest checked itself: what LUO kept huge.
        shmem_huge_kib: u64,
    },
    /// What the open watcher saw over one span of round `round`, so far: a later report of the
    /// same span replaces it (the span before the kexec reports as it goes, since the kexec
    /// ends it without warning).
    Watched {
        round: u32,
        span: WatchSpan,
        opens: Opens,
    },
    /// Something the drill could not do; the drill's verdict is then failed.
    Failure {
        round: u32,
        vm: Option<String>,
        what: String,
    },
    /// Every round is done.
    Done,
}

/// The two spans of an update the open watcher covers, one in each kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchSpan {
    /// From the first VM's prepare to the kexec, in the outgoing kernel.
    PrepareToKexec,
    /// From the agent's start to the last VM's resume, in the incoming kernel.
    AgentToResume,
}

impl Event {
    /// The console line for this event.
    pub fn to_line(&self) -> String {
        // Serializing these plain structs cannot fail; an empty object keeps the line parseable.
        format!(
            "{PREFIX}{}",
            serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
        )
    }

    /// The event in a console line, if it holds one.
    pub fn from_line(line: &str) -> Option<Event> {
        let (_, json) = line.split_once(PREFIX)?;
        serde_json::from_str(json.trim_end()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_cross_the_console_and_noise_does_not() {
        let event = Event::Failure {
            round: 2,
            vm: Some("vm1".into()),
            what: "prepare: refused".into(),
        };
        let line = format!("[   3.2] {}\r", event.to_line());
        let back = Event::from_line(&line).map(|e| e.to_line());
        assert_eq!(back, Some(event.to_line()));
        assert!(Event::from_line("LUVMM-L1 boot stage=1").is_none());
        assert!(Event::from_line("LUVMM-DRILL {\"event\":\"nope\"}").is_none());
    }
}
