//! Judges what was collected: each guest by its own checks, and every round, VM and device
//! against the plan and the rules.

use super::RoundReport;
use crate::drill::guest::GuestCheck;
use crate::drill::judge::{parse_linux_check, LinuxCheck, LinuxVerdict};
use crate::drill::{GuestKind, Plan, VfioHandler};

/// What a guest's own checks say about one round.
#[derive(Debug, Default)]
pub(super) struct GuestJudgement {
    /// `ok`, or what was lost.
    pub check: String,
    /// The longest the guest saw itself stopped, and (payload) the most its TSC went back.
    pub clock_gap_ms: Option<f64>,
    pub clock_back_ms: Option<f64>,
    /// The Linux judge's verdict.
    pub linux: Option<LinuxVerdict>,
    /// Linux: its block loop went on through its NVMe controller without an error.
    pub io_went_on: bool,
}

/// Judges a round by the guest's checks `before` it and after it (`recovery`, then `after`).
/// `devices_reset`: the round handed the guest's devices back reset, so its driver's
/// timeouts and resets are its recovery.
pub(super) fn judge_guest(
    plan: &Plan,
    devices_reset: bool,
    before: &str,
    recovery: &[String],
    after: &str,
) -> GuestJudgement {
    match plan.guest {
        GuestKind::Payload => judge_payload(before, after),
        GuestKind::Linux => judge_linux(plan, devices_reset, before, recovery, after),
    }
}

fn judge_payload(before: &str, after: &str) -> GuestJudgement {
    match (GuestCheck::parse(before), GuestCheck::parse(after)) {
        (Some(before), Some(after)) => GuestJudgement {
            check: match after.continues(&before) {
                Ok(()) => "ok".to_string(),
                Err(why) => why.to_string(),
            },
            clock_gap_ms: after.clock_gap_ms(),
            clock_back_ms: after.clock_back_ms(),
            ..GuestJudgement::default()
        },
        _ => unreadable(before, after),
    }
}

fn judge_linux(
    plan: &Plan,
    devices_reset: bool,
    before: &str,
    recovery: &[String],
    after: &str,
) -> GuestJudgement {
    let earlier: Option<Vec<LinuxCheck>> = recovery.iter().map(|l| parse_linux_check(l)).collect();
    let (Some(first), Some(earlier), Some(last)) =
        (parse_linux_check(before), earlier, parse_linux_check(after))
    else {
        return unreadable(before, after);
    };
    let verdict = LinuxVerdict::of(&first, &earlier, &last);
    let losses = verdict.losses(&first, &last, plan.devices > 0, devices_reset);
    GuestJudgement {
        check: if losses.is_empty() {
            "ok".to_string()
        } else {
            losses.join("; ")
        },
        clock_gap_ms: Some(verdict.clock.longest_gap_ms),
        clock_back_ms: None,
        io_went_on: verdict.io_went_on(&first),
        linux: Some(verdict),
    }
}

fn unreadable(before: &str, after: &str) -> GuestJudgement {
    GuestJudgement {
        check: format!("no readable check lines: {before:?} then {after:?}"),
        ..GuestJudgement::default()
    }
}

/// Every round, VM and device against the plan and the rules.
pub(super) fn judge_rounds(plan: &Plan, rounds: &[RoundReport], failures: &mut Vec<String>) {
    let updates = rounds.iter().filter(|r| r.kind == "update").count();
    if u32::try_from(updates).ok() != Some(plan.rounds) {
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
            let expected = plan.devices_of_vm(&vm.vm);
            if vm.devices.len() != expected as usize {
                failures.push(format!(
                    "{name} {}: {} of {expected} devices reported",
                    vm.vm,
                    vm.devices.len(),
                ));
            }
            for device in &vm.devices {
                if !device.works {
                    failures.push(format!(
                        "{name} {} {}: {}: {:?}",
                        vm.vm,
                        device.bdf,
                        match plan.guest {
                            GuestKind::Payload => "no DMA with its interrupt afterwards",
                            GuestKind::Linux => "the guest's block I/O did not go on through it",
                        },
                        device.round_line
                    ));
                }
                // Every payload drill device is an edu, whose identity the guest checks each
                // round; a Linux guest's NVMe namespace is checked by its blocks.
                if plan.guest == GuestKind::Payload && device.same_device != Some(true) {
                    failures.push(format!(
                        "{name} {} {}: {}: {:?}",
                        vm.vm,
                        device.bdf,
                        match device.same_device {
                            Some(_) => "another device answers in its slot",
                            None => "the guest did not check the device's identity",
                        },
                        device.round_line
                    ));
                }
                if round.kind == "update"
                    && plan.vfio_handler != VfioHandler::Off
                    && !device.preserved
                {
                    failures.push(format!(
                        "{name} {} {}: not preserved although the VFIO handler is on",
                        vm.vm, device.bdf
                    ));
                }
            }
        }
        judge_watch(&name, round, failures);
    }
}

