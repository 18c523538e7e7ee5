//! `luvmm update status`: after the kexec, the outcome of the last host update, from the
//! agent's ledger (which crossed the kexec with the sessions): every VM back and when, or
//! which is not and why. For a fleet tool rolling hosts one by one, the exit status is the
//! verdict ([`Verdict::exit_code`]).

use std::time::Duration;

use luvmm_liveupdate::agent::{Ledger, VmPhase, VmRecord};
use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::update::before_claim::launch_record;
use luvmm_vmm::vmm::RestoreTimings;
use serde::{Deserialize, Serialize};

/// The last update on this host, as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No update since the agent's ledger began, and none under way: exit 0.
    NoUpdate,
    /// Every VM of the last update is restored and its session finished: exit 0.
    AllBack,
    /// An update is under way before its kexec (VMs staged or prepared): exit 3.
    UnderWay,
    /// After the kexec, some VM is not back yet, or its restore failed: exit 3.
    NotAllBack,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::NoUpdate | Verdict::AllBack => 0,
            Verdict::UnderWay | Verdict::NotAllBack => 3,
        }
    }
}

/// One VM of the last update.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmOutcome {
    pub vm: String,
    /// As the agent's ledger spells it (`finished`: back).
    pub phase: VmPhase,
    /// When its restore finished the session, the guest running again (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_at_ms: Option<u64>,
    /// From the kexec to that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_after_kexec_ms: Option<u64>,
    /// From the VM's `ready` (paused, everything preserved) to that: its blackout as the agent
    /// saw it, kexec and boot included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_back_ms: Option<u64>,
    /// Why it is not back, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
    /// How many restores claimed its session in this boot.
    pub claims: u32,
    /// Once back: its restore's phases, as its VMM reports them on the API socket its launch
    /// record names (absent when that VMM does not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreTimings>,
}

/// What `update status --json` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub verdict: Verdict,
    /// Kexecs the agent's ledger went through.
    pub updates: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kexec_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_started_at_ms: Option<u64>,
    pub vms: Vec<VmOutcome>,
}

/// How long `update status` waits for a VMM's answer.
const VMM_WAIT: Duration = Duration::from_secs(2);

/// VMMs asked at once by `update status`, so that a host of many VMs, some of them hung,
/// still gets its answer in a few `VMM_WAIT`s.
const ASKED_AT_ONCE: usize = 32;

/// The report for `ledger`, with each VM's restore phases asked of its VMM.
pub fn gather(ledger: &Ledger) -> StatusReport {
    let mut report = of(ledger);
    let mut asks: Vec<(&mut VmOutcome, &VmRecord)> = report
        .vms
        .iter_mut()
        .zip(&ledger.vms)
        .filter(|(outcome, _)| outcome.back_at_ms.is_some())
        .collect();
    let per_thread = asks.len().div_ceil(ASKED_AT_ONCE).max(1);
    std::thread::scope(|scope| {
        for chunk in asks.chunks_mut(per_thread) {
            scope.spawn(move || {
                for (outcome, record) in chunk.iter_mut() {
                    outcome.restore = restore_timings(ledger, &record.vm);
                }
            });
        }
    });
    report
}

/// VM `vm`'s restore phases, from its VMM on the API socket its launch record names.
fn restore_timings(ledger: &Ledger, vm: &str) -> Option<RestoreTimings> {
    let socket = launch_record(ledger, vm).ok().flatten()?.api_socket?;
    VmmClient::new(&socket)
        .with_timeout(VMM_WAIT)
        .status()
        .ok()
        .and_then(|s| s.restore_timings)
}

/// The report for `ledger` alone.
pub fn of(ledger: &Ledger) -> StatusReport {
    let kexec_at_ms = ledger.times_ms.get("kexec").copied();
    let vms: Vec<VmOutcome> = ledger.vms.iter().map(|r| outcome(r, kexec_at_ms)).collect();
    let before_kexec = |r: &VmRecord| matches!(r.phase, VmPhase::Subscribed | VmPhase::Ready);
    let verdict = if ledger.vms.iter().any(before_kexec) {
        Verdict::UnderWay
    } else if ledger.updates == 0 {
        Verdict::NoUpdate
    } else if vms.iter().all(|v| v.why_not.is_none()) {
        Verdict::AllBack
    } else {
        Verdict::NotAllBack
    };
    StatusReport {
        verdict,
        updates: ledger.updates,
        kexec_at_ms,
        agent_started_at_ms: ledger.times_ms.get("agent_started").copied(),
        vms,
    }
}

fn outcome(record: &VmRecord, kexec_at_ms: Option<u64>) -> VmOutcome {
    let back_at_ms = match record.phase {
        VmPhase::Finished => record.times_ms.get("finished").copied(),
        _ => None,
    };
    let since = |from: Option<u64>| Some(back_at_ms?.saturating_sub(from?));
    let why_not = match record.phase {
        VmPhase::Finished | VmPhase::Cancelled => None,
        VmPhase::Subscribed => Some("staged: its RAM is in its session, the guest runs".into()),
        VmPhase::Ready => Some("prepared: paused, waiting for the kexec".into()),
        VmPhase::Incoming => Some("no restore has claimed its session yet".into()),
        VmPhase::Claimed => Some(match record.claimant {
            Some(c) => format!("being restored (pid {})", c.pid),
            None => "being restored".into(),
        }),
        VmPhase::Failed => Some(format!(
            "its last restore failed: {}",
            record.failure.as_deref().unwrap_or("no reason given")
        )),
    };
    VmOutcome {
        vm: record.vm.clone(),
        phase: record.phase,
        back_at_ms,
        back_after_kexec_ms: since(kexec_at_ms),
        ready_to_back_ms: since(record.times_ms.get("ready").copied()),
        why_not,
        claims: record.claims,
        restore: None,
    }
}

