use std::collections::BTreeMap;

use luvmm_vmm::vmm::{RestoreTimings, VmPhase as VmmPhase};

use super::*;

/// A host where each VM's unit and VMM are what the test says.
struct FakeHost {
    kexecs: u32,
    units: BTreeMap<String, UnitState>,
    vmms: BTreeMap<PathBuf, VmStatus>,
}

impl SystemdHost for FakeHost {
    fn kexecs(&self) -> u32 {
        self.kexecs
    }
    fn booted_at_ms(&self) -> u64 {
        100_000
    }
    fn unit(&self, vm: &str) -> Option<UnitState> {
        self.units.get(vm).cloned()
    }
    fn vmm(&self, socket: &Path) -> Option<VmStatus> {
        self.vmms.get(socket).cloned()
    }
}

fn unit(active: &str, stored: u32, restarts: u32) -> UnitState {
    UnitState {
        active: active.into(),
        stored,
        restarts,
    }
}

/// A VMM's status: restored by a live update (FINISH done) and resumed at `resumed`, or
/// booted afresh.
fn vmm(restored: Option<u64>) -> VmStatus {
    let restore_timings = restored.map(|at| RestoreTimings {
        finish_ms: Some(1.5),
        blackout_ms: Some(12_345.6),
        resumed_at_ms: Some(at),
        ..RestoreTimings::default()
    });
    VmStatus {
        phase: VmmPhase::Running,
        vcpus: 1,
        memory: luvmm_resources::layout::MemoryLayout {
            regions: Vec::new(),
        },
        state_current: false,
        restore_timings,
        moved_to_pid: None,
        update_vm_id: None,
    }
}

fn vms(ids: &[&str]) -> Vec<(String, Option<PathBuf>)> {
    ids.iter()
        .map(|id| {
            (
                id.to_string(),
                Some(PathBuf::from(format!("/run/{id}.sock"))),
            )
        })
        .collect()
}

fn host(kexecs: u32, units: &[(&str, UnitState)], vmms: &[(&str, VmStatus)]) -> FakeHost {
    FakeHost {
        kexecs,
        units: units
            .iter()
            .map(|(v, u)| (v.to_string(), u.clone()))
            .collect(),
        vmms: vmms
            .iter()
            .map(|(v, s)| (PathBuf::from(format!("/run/{v}.sock")), s.clone()))
            .collect(),
    }
}

#[test]
fn every_vm_restored_from_its_session_is_back_with_its_times() {
    let report = gather(
        &vms(&["a", "b"]),
        &host(
            1,
            &[("a", unit("active", 0, 0)), ("b", unit("active", 0, 0))],
            &[("a", vmm(Some(107_000))), ("b", vmm(Some(108_500)))],
        ),
    );
    assert_eq!(report.verdict, Verdict::AllBack);
    assert_eq!(report.vms[0].back_after_kexec_ms, Some(7_000));
    assert_eq!(report.vms[1].back_after_kexec_ms, Some(8_500));
    assert_eq!(report.vms[0].ready_to_back_ms, Some(12_345));
    assert!(report.to_text().contains("every VM is back (2 of 2)"));
}

#[test]
fn a_vm_booted_afresh_or_a_failed_unit_is_not_back_and_says_why() {
    let report = gather(
        &vms(&["a", "b", "c", "d"]),
        &host(
            1,
            &[
                ("a", unit("active", 0, 0)),
                ("b", unit("failed", 1, 5)),
                ("c", unit("inactive", 1, 0)),
                ("d", unit("inactive", 0, 0)),
            ],
            &[("a", vmm(None))],
        ),
    );
    assert_eq!(report.verdict, Verdict::NotAllBack);
    let why: Vec<&str> = report
        .vms
        .iter()
        .map(|v| v.why_not.as_deref().unwrap_or("back"))
        .collect();
    assert!(why[0].contains("booted afresh"), "{why:?}");
    assert!(why[1].contains("failed after 5 restart(s)"), "{why:?}");
    assert!(why[1].contains("session waits"), "{why:?}");
    assert!(why[2].contains("is inactive; its session waits"), "{why:?}");
    assert!(why[3].contains("nothing of it came back"), "{why:?}");
    assert_eq!(report.verdict.exit_code(), 3);
}

#[test]
fn without_a_kexec_there_is_no_update_to_tell_of() {
    let report = gather(
        &vms(&["a"]),
        &host(0, &[("a", unit("active", 0, 0))], &[("a", vmm(None))]),
    );
    assert_eq!(report.verdict, Verdict::NoUpdate);
    assert_eq!(report.verdict.exit_code(), 0);
    assert!(report.vms.is_empty() && report.kexec_at_ms.is_none());
}
