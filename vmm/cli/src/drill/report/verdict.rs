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

#[cfg(test)]
mod tests {
    use super::super::fixtures::{drill, held, opens, AFTER, ROUND};
    use crate::drill::VfioHandler;

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
