//! The drill's verdict: L1's events, stamped with the host's clock, judged by the guests' own
//! evidence and the open watcher, as a table, one JSON object and an SVG timeline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use luvmm_vmm::update::check::CheckReport;
use luvmm_vmm::update::prepare::PrepareReport;
use serde::{Deserialize, Serialize};

use super::bed::{L1Run, Line};
use super::event::{Event, HOST_ROW};
use super::guest::{round_works, GuestCheck};
use super::watch::Opens;
use super::{Plan, VfioHandler};

/// The whole drill. `ok` is true only when every guest check passed, every device worked
/// after every update, and no preserved device was opened the normal way.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillReport {
    pub ok: bool,
    pub plan: Plan,
    /// `uname -r` of the first L1 kernel and of the one each round kexecs into.
    pub kernel: String,
    pub next_kernel: String,
    pub rounds: Vec<RoundReport>,
    /// Why `ok` is false, when it is.
    pub failures: Vec<String>,
    /// Every phase of every row (the L1 host, each VM), in host seconds since QEMU started.
    pub timeline: Vec<Span>,
    pub total_s: f64,
}

/// One round: an update (prepare, kexec, restore), or the cancelled prepare of
/// `--cancel-first`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    /// `update` or `cancel`.
    pub kind: String,
    /// From the agent's kexec request to the next kernel's drill start, by the host's clock.
    pub kexec_boot_ms: Option<f64>,
    pub preflight: Option<CheckReport>,
    pub vms: Vec<VmResult>,
}

/// One VM in one round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmResult {
    pub vm: String,
    /// `ok`, or why the guest's own evidence says something was lost: its `LOST` line, or a
    /// check that did not go on (seed, check counter, heartbeats).
    pub guest_check: String,
    pub check_before: String,
    pub check_after: String,
    pub devices: Vec<DeviceResult>,
    /// Milliseconds per phase as luvmm measured them: the prepare's (`preserve_ram`, `pause`,
    /// `quiesce_devices`, `preserve_devices`, `save_state`, `preserve_state`, `ready`) and the
    /// restore's (`restore_gather`, `restore_check`, `restore_vm`, `restore_memory`, `restore_devices`,
    /// `restore_vcpus`, `finish`; `ioas_map` is the part of `restore_devices` that maps guest
    /// RAM into the new IOAS, `retrieve_ram` the part of `restore_gather` that retrieves the
    /// RAM memfds), and `blackout`: the guest's, from its pause before the
    /// kexec to its resume after it, by L1's wall clock.
    pub phases_ms: BTreeMap<String, f64>,
    /// What the open watcher saw while this VM was restored.
    pub opens: Opens,
    /// L1's `ShmemHugePages` in KiB (all VMs) before the prepare and after the restore: how
    /// much guest RAM was in huge folios, and how much of it LUO brought back huge.
    pub shmem_huge_kib_before: Option<u64>,
    pub shmem_huge_kib_after: Option<u64>,
}

/// One passthrough device of a VM in one round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceResult {
    pub bdf: String,
    /// The kernel preserved it: after the kexec it could come only from the session.
    pub preserved: bool,
    /// Opens of its cdev or group node the watcher saw during the restore.
    pub normal_opens: u32,
    /// The guest's DMA round trip with its interrupt through it worked afterwards.
    pub works: bool,
    /// The guest's round line for it.
    pub round_line: String,
}

/// The prepare's phases while the guest is paused: the VMM's part of the blackout before the
/// kexec.
pub const PAUSED_PHASES: [&str; 6] = [
    "pause",
    "quiesce_devices",
    "preserve_devices",
    "save_state",
    "preserve_state",
    "ready",
];

/// The restore's phases: the VMM's part of the blackout after the kexec.
const RESTORE_PHASES: [&str; 7] = [
    "restore_gather",
    "restore_check",
    "restore_vm",
    "restore_memory",
    "restore_devices",
    "restore_vcpus",
    "finish",
];