/// The open watcher's evidence for one round: it covered both kernels' spans of an update that
/// kexecs, saw no normal open of a device the prepare preserved (whether its VM came back or
/// not), and could name the device of every open the kernel counted.
fn judge_watch(name: &str, round: &RoundReport, failures: &mut Vec<String>) {
    if round.kind == "update" && round.kexec_boot_ms.is_some() {
        for (span, opens) in [
            (
                "between the prepare and the kexec",
                &round.opens_prepare_to_kexec,
            ),
            (
                "between the agent's start and the last resume",
                &round.opens_agent_to_resume,
            ),
        ] {
            if opens.is_none() {
                failures.push(format!("{name}: the open watcher reported nothing {span}"));
            }
        }
    }
    for bdf in &round.preserved_devices {
        let spans: Vec<String> = round
            .watched()
            .filter_map(|(span, opens)| {
                let n = opens.per_device.get(bdf).copied().unwrap_or(0);
                (n > 0).then(|| format!("{n} {span}"))
            })
            .collect();
        if !spans.is_empty() {
            failures.push(format!(
                "{name} {bdf}: preserved, yet opened the normal way {} time(s): {}",
                round.normal_opens(bdf),
                spans.join(", ")
            ));
        }
    }
    for (span, opens) in round.watched() {
        let attributed: u32 = opens.per_device.values().sum();
        if opens.device_opens() != attributed as usize {
            failures.push(format!(
                "{name}: {span}, the kernel saw {} VFIO device or group open(s), {attributed} of \
                 them of the VMs' devices: {:?}",
                opens.device_opens(),
                opens.opens
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{
        drill, drill_watched, held, linux_check, linux_drill, opens, Watched, AFTER, ROUND,
    };
    use crate::drill::VfioHandler;

    fn failed_with(report: &super::super::DrillReport, expected: &str) {
        assert!(!report.ok);
        assert!(
            report.failures.iter().any(|f| f.contains(expected)),
            "{expected:?} not in {:?}",
            report.failures
        );
    }

    #[test]
    fn nothing_lost_drill_keeps_what_the_watcher_saw_when_a_restore_fails() {
        let seen = Watched {
            before_kexec: Some(opens(0, 0)),
            after_kexec: Some(opens(1, 1)),
        };
        let report = drill_watched(VfioHandler::Reset, true, AFTER, ROUND, seen, false);
        failed_with(&report, "vm1: luvmm exited");
        failed_with(
            &report,
            "round 1 (update) 0000:00:03.0: preserved, yet opened the normal way 1 time(s): 1 \
             between the agent's start and the last resume",
        );
        let kept = report.rounds[0].opens_agent_to_resume.as_ref();
        assert_eq!(kept.map(|o| o.device_opens()), Some(1), "{report:?}");
    }

    #[test]
    fn nothing_lost_drill_fails_a_preserved_device_opened_before_the_kexec() {
        let seen = Watched {
            before_kexec: Some(opens(1, 1)),
            after_kexec: Some(opens(0, 0)),
        };
        let report = drill_watched(VfioHandler::Reset, true, AFTER, ROUND, seen, true);
        failed_with(
            &report,
            "preserved, yet opened the normal way 1 time(s): 1 between the prepare and the kexec",
        );
        assert_eq!(report.rounds[0].vms[0].devices[0].normal_opens, 1);
    }

    #[test]
    fn nothing_lost_drill_needs_the_watcher_in_both_kernels() {
        for (seen, span) in [
            (
                Watched {
                    before_kexec: None,
                    after_kexec: Some(opens(0, 0)),
                },
                "the open watcher reported nothing between the prepare and the kexec",
            ),
            (
                Watched {
                    before_kexec: Some(opens(0, 0)),
                    after_kexec: None,
                },
                "the open watcher reported nothing between the agent's start and the last resume",
            ),
        ] {
            let report = drill_watched(VfioHandler::Reset, true, AFTER, ROUND, seen, true);
            failed_with(&report, span);
        }
    }

    #[test]
    fn nothing_lost_drill_catches_a_device_that_is_not_the_one_the_guest_named() {
        let swapped = "LUVMM-ROUND ok n=2 bdf=00:01.0 dma=ok irq=msi id=LOST found=0x00000000ab";
        let report = drill(VfioHandler::Off, false, AFTER, swapped, opens(1, 1), true);
        failed_with(&report, "0000:00:03.0: another device answers in its slot");
        assert_eq!(report.rounds[0].vms[0].devices[0].same_device, Some(false));
    }

    #[test]
    fn nothing_lost_drill_reports_the_guest_clock_beside_luvmm_blackout() {
        let report = held();
        assert_eq!(report.rounds[0].vms[0].guest_clock_gap_ms, Some(1000.0));
        let table = report.to_table();
        assert!(table.contains("blackout_ms guest_gap_ms"), "{table}");
        assert!(table.contains("         1000  "), "{table}");
    }

    #[test]
    fn a_drill_where_everything_held_is_ok() {
        let report = held();
        assert!(report.ok, "{:?}", report.failures);
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
                drill(VfioHandler::Reset, true, AFTER, ROUND, opens(1, 1), true),
                "preserved, yet opened the normal way 1 time(s)",
            ),
            (
                drill(VfioHandler::Reset, false, AFTER, ROUND, opens(1, 1), true),
                "not preserved although the VFIO handler is on",
            ),
            (
                drill(VfioHandler::Off, false, AFTER, ROUND, opens(2, 1), true),
                "the kernel saw 2 VFIO device or group open(s), 1 of them of the VMs' devices",
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
        let report = drill(VfioHandler::Reset, true, AFTER, ROUND, opens(0, 0), true);
        assert!(report.ok, "{:?}", report.failures);
    }

    /// A Linux guest before the update: 100 blocks verified, no reset, its clock right.
    fn linux_before() -> String {
        linux_check(1, 30.0, (100, 100, 0, 20.0), 0, 5.0, 50.0)
    }

    #[test]
    fn a_linux_guest_that_went_on_passes_keep_and_its_stall_is_reported() {
        let after = linux_check(2, 45.0, (300, 290, 0, 9500.0), 0, -3.0, 9800.0);
        let report = linux_drill(VfioHandler::Keep, &linux_before(), &[], &after);
        assert!(report.ok, "{:?}", report.failures);
        let vm = &report.rounds[0].vms[0];
        assert_eq!(vm.guest_clock_gap_ms, Some(9800.0));
        assert!(vm.devices[0].works && vm.devices[0].preserved);
        let json = serde_json::to_value(vm).expect("a VM's JSON");
        for key in [
            "memory",
            "io",
            "clock",
            "kernel_warnings",
            "controller_resets",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert_eq!(json["memory"], "ok");
        assert_eq!(json["io"]["longest_stall_ms"], 9500.0);
        assert_eq!(json["clock"]["realtime_offset_ms"], -3.0);
    }

    #[test]
    fn a_linux_guest_fails_the_drill_for_each_thing_it_lost() {
        let before = linux_before();
        for (after, handler, expected) in [
            (
                linux_check(2, 45.0, (300, 290, 2, 30.0), 0, 0.0, 9.0),
                VfioHandler::Keep,
                "io: 2 error(s)",
            ),
            (
                linux_check(2, 45.0, (300, 100, 0, 30.0), 0, 0.0, 9.0),
                VfioHandler::Keep,
                "io: no block verified since the check before",
            ),
            (
                linux_check(2, 45.0, (300, 290, 0, 30.0), 0, -8392.0, 9.0),
                VfioHandler::Keep,
                "clock: the guest's wall clock is -8392 ms off the host's",
            ),
            (
                linux_check(2, 45.0, (300, 290, 0, 30.0), 1, 0.0, 9.0),
                VfioHandler::Keep,
                "nvme: the guest's driver logged 1 timeout(s) or reset(s)",
            ),
            (
                linux_check(1, 3.0, (300, 290, 0, 30.0), 0, 0.0, 9.0),
                VfioHandler::Reset,
                "another boot",
            ),
        ] {
            let report = linux_drill(handler, &before, &[], &after);
            failed_with(&report, expected);
        }
        // A bad page, as the judge words it, and a kernel warning.
        let bad = linux_check(2, 45.0, (300, 290, 0, 30.0), 0, 0.0, 9.0)
            .replace(
                "\"memory\":\"ok\"",
                "\"memory\":{\"first_bad_page\":7,\"expected\":\"0x1\",\"found\":\"0x2\",\"bad_pages\":2}",
            )
            .replace(
                "\"kernel_warnings\":[],\"kernel_warning_count\":0",
                "\"kernel_warnings\":[\"BUG: x\"],\"kernel_warning_count\":1",
            );
        let report = linux_drill(VfioHandler::Keep, &before, &[], &bad);
        failed_with(
            &report,
            "memory: 2 page(s) lost their word, the first page 7",
        );
        failed_with(&report, "kernel: 1 warning(s), the first: BUG: x");
    }

    #[test]
    fn a_reset_device_may_be_recovered_by_the_guests_driver_and_its_stall_counts() {
        let before = linux_before();
        // The first check after the update is still in the driver's recovery: its block I/O
        // stalled 45 s and its driver reset the controller; the next ran smoothly.
        let recovering = linux_check(2, 80.0, (120, 110, 0, 45000.0), 1, 2.0, 45000.0);
        let after = linux_check(3, 85.0, (300, 290, 0, 30.0), 4, 2.0, 12.0);
        let report = linux_drill(
            VfioHandler::Reset,
            &before,
            std::slice::from_ref(&recovering),
            &after,
        );
        assert!(report.ok, "{:?}", report.failures);
        let verdict = report.rounds[0].vms[0]
            .linux
            .clone()
            .expect("a Linux verdict");
        assert_eq!(verdict.controller_resets, 4);
        assert_eq!(verdict.io.map(|io| io.longest_stall_ms), Some(45000.0));
        assert_eq!(verdict.clock.longest_gap_ms, 45000.0);
        // In keep mode the same resets are a loss.
        let report = linux_drill(VfioHandler::Keep, &before, &[recovering], &after);
        failed_with(
            &report,
            "nvme: the guest's driver logged 4 timeout(s) or reset(s)",
        );
    }
}
