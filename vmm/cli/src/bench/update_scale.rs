//! `bench update --vms 1,2,4,8`: one drill per number of VMs on the host, each VM's blackout
//! (its pause to its guest running again, kexec and boot included) against a lone VM's. With
//! every VM staged while its guest runs and all prepared together, and every restore started
//! beside the next kernel's agent, the last VM back should not be much later than a lone VM:
//! targets, the last VM's blackout at most 1.5 times a lone VM's with 4 VMs and 2 times with 8.

use serde::Serialize;

use super::BenchError;
use crate::drill::report::DrillReport;
use crate::drill::{self, BedArgs, DrillArgs};

/// What one run of the scale benchmark measures.
pub struct ScaleArgs<'a> {
    pub bed: &'a BedArgs,
    pub vms: &'a [u32],
    pub memory_mib: u64,
    /// Devices per VM, on the first half of the VMs (rounded up).
    pub devices: u32,
}

/// One drill's figures, in ms.
#[derive(Debug, Serialize)]
pub struct ScaleResult {
    pub vms: u32,
    pub vms_with_devices: u32,
    /// Each VM's blackout, in VM order.
    pub blackouts_ms: Vec<f64>,
    /// The last VM back: the largest blackout.
    pub last_ms: f64,
    /// `last_ms` over the lone VM's blackout (the run with one VM).
    pub last_over_lone: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub memory_mib: u64,
    pub devices: u32,
    pub results: Vec<ScaleResult>,
}

/// The most the last VM back may take over a lone VM, by number of VMs.
const TARGETS: [(u32, f64); 2] = [(4, 1.5), (8, 2.0)];

/// Runs one drill per number of VMs and prints the figures.
pub fn run(args: &ScaleArgs<'_>, json: bool) -> Result<(), BenchError> {
    let mut results: Vec<ScaleResult> = Vec::new();
    for &vms in args.vms {
        let with_devices = vms.div_ceil(2);
        eprintln!(
            "bench update: {vms} VM(s) of {} MiB, {} device(s) on {with_devices} of them",
            args.memory_mib, args.devices
        );
        let drill = DrillArgs::one_update(
            args.bed,
            vms,
            args.memory_mib,
            args.devices,
            Some(with_devices),
        );
        let report = drill::run(&drill)?;
        if !report.ok {
            return Err(BenchError::DrillFailed {
                memory_mib: args.memory_mib,
                devices: args.devices,
                failures: report.failures.join("; "),
            });
        }
        let blackouts_ms = blackouts(&report);
        let last_ms = blackouts_ms.iter().copied().fold(f64::NAN, f64::max);
        results.push(ScaleResult {
            vms,
            vms_with_devices: with_devices,
            blackouts_ms,
            last_ms,
            last_over_lone: None,
        });
    }
    let lone = results.iter().find(|r| r.vms == 1).map(|r| r.last_ms);
    for result in &mut results {
        result.last_over_lone = lone.map(|lone| result.last_ms / lone);
    }
    let report = ScaleReport {
        memory_mib: args.memory_mib,
        devices: args.devices,
        results,
    };
    if json {
        let text = serde_json::to_string(&report).map_err(BenchError::Encode)?;
        println!("{text}");
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// Each VM's blackout in the drill's update, in VM order.
fn blackouts(report: &DrillReport) -> Vec<f64> {
    let mut vms: Vec<(&str, f64)> = report
        .rounds
        .iter()
        .filter(|r| r.kind == "update")
        .flat_map(|r| r.vms.iter())
        .filter_map(|v| Some((v.vm.as_str(), *v.phases_ms.get("blackout")?)))
        .collect();
    vms.sort_by_key(|(vm, _)| drill::vm_index(vm).unwrap_or(usize::MAX));
    vms.into_iter().map(|(_, ms)| ms).collect()
}

fn table(report: &ScaleReport) -> String {
    let mut out = format!(
        "{} MiB per VM, {} device(s) on the first half of the VMs; blackout = pause to running, \
         kexec and boot included\n vms  with devices  blackouts_ms (per VM)  last_ms  last / lone\n",
        report.memory_mib, report.devices
    );
    for r in &report.results {
        let each: Vec<String> = r.blackouts_ms.iter().map(|ms| format!("{ms:.0}")).collect();
        let ratio = r
            .last_over_lone
            .map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
        let target = TARGETS
            .iter()
            .find(|(n, _)| *n == r.vms)
            .map_or_else(String::new, |(_, t)| format!(" (target <= {t})"));
        out.push_str(&format!(
            "{:>4}  {:>12}  {:<22} {:>7.0}  {ratio}{target}\n",
            r.vms,
            r.vms_with_devices,
            each.join(" "),
            r.last_ms
        ));
    }
    out
}
