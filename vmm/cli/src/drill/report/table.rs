//! The console table: one line per VM and round, then the failures.

use std::fmt::Write as _;

use super::{DrillReport, PAUSED_PHASES, RESTORE_PHASES};
use crate::drill::GuestKind;

impl DrillReport {
    /// The console table.
    pub fn to_table(&self) -> String {
        let p = &self.plan;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "drill: {} VM(s) x {} MiB x {} {}, {} round(s){}, VFIO handler {:?}, \
             {} -> {}: {} in {:.0} s",
            p.vms,
            p.memory_mib,
            p.devices,
            match p.guest {
                GuestKind::Payload => "edu device(s)",
                GuestKind::Linux => "NVMe controller(s) under Linux",
            },
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
                "  {:<5} {:<6} {:>9} {:>9} {:>9} {:>11} {:>12}  devices",
                "vm", "guest", "ram_ms", "pause_ms", "rest_ms", "blackout_ms", "guest_gap_ms"
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
                    "  {:<5} {:<6} {:>9} {:>9} {:>9} {:>11} {:>12}  {}",
                    vm.vm,
                    guest,
                    sum(&["preserve_ram"]),
                    sum(&PAUSED_PHASES),
                    sum(&RESTORE_PHASES),
                    sum(&["blackout"]),
                    vm.guest_clock_gap_ms
                        .map_or_else(|| "-".into(), |ms| format!("{ms:.0}")),
                    devices.join("; ")
                );
                if let Some(linux) = &vm.linux {
                    let io = linux.io.as_ref().map_or_else(
                        || "no I/O".to_string(),
                        |io| {
                            format!(
                                "{} blocks verified, {} error(s), {} mismatch(es), longest I/O \
                                 stall {:.0} ms",
                                io.verified, io.errors, io.mismatches, io.longest_stall_ms
                            )
                        },
                    );
                    let _ = writeln!(
                        out,
                        "  {:<5} linux: memory {}, {io}, {} controller timeout(s)/reset(s), \
                         wall clock {:+.0} ms, {} kernel warning(s)",
                        "",
                        if linux.memory.ok() { "ok" } else { "LOST" },
                        linux.controller_resets,
                        linux.clock.realtime_offset_ms,
                        linux.kernel_warnings.len()
                    );
                }
            }
            for (span, opens) in round.watched() {
                let _ = writeln!(
                    out,
                    "  open watcher {span}: {} VFIO device or group open(s), {} /dev/iommu",
                    opens.device_opens(),
                    opens.opens.iter().filter(|o| o.node == "iommufd").count()
                );
            }
        }
        for (round, vm) in self
            .rounds
            .iter()
            .flat_map(|r| r.vms.iter().map(move |v| (r, v)))
        {
            if let Some(back) = vm.guest_clock_back_ms.filter(|ms| *ms > 0.0) {
                let _ = writeln!(
                    out,
                    "round {} ({}) {}: the guest's TSC went back {back:.1} ms between two ticks",
                    round.round, round.kind, vm.vm
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
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{held, linux_check, linux_drill};
    use crate::drill::VfioHandler;

    #[test]
    fn the_table_says_ok() {
        assert!(held().to_table().contains("OK"));
    }

    #[test]
    fn a_linux_guest_gets_its_judges_line() {
        let before = linux_check(1, 30.0, (100, 100, 0, 20.0), 0, 5.0, 50.0);
        let after = linux_check(2, 45.0, (300, 290, 0, 9500.0), 0, -3.0, 9800.0);
        let table = linux_drill(VfioHandler::Keep, &before, &[], &after).to_table();
        assert!(
            table.contains(
                "linux: memory ok, 290 blocks verified, 0 error(s), 0 mismatch(es), longest I/O \
                 stall 9500 ms, 0 controller timeout(s)/reset(s), wall clock -3 ms, 0 kernel \
                 warning(s)"
            ),
            "{table}"
        );
        assert!(table.contains("NVMe controller(s) under Linux"), "{table}");
    }
}