/// One phase of one timeline row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Span {
    pub row: String,
    pub phase: String,
    pub start_s: f64,
    pub end_s: f64,
}

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
                        report.blockers.join("; ")
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
                let kept = devices.into_iter().map(|bdf| (bdf, false));
                let devices = device_results(kept, &device_rounds, &Opens::default());
                let result = VmResult {
                    vm: vm.clone(),
                    guest_check: judge(&check_before, &check_after),
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
                self.prepared
                    .insert((round, vm), (check_before, report, shmem_huge_kib));
                text
            }
            Event::Restored {
                round,
                vm,
                check_after,
                device_rounds,
                timings,
                opens,
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
                let prepared = prepare.devices.iter().map(|d| (d.bdf.clone(), d.preserved));
                let devices = device_results(prepared, &device_rounds, &opens);
                let result = VmResult {
                    vm: vm.clone(),
                    guest_check: judge(&check_before, &check_after),
                    check_before,
                    check_after,
                    devices,
                    phases_ms,
                    opens,
                    shmem_huge_kib_before: Some(huge_before),
                    shmem_huge_kib_after: Some(shmem_huge_kib),
                };
                self.round(round, "update").vms.push(result);
                format!("round {round}: {vm} restored and checked")
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
        let rounds: Vec<RoundReport> = self.rounds.into_values().collect();
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
/// the order they were given) and the watcher's count of its normal opens.
fn device_results(
    devices: impl Iterator<Item = (String, bool)>,
    round_lines: &[String],
    opens: &Opens,
) -> Vec<DeviceResult> {
    devices
        .enumerate()
        .map(|(i, (bdf, preserved))| {
            let line = round_lines.get(i).cloned().unwrap_or_default();
            DeviceResult {
                normal_opens: opens.per_device.get(&bdf).copied().unwrap_or(0),
                bdf,
                preserved,
                works: round_works(&line),
                round_line: line,
            }
        })
        .collect()
}

/// `ok`, or what the guest's checks say was lost.
fn judge(before: &str, after: &str) -> String {
    match (GuestCheck::parse(before), GuestCheck::parse(after)) {
        (Some(before), Some(after)) => match after.continues(&before) {
            Ok(()) => "ok".to_string(),
            Err(why) => why,
        },
        _ => format!("no readable check lines: {before:?} then {after:?}"),
    }
}

/// Every round, VM and device against the plan and the rules.
fn judge_rounds(plan: &Plan, rounds: &[RoundReport], failures: &mut Vec<String>) {
    let updates = rounds.iter().filter(|r| r.kind == "update").count();
    if updates as u32 != plan.rounds {
        failures.push(format!(
            "{updates} update round(s) of {} reported",
            plan.rounds
        ));
    }
    for round in rounds {
        let name = format!("round {} ({})", round.round, round.kind);
        if round.vms.len() != plan.vms as usize {
            let what = match round.kind.as_str() {
                "cancel" => "checked themselves after the cancel",
                _ => "were restored",
            };
            failures.push(format!(
                "{name}: {} of {} VMs {what}",
                round.vms.len(),
                plan.vms
            ));
        }
        for vm in &round.vms {
            if vm.guest_check != "ok" {
                failures.push(format!("{name} {}: {}", vm.vm, vm.guest_check));
            }
            if vm.devices.len() != plan.devices as usize {
                failures.push(format!(
                    "{name} {}: {} of {} devices reported",
                    vm.vm,
                    vm.devices.len(),
                    plan.devices
                ));
            }
            for device in &vm.devices {
                if !device.works {
                    failures.push(format!(
                        "{name} {} {}: no DMA with its interrupt afterwards: {:?}",
                        vm.vm, device.bdf, device.round_line
                    ));
                }
                if device.preserved && device.normal_opens > 0 {
                    failures.push(format!(
                        "{name} {} {}: preserved, yet opened the normal way {} time(s)",
                        vm.vm, device.bdf, device.normal_opens
                    ));
                }
                if round.kind == "update"
                    && plan.vfio_handler == VfioHandler::On
                    && !device.preserved
                {
                    failures.push(format!(
                        "{name} {} {}: not preserved although the VFIO handler is on",
                        vm.vm, device.bdf
                    ));
                }
            }
            let attributed: u32 = vm.opens.per_device.values().sum();
            if vm.opens.device_opens() != attributed as usize {
                failures.push(format!(
                    "{name} {}: the kernel saw {} VFIO device or group open(s), {attributed} of \
                     them of this VM's devices: {:?}",
                    vm.vm,
                    vm.opens.device_opens(),
                    vm.opens.opens
                ));
            }
        }
    }
}

impl DrillReport {
    /// The console table.
    pub fn to_table(&self) -> String {
        let p = &self.plan;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "drill: {} VM(s) x {} MiB x {} edu device(s), {} round(s){}, VFIO handler {:?}, \
             {} -> {}: {} in {:.0} s",
            p.vms,
            p.memory_mib,
            p.devices,
            p.rounds,
            if p.cancel_first {
                " after a cancel"
            } else {
                ""
            },
            p.vfio_handler,
            self.kernel,
            if self.next_kernel.is_empty() {
                "(no kexec)"
            } else {
                &self.next_kernel
            },
            if self.ok { "OK" } else { "FAILED" },
            self.total_s
        );
        for round in &self.rounds {
            let kexec = round
                .kexec_boot_ms
                .map(|ms| format!(", kexec + boot {ms:.0} ms"))
                .unwrap_or_default();
            let _ = writeln!(out, "round {} ({}){kexec}", round.round, round.kind);
            let _ = writeln!(
                out,
                "  {:<5} {:<6} {:>9} {:>9} {:>9} {:>11}  devices",
                "vm", "guest", "ram_ms", "pause_ms", "rest_ms", "blackout_ms"
            );
            for vm in &round.vms {
                let sum = |keys: &[&str]| {
                    let total: f64 = keys.iter().filter_map(|k| vm.phases_ms.get(*k)).sum();
                    if total > 0.0 {
                        format!("{total:.0}")
                    } else {
                        "-".into()
                    }
                };
                let devices: Vec<String> = vm
                    .devices
                    .iter()
                    .map(|d| {
                        format!(
                            "{} {} opens={} {}",
                            d.bdf,
                            match (round.kind.as_str(), d.preserved) {
                                ("cancel", _) => "kept",
                                (_, true) => "preserved",
                                (_, false) => "reopened",
                            },
                            d.normal_opens,
                            if d.works { "works" } else { "BROKEN" }
                        )
                    })
                    .collect();
                let guest = if vm.guest_check == "ok" { "ok" } else { "LOST" };
                let _ = writeln!(
                    out,
                    "  {:<5} {:<6} {:>9} {:>9} {:>9} {:>11}  {}",
                    vm.vm,
                    guest,
                    sum(&["preserve_ram"]),
                    sum(&PAUSED_PHASES),
                    sum(&RESTORE_PHASES),
                    sum(&["blackout"]),
                    devices.join("; ")
                );
            }
        }
        if self.plan.thp {
            for vm in self.rounds.iter().flat_map(|r| &r.vms) {
                if let (Some(before), Some(after)) =
                    (vm.shmem_huge_kib_before, vm.shmem_huge_kib_after)
                {
                    let _ = writeln!(
                        out,
                        "THP: L1's shmem in huge pages {} MiB before the prepare, {} MiB after \
                         {}'s restore",
                        before / 1024,
                        after / 1024,
                        vm.vm
                    );
                }
            }
        }
        for failure in &self.failures {
            let _ = writeln!(out, "FAILED: {failure}");
        }
        out
    }

    /// The phases per row on one time axis.
    pub fn to_svg(&self) -> String {
        const LEFT: f64 = 70.0;
        const WIDTH: f64 = 1000.0;
        const ROW: f64 = 28.0;
        let mut rows: Vec<&str> = vec![HOST_ROW];
        for span in &self.timeline {
            if !rows.contains(&span.row.as_str()) {
                rows.push(&span.row);
            }
        }
        let total = self.total_s.max(1.0);
        let x = |s: f64| LEFT + s / total * WIDTH;
        let height = ROW * rows.len() as f64 + 40.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
            LEFT + WIDTH + 10.0
        );
        let _ = writeln!(
            svg,
            r#"<title>luvmm drill: {}</title>"#,
            if self.ok { "OK" } else { "FAILED" }
        );
        for (i, row) in rows.iter().enumerate() {
            let y = 10.0 + ROW * i as f64;
            let _ = writeln!(
                svg,
                r#"<text x="4" y="{}">{}</text>"#,
                y + 16.0,
                escape(row)
            );
            for span in self.timeline.iter().filter(|s| s.row == *row) {
                let (x0, x1) = (x(span.start_s), x(span.end_s));
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="22" fill="{}"><title>{} {}: {:.1} s</title></rect>"#,
                    (x1 - x0).max(1.0),
                    colour(&span.phase),
                    escape(row),
                    escape(&span.phase),
                    span.end_s - span.start_s
                );
                if x1 - x0 > 40.0 {
                    let _ = writeln!(
                        svg,
                        r#"<text x="{:.1}" y="{}">{}</text>"#,
                        x0 + 3.0,
                        y + 15.0,
                        escape(&span.phase)
                    );
                }
            }
        }
        let axis = 10.0 + ROW * rows.len() as f64 + 14.0;
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{axis}">0 s</text><text x="{}" y="{axis}" text-anchor="end">{total:.0} s (host clock)</text>"#,
            LEFT + WIDTH
        );
        svg.push_str("</svg>\n");
        svg
    }
}

