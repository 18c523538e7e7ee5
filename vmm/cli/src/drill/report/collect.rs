//! Gathers L1's events, as the host's clock stamps them, into the report.

use std::collections::BTreeMap;
use std::path::Path;

use luvmm_vmm::update::prepare::PrepareReport;

use super::verdict::{judge_guest, judge_rounds, GuestJudgement};
use super::{DeviceResult, DrillReport, RoundReport, Span, VmResult};
use crate::drill::bed::{L1Run, Line};
use crate::drill::event::{Event, WatchSpan, HOST_ROW};
use crate::drill::guest::{round_identity, round_works};
use crate::drill::Plan;

/// Gathers L1's events as they arrive.
pub struct Collector {
    plan: Plan,
    kernels: BTreeMap<u32, String>,
    rounds: BTreeMap<(u32, &'static str), RoundReport>,
    prepared: BTreeMap<(u32, String), (String, PrepareReport, u64)>,
    kexec_asked: BTreeMap<u32, f64>,
    open_spans: BTreeMap<String, (String, f64)>,
    timeline: Vec<Span>,
    failures: Vec<String>,
    stage: u32,
    done: bool,
    last_at: f64,
}

impl Collector {
    pub fn new(plan: Plan) -> Collector {
        Collector {
            plan,
            kernels: BTreeMap::new(),
            rounds: BTreeMap::new(),
            prepared: BTreeMap::new(),
            kexec_asked: BTreeMap::new(),
            open_spans: BTreeMap::new(),
            timeline: Vec::new(),
            failures: Vec::new(),
            stage: 0,
            done: false,
            last_at: 0.0,
        }
    }

    fn round(&mut self, round: u32, kind: &'static str) -> &mut RoundReport {
        self.rounds
            .entry((round, kind))
            .or_insert_with(|| RoundReport {
                round,
                kind: kind.to_string(),
                ..RoundReport::default()
            })
    }

    fn close_span(&mut self, row: &str, at: f64) {
        if let Some((phase, start_s)) = self.open_spans.remove(row) {
            self.timeline.push(Span {
                row: row.to_string(),
                phase,
                start_s,
                end_s: at,
            });
        }
    }

    /// Takes one console line; returns the progress text when it moved the drill on.
    pub fn feed(&mut self, line: &Line) -> Option<String> {
        self.last_at = line.at;
        let event = Event::from_line(&line.text)?;
        let at = line.at;
        let progress = match event {
            Event::Stage { stage, kernel } => {
                self.stage = stage;
                self.kernels.insert(stage, kernel.clone());
                // Whatever ran before the kexec ended with it.
                let rows: Vec<String> = self.open_spans.keys().cloned().collect();
                for row in rows {
                    self.close_span(&row, at);
                }
                if stage == 1 {
                    self.timeline.push(Span {
                        row: HOST_ROW.to_string(),
                        phase: "boot".to_string(),
                        start_s: 0.0,
                        end_s: at,
                    });
                }
                if let Some(asked) = self.kexec_asked.get(&(stage - 1)).copied() {
                    self.round(stage - 1, "update").kexec_boot_ms = Some((at - asked) * 1e3);
                }
                format!("stage {stage}: L1 runs {kernel}")
            }
            Event::Phase { row, phase } => {
                self.close_span(&row, at);
                if phase == "kexec" {
                    self.kexec_asked.insert(self.stage, at);
                }
                let text = format!("stage {} · {row}: {phase}", self.stage);
                if phase != "done" {
                    self.open_spans.insert(row, (phase, at));
                }
                text
            }
            Event::Preflight { round, report } => {
                if !report.blockers.is_empty() {
                    self.failures.push(format!(
                        "round {round}: the pre-flight blocks the update: {}",
                        luvmm_vmm::update::check::Blocker::join(&report.blockers)
                    ));
                }
                self.round(round, "update").preflight = Some(report);
                format!("round {round}: pre-flight done")
            }
            Event::Cancelled {
                round,
                vm,
                devices,
                check_before,
                check_after,
                device_rounds,
            } => {
                // A VM prepared before the update was called off is not waiting for a restore.
                self.prepared.remove(&(round, vm.clone()));
                let judged = judge_guest(&self.plan, false, &check_before, &[], &check_after);
                let kept = devices.into_iter().map(|bdf| (bdf, false));
                let devices = device_results(kept, &device_rounds, &judged);
                let result = VmResult {
                    vm: vm.clone(),
                    guest_check: judged.check,
                    guest_clock_gap_ms: judged.clock_gap_ms,
                    guest_clock_back_ms: judged.clock_back_ms,
                    linux: judged.linux,
                    check_before,
                    check_after,
                    devices,
                    ..VmResult::default()
                };
                self.round(round, "cancel").vms.push(result);
                format!("round {round}: {vm} cancelled and checked")
            }
            Event::Prepared {
                round,
                vm,
                check_before,
                report,
                shmem_huge_kib,
            } => {
                let text = format!("round {round}: {vm} prepared");
                let preserved = report.devices.iter().filter(|d| d.preserved);
                let preserved: Vec<String> = preserved.map(|d| d.bdf.clone()).collect();
                self.round(round, "update")
                    .preserved_devices
                    .extend(preserved);
                self.prepared
                    .insert((round, vm), (check_before, report, shmem_huge_kib));
                text
            }
            Event::Restored {
                round,
                vm,
                recovery_checks,
                check_after,
                device_rounds,
                timings,
                shmem_huge_kib,
            } => {
                let Some((check_before, prepare, huge_before)) =
                    self.prepared.remove(&(round, vm.clone()))
                else {
                    self.failures
                        .push(format!("round {round}: {vm} restored but never prepared"));
                    return None;
                };
                let mut phases_ms = prepare.phases_ms.clone();
                for (name, ms) in [
                    ("restore_gather", Some(timings.gather_ms)),
                    ("retrieve_ram", timings.retrieve_ram_ms),
                    ("restore_check", Some(timings.check_ms)),
                    ("restore_vm", Some(timings.vm_ms)),
                    ("restore_memory", Some(timings.memory_ms)),
                    ("restore_devices", Some(timings.devices_ms)),
                    ("ioas_map", timings.ioas_map_ms),
                    ("restore_vcpus", Some(timings.vcpus_ms)),
                    ("finish", timings.finish_ms),
                    ("blackout", timings.blackout_ms),
                ] {
                    if let Some(ms) = ms {
                        phases_ms.insert(name.to_string(), ms);
                    }
                }
                let judged = judge_guest(
                    &self.plan,
                    self.plan.vfio_handler.resets_devices(),
                    &check_before,
                    &recovery_checks,
                    &check_after,
                );
                let prepared = prepare.devices.iter().map(|d| (d.bdf.clone(), d.preserved));
                let devices = device_results(prepared, &device_rounds, &judged);
                let result = VmResult {
                    vm: vm.clone(),
                    guest_check: judged.check,
                    guest_clock_gap_ms: judged.clock_gap_ms,
                    guest_clock_back_ms: judged.clock_back_ms,
                    linux: judged.linux,
                    recovery_checks,
                    check_before,
                    check_after,
                    devices,
                    phases_ms,
                    shmem_huge_kib_before: Some(huge_before),
                    shmem_huge_kib_after: Some(shmem_huge_kib),
                };
                self.round(round, "update").vms.push(result);
                format!("round {round}: {vm} restored and checked")
            }
            Event::Watched { round, span, opens } => {
                let text = format!(
                    "round {round}: the open watcher saw {} VFIO device or group open(s) {}",
                    opens.device_opens(),
                    match span {
                        WatchSpan::PrepareToKexec => "since the prepare",
                        WatchSpan::AgentToResume => "since the agent's start",
                    }
                );
                let report = self.round(round, "update");
                match span {
                    WatchSpan::PrepareToKexec => report.opens_prepare_to_kexec = Some(opens),
                    WatchSpan::AgentToResume => report.opens_agent_to_resume = Some(opens),
                }
                text
            }
            Event::Failure { round, vm, what } => {
                let who = vm.map(|v| format!(" {v}")).unwrap_or_default();
                self.failures.push(format!("round {round}{who}: {what}"));
                format!("round {round}{who}: FAILED: {what}")
            }
            Event::Done => {
                self.done = true;
                "done".to_string()
            }
        };
        Some(format!("drill [{at:7.1} s] {progress}"))
    }

