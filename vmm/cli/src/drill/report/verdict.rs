//! Judges what was collected: each guest by its own checks, and every round, VM and device
//! against the plan and the rules.

use super::RoundReport;
use crate::drill::guest::GuestCheck;
use crate::drill::{Plan, VfioHandler};

/// `ok`, or what the guest's checks say was lost.
pub(super) fn judge_guest(before: &str, after: &str) -> String {
    match (GuestCheck::parse(before), GuestCheck::parse(after)) {
        (Some(before), Some(after)) => match after.continues(&before) {
            Ok(()) => "ok".to_string(),
            Err(why) => why.to_string(),
        },
        _ => format!("no readable check lines: {before:?} then {after:?}"),
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
                // Every drill device is an edu, whose identity the guest checks each round.
                if device.same_device != Some(true) {
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
                    && plan.vfio_handler == VfioHandler::On
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
    use super::super::fixtures::{drill, drill_watched, held, opens, Watched, AFTER, ROUND};
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
        let report = drill_watched(VfioHandler::On, true, AFTER, ROUND, seen, false);
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
        let report = drill_watched(VfioHandler::On, true, AFTER, ROUND, seen, true);
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
            let report = drill_watched(VfioHandler::On, true, AFTER, ROUND, seen, true);
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
                drill(VfioHandler::On, true, AFTER, ROUND, opens(1, 1), true),
                "preserved, yet opened the normal way 1 time(s)",
            ),
            (
                drill(VfioHandler::On, false, AFTER, ROUND, opens(1, 1), true),
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
        let report = drill(VfioHandler::On, true, AFTER, ROUND, opens(0, 0), true);
        assert!(report.ok, "{:?}", report.failures);
    }
}