fn colour(phase: &str) -> &'static str {
    match phase {
        "boot" | "agent" => "#9ecae1",
        "dma" | "check" | "running" => "#a1d99b",
        "prepare" | "preflight" => "#fdd49e",
        "paused" => "#fc9272",
        "kexec" => "#d94801",
        "restore" => "#bcbddc",
        "cancel" => "#fdae6b",
        _ => "#d9d9d9",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::watch::Open;
    use luvmm_vmm::update::prepare::DeviceReport;
    use luvmm_vmm::vmm::RestoreTimings;

    const BEFORE: &str =
        "LUVMM-CHECK ok pages=9 heartbeat=5 seed=0xab checks=1 vcpus=2 heartbeats=5,5";
    const AFTER: &str =
        "LUVMM-CHECK ok pages=9 heartbeat=9 seed=0xab checks=2 vcpus=2 heartbeats=9,9";
    const ROUND: &str = "LUVMM-ROUND ok n=2 bdf=00:01.0 dma=ok irq=msi";
    const BDF: &str = "0000:00:03.0";

    fn plan(handler: VfioHandler) -> Plan {
        Plan {
            vms: 1,
            memory_mib: 64,
            devices: 1,
            rounds: 1,
            cancel_first: false,
            vfio_handler: handler,
            thp: false,
        }
    }

    fn opens(cdev_opens: u32, attributed: u32) -> Opens {
        Opens {
            opens: (0..cdev_opens)
                .map(|_| Open {
                    node: "vfio_cdev".into(),
                    pid: 90,
                    comm: "luvmm".into(),
                })
                .chain([Open {
                    node: "iommufd".into(),
                    pid: 90,
                    comm: "luvmm".into(),
                }])
                .collect(),
            per_device: BTreeMap::from([(BDF.to_string(), attributed)]),
        }
    }

    /// Runs a one-VM, one-device, one-round drill's events through the collector.
    fn drill(
        handler: VfioHandler,
        preserved: bool,
        after: &str,
        round_line: &str,
        seen: Opens,
        restored: bool,
    ) -> DrillReport {
        let mut events = vec![
            Event::Stage {
                stage: 1,
                kernel: "7.2.13".into(),
            },
            Event::Phase {
                row: "vm1".into(),
                phase: "prepare".into(),
            },
            Event::Prepared {
                round: 1,
                vm: "vm1".into(),
                check_before: BEFORE.into(),
                report: PrepareReport {
                    vm_id: "vm1".into(),
                    session: "luvmm-vm1".into(),
                    devices: vec![DeviceReport {
                        bdf: BDF.into(),
                        preserved,
                    }],
                    ram_mib: 64,
                    phases_ms: BTreeMap::from([("preserve_ram".to_string(), 8.0)]),
                    warnings: Vec::new(),
                },
                shmem_huge_kib: 0,
            },
            Event::Phase {
                row: HOST_ROW.into(),
                phase: "kexec".into(),
            },
            Event::Stage {
                stage: 2,
                kernel: "7.2.13".into(),
            },
        ];
        if restored {
            events.push(Event::Restored {
                round: 1,
                vm: "vm1".into(),
                check_after: after.into(),
                device_rounds: vec![round_line.into()],
                timings: RestoreTimings::default(),
                opens: seen,
                shmem_huge_kib: 0,
            });
            events.push(Event::Done);
        }
        let mut collector = Collector::new(plan(handler));
        for (i, event) in events.iter().enumerate() {
            collector.feed(&Line {
                at: i as f64 * 10.0,
                text: event.to_line(),
            });
        }
        let run = L1Run {
            lines: Vec::new(),
            timed_out: false,
        };
        collector.finish(&run, Path::new("console.log"))
    }

    #[test]
    fn a_drill_where_everything_held_is_ok() {
        let report = drill(VfioHandler::Off, false, AFTER, ROUND, opens(1, 1), true);
        assert!(report.ok, "{:?}", report.failures);
        let round = &report.rounds[0];
        assert_eq!(round.kexec_boot_ms, Some(10_000.0));
        assert_eq!(round.vms[0].devices[0].normal_opens, 1);
        assert!(round.vms[0].devices[0].works);
        assert!(report.to_table().contains("OK"));
        let svg = report.to_svg();
        assert!(svg.contains("<title>vm1 prepare: 30.0 s</title>"), "{svg}");
        assert!(svg.contains("host kexec"), "{svg}");
    }

    #[test]
    fn every_broken_rule_fails_the_drill_and_says_which() {
        let lost = "LUVMM-CHECK LOST first_bad_gpa=0x3000000 expected=0x1 found=0x0";
        let broken = "LUVMM-ROUND FAIL n=2 bdf=00:01.0 reason=irq";
        for (report, expected) in [
            (
                drill(VfioHandler::Off, false, lost, ROUND, opens(1, 1), true),
                "LOST first_bad_gpa=0x3000000",
            ),
            (
                drill(VfioHandler::Off, false, AFTER, broken, opens(1, 1), true),
                "no DMA with its interrupt",
            ),
            (
                drill(VfioHandler::On, true, AFTER, ROUND, opens(1, 1), true),
                "preserved, yet opened the normal way 1 time(s)",
            ),
            (
                drill(VfioHandler::On, false, AFTER, ROUND, opens(1, 1), true),
                "not preserved although the VFIO handler is on",
            ),
            (
                drill(VfioHandler::Off, false, AFTER, ROUND, opens(2, 1), true),
                "the kernel saw 2 VFIO device or group open(s), 1 of them",
            ),
            (
                drill(VfioHandler::Off, false, AFTER, ROUND, opens(1, 1), false),
                "vm1 was prepared but never restored",
            ),
        ] {
            assert!(!report.ok);
            assert!(
                report.failures.iter().any(|f| f.contains(expected)),
                "{expected:?} not in {:?}",
                report.failures
            );
        }
        // A preserved device nobody opened is what the handler is for.
        let report = drill(VfioHandler::On, true, AFTER, ROUND, opens(0, 0), true);
        assert!(report.ok, "{:?}", report.failures);
    }
}