    /// The verdict once L1 has powered off (or was killed).
    pub fn finish(mut self, run: &L1Run, console: &Path) -> DrillReport {
        let end = self.last_at;
        let rows: Vec<String> = self.open_spans.keys().cloned().collect();
        for row in rows {
            self.close_span(&row, end);
        }
        let mut failures = std::mem::take(&mut self.failures);
        if !self.done && (failures.is_empty() || run.timed_out) {
            // Nothing said why: L1's own last words do.
            let how = if run.timed_out {
                "timed out"
            } else {
                "stopped"
            };
            failures.push(format!(
                "L1 {how} before the drill finished (stage {}); console: {}\n{}",
                self.stage,
                console.display(),
                run.tail(25)
            ));
        }
        for (round, vm) in self.prepared.keys() {
            failures.push(format!(
                "round {round}: {vm} was prepared but never restored"
            ));
        }
        let mut rounds: Vec<RoundReport> = self.rounds.into_values().collect();
        for round in &mut rounds {
            let watched = round.clone();
            for device in round.vms.iter_mut().flat_map(|vm| &mut vm.devices) {
                device.normal_opens = watched.normal_opens(&device.bdf);
            }
        }
        judge_rounds(&self.plan, &rounds, &mut failures);
        DrillReport {
            ok: failures.is_empty(),
            kernel: self.kernels.get(&1).cloned().unwrap_or_default(),
            next_kernel: self.kernels.get(&2).cloned().unwrap_or_default(),
            plan: self.plan,
            rounds,
            failures,
            timeline: self.timeline,
            total_s: end,
        }
    }
}

/// Each device (BDF, preserved) with the guest's round line for it (the guest sees them in
/// the order they were given); its normal opens are counted once the round's watches are in.
/// A Linux guest has no round lines: its device works when its block loop went on.
fn device_results(
    devices: impl Iterator<Item = (String, bool)>,
    round_lines: &[String],
    judged: &GuestJudgement,
) -> Vec<DeviceResult> {
    devices
        .enumerate()
        .map(|(i, (bdf, preserved))| {
            let line = round_lines.get(i).cloned().unwrap_or_default();
            let works = match judged.linux {
                Some(_) => judged.io_went_on,
                None => round_works(&line),
            };
            DeviceResult {
                normal_opens: 0,
                bdf,
                preserved,
                works,
                same_device: round_identity(&line),
                round_line: line,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::held;

    #[test]
    fn the_kexec_is_timed_and_each_device_gets_its_line_and_opens() {
        let report = held();
        let round = &report.rounds[0];
        assert_eq!(round.kexec_boot_ms, Some(10_000.0));
        assert_eq!(round.vms[0].devices[0].normal_opens, 1);
        assert!(round.vms[0].devices[0].works);
    }
}