impl StatusReport {
    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for vm in &self.vms {
            match (&vm.why_not, vm.back_after_kexec_ms) {
                (None, Some(ms)) => {
                    let restore = vm.restore.as_ref().map_or(String::new(), |t| {
                        format!(
                            " (its restore: claim and retrieve {:.1} ms, build {:.1} ms, \
                             FINISH {:.1} ms)",
                            t.gather_ms,
                            t.check_ms + t.vm_ms + t.memory_ms + t.devices_ms + t.vcpus_ms,
                            t.finish_ms.unwrap_or_default()
                        )
                    });
                    text.push_str(&format!(
                        "{}: back, {ms} ms after the kexec{restore}\n",
                        vm.vm
                    ))
                }
                (None, None) => text.push_str(&format!("{}: {}\n", vm.vm, phase_word(vm.phase))),
                (Some(why), _) => text.push_str(&format!("{}: not back: {why}\n", vm.vm)),
            }
        }
        let back = self.vms.iter().filter(|v| v.why_not.is_none()).count();
        text.push_str(&match self.verdict {
            Verdict::NoUpdate => "verdict: no host update on record\n".to_string(),
            Verdict::AllBack => format!("verdict: every VM is back ({back} of {back})\n"),
            Verdict::UnderWay => "verdict: an update is under way, before its kexec\n".into(),
            Verdict::NotAllBack => format!(
                "verdict: not every VM is back ({back} of {})\n",
                self.vms.len()
            ),
        });
        text
    }
}

fn phase_word(phase: VmPhase) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use luvmm_liveupdate::agent::ledger::Claimant;

    use super::*;

    fn record(vm: &str, phase: VmPhase, times: &[(&str, u64)]) -> VmRecord {
        VmRecord {
            vm: vm.into(),
            session: format!("luvmm-{vm}"),
            phase,
            times_ms: times.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            devices: Vec::new(),
            claimant: None,
            failure: None,
            claims: 1,
            launch: None,
        }
    }

    fn ledger(vms: Vec<VmRecord>, updates: u32) -> Ledger {
        Ledger {
            vms,
            updates,
            times_ms: BTreeMap::from([("kexec".to_string(), 10_000)]),
        }
    }

    #[test]
    fn every_vm_finished_is_all_back_with_its_times() {
        let report = of(&ledger(
            vec![
                record(
                    "a",
                    VmPhase::Finished,
                    &[("ready", 9_000), ("finished", 16_500)],
                ),
                record(
                    "b",
                    VmPhase::Finished,
                    &[("ready", 9_100), ("finished", 17_000)],
                ),
            ],
            1,
        ));
        assert_eq!(report.verdict, Verdict::AllBack);
        assert_eq!(report.verdict.exit_code(), 0);
        assert_eq!(report.vms[0].back_after_kexec_ms, Some(6_500));
        assert_eq!(report.vms[1].ready_to_back_ms, Some(7_900));
        assert!(report.to_text().contains("every VM is back (2 of 2)"));
    }

    #[test]
    fn a_vm_not_back_names_why_and_fails_the_verdict() {
        let mut failed = record("b", VmPhase::Failed, &[]);
        failed.failure = Some("MSR 0x4c55564d: saved, and this host's KVM does not list it".into());
        let mut claimed = record("c", VmPhase::Claimed, &[]);
        claimed.claimant = Some(Claimant {
            pid: 4242,
            started: 1,
        });
        let report = of(&ledger(
            vec![
                record("a", VmPhase::Finished, &[("finished", 12_000)]),
                failed,
                claimed,
                record("d", VmPhase::Incoming, &[]),
            ],
            1,
        ));
        assert_eq!(report.verdict, Verdict::NotAllBack);
        assert_eq!(report.verdict.exit_code(), 3);
        let text = report.to_text();
        assert!(
            text.contains("b: not back: its last restore failed: MSR 0x4c55564d"),
            "{text}"
        );
        assert!(
            text.contains("c: not back: being restored (pid 4242)"),
            "{text}"
        );
        assert!(
            text.contains("d: not back: no restore has claimed its session yet"),
            "{text}"
        );
        assert!(text.contains("not every VM is back (1 of 4)"), "{text}");
    }

    #[test]
    fn a_host_of_1000_vms_is_reported_whole() {
        let mut vms: Vec<VmRecord> = (0..1000)
            .map(|i| {
                let mut r = record(
                    &format!("vm-{i:04}"),
                    VmPhase::Finished,
                    &[("ready", 9_000), ("finished", 12_000 + i)],
                );
                r.launch =
                    Some(serde_json::json!({"api_socket": format!("/nonexistent/{i}.sock")}));
                r
            })
            .collect();
        vms[999].phase = VmPhase::Incoming;
        let report = gather(&ledger(vms, 1));
        assert_eq!(report.vms.len(), 1000);
        assert_eq!(report.verdict, Verdict::NotAllBack);
        assert_eq!(report.vms[998].back_after_kexec_ms, Some(2_998));
        assert!(
            report.vms.iter().all(|v| v.restore.is_none()),
            "no VMM answers here"
        );
        assert!(report
            .to_text()
            .contains("not every VM is back (999 of 1000)"));
    }

    #[test]
    fn before_any_kexec_there_is_no_update_or_one_under_way() {
        assert_eq!(of(&Ledger::default()).verdict, Verdict::NoUpdate);
        let report = of(&ledger(vec![record("a", VmPhase::Ready, &[])], 0));
        assert_eq!(report.verdict, Verdict::UnderWay);
        assert_eq!(report.verdict.exit_code(), 3);
    }
}
