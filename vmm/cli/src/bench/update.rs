//! `bench update`: the phases of a host live update, one drill in the nested bed per guest
//! size and device count, each with one VM and one kexec.
//!
//! The VMM's part of the blackout is `paused` (pause → ready, before the kexec, measured by
//! luvmm) plus `after` (the next kernel's agent starting until it answers, and `luvmm
//! restore` starting until its guest runs, by the host's clock on L1's console lines). Mapping guest RAM into the new IOAS (`ioas_map`) and
//! PRESERVE_FD of the RAM memfds (`preserve_ram`, while the guest runs) grow with the guest by
//! nature and are reported per MiB; the rest should not grow (flatness: largest over smallest
//! of `vmm - ioas_map`, target ≤ 1.2), and for a 256 MiB guest with one device the VMM's part
//! should be at most 10 % of the kexec + boot measured in the same run.

use serde::Serialize;

use super::{flatness, BenchError};
use crate::drill::report::{DrillReport, Span, PAUSED_PHASES};
use crate::drill::{self, BedArgs, DrillArgs};

#[derive(Debug, clap::Args)]
pub struct UpdateBenchArgs {
    #[command(flatten)]
    pub bed: BedArgs,
    /// Guest sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [64u64, 256, 1024])]
    pub sizes: Vec<u64>,
    /// `edu` devices per VM.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 3])]
    pub devices: Vec<u32>,
    /// Instead: one drill per number of VMs on the host (each of the first size, with the
    /// first device count on the first half of the VMs), each VM's blackout against a lone
    /// VM's.
    #[arg(long, value_delimiter = ',', value_name = "N[,N...]")]
    pub vms: Vec<u32>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One drill's figures, in ms.
#[derive(Debug, Serialize)]
pub struct UpdateResult {
    pub memory_mib: u64,
    pub devices: u32,
    pub preserve_ram_ms: f64,
    pub preserve_ram_ms_per_mib: f64,
    pub paused_ms: f64,
    pub after_ms: f64,
    pub ioas_map_ms: f64,
    pub ioas_map_ms_per_mib: f64,
    pub retrieve_ram_ms: f64,
    pub retrieve_ram_ms_per_mib: f64,
    /// `paused_ms + after_ms`: the VMM's part of the blackout.
    pub vmm_ms: f64,
    pub kexec_boot_ms: f64,
    /// `vmm_ms / kexec_boot_ms`.
    pub vmm_share: f64,
    /// The guest's own blackout, pause to resume.
    pub blackout_ms: f64,
    /// Guest RAM in huge folios (L1's `ShmemHugePages`, MiB) before the prepare and after
    /// the restore.
    pub huge_mib_before: f64,
    pub huge_mib_after: f64,
}

#[derive(Debug, Serialize)]
pub struct UpdateReport {
    pub results: Vec<UpdateResult>,
    /// Per device count: largest over smallest `vmm_ms - ioas_map_ms - retrieve_ram_ms`
    /// across the sizes.
    pub flatness: Vec<(u32, f64)>,
    /// `vmm_share` of the 256 MiB, one-device run, if there was one.
    pub share_256_mib_1_device: Option<f64>,
}

/// Runs one drill per size and device count and prints the figures.
pub fn run(args: &UpdateBenchArgs) -> Result<(), BenchError> {
    if !args.vms.is_empty() {
        let scale = super::update_scale::ScaleArgs {
            bed: &args.bed,
            vms: &args.vms,
            memory_mib: args.sizes.first().copied().unwrap_or(64),
            devices: args.devices.first().copied().unwrap_or(1),
        };
        return super::update_scale::run(&scale, args.json);
    }
    let mut results = Vec::new();
    for &devices in &args.devices {
        for &memory_mib in &args.sizes {
            eprintln!("bench update: {memory_mib} MiB, {devices} device(s)");
            let drill = DrillArgs::one_update(&args.bed, 1, memory_mib, devices, None);
            let report = drill::run(&drill)?;
            if !report.ok {
                return Err(BenchError::DrillFailed {
                    memory_mib,
                    devices,
                    failures: report.failures.join("; "),
                });
            }
            results.push(figures(&report, memory_mib, devices));
        }
    }
    let flatness = args
        .devices
        .iter()
        .map(|&d| {
            let values: Vec<f64> = results
                .iter()
                .filter(|r| r.devices == d)
                .map(|r| r.vmm_ms - r.ioas_map_ms - r.retrieve_ram_ms)
                .collect();
            (d, self::flatness(&values))
        })
        .collect();
    let share_256_mib_1_device = results
        .iter()
        .find(|r| r.memory_mib == 256 && r.devices == 1)
        .map(|r| r.vmm_share);
    let report = UpdateReport {
        results,
        flatness,
        share_256_mib_1_device,
    };
    if args.json {
        let text = serde_json::to_string(&report).map_err(BenchError::Encode)?;
        println!("{text}");
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The figures of a passing one-VM, one-round drill.
fn figures(report: &DrillReport, memory_mib: u64, devices: u32) -> UpdateResult {
    let round = report.rounds.iter().find(|r| r.kind == "update");
    let vm = round.and_then(|r| r.vms.first());
    let phase = |name: &str| {
        vm.and_then(|v| v.phases_ms.get(name))
            .copied()
            .unwrap_or(0.0)
    };
    let paused_ms: f64 = PAUSED_PHASES.iter().map(|p| phase(p)).sum();
    let after_ms = after_kexec_ms(&report.timeline);
    let vmm_ms = paused_ms + after_ms;
    let kexec_boot_ms = round.and_then(|r| r.kexec_boot_ms).unwrap_or(0.0);
    let mib = memory_mib as f64;
    UpdateResult {
        memory_mib,
        devices,
        preserve_ram_ms: phase("preserve_ram"),
        preserve_ram_ms_per_mib: phase("preserve_ram") / mib,
        paused_ms,
        after_ms,
        ioas_map_ms: phase("ioas_map"),
        ioas_map_ms_per_mib: phase("ioas_map") / mib,
        retrieve_ram_ms: phase("retrieve_ram"),
        retrieve_ram_ms_per_mib: phase("retrieve_ram") / mib,
        vmm_ms,
        kexec_boot_ms,
        vmm_share: if kexec_boot_ms > 0.0 {
            vmm_ms / kexec_boot_ms
        } else {
            f64::NAN
        },
        blackout_ms: phase("blackout"),
        huge_mib_before: vm.and_then(|v| v.shmem_huge_kib_before).unwrap_or(0) as f64 / 1024.0,
        huge_mib_after: vm.and_then(|v| v.shmem_huge_kib_after).unwrap_or(0) as f64 / 1024.0,
    }
}

/// After the kexec, by the host's clock: the next kernel's agent starting until it answers,
/// plus `luvmm restore` starting until its VM runs (the drill's open watcher is armed in
/// between and is not counted).
fn after_kexec_ms(timeline: &[Span]) -> f64 {
    let last = |row: &str, phase: &str| {
        timeline
            .iter()
            .rev()
            .find(|s| s.row == row && s.phase == phase)
            .map(|s| (s.end_s - s.start_s) * 1e3)
    };
    match (last("host", "agent"), last("vm1", "restore")) {
        (Some(agent), Some(restore)) => agent + restore,
        _ => f64::NAN,
    }
}

fn table(report: &UpdateReport) -> String {
    let mut out = String::from(
        "memory_mib devices preserve_ram_ms (/MiB) paused_ms after_ms retrieve_ram_ms (/MiB) \
         ioas_map_ms (/MiB) vmm_ms kexec_boot_ms vmm_share blackout_ms huge_mib (before/after)\n",
    );
    for r in &report.results {
        out.push_str(&format!(
            "{:>10} {:>7} {:>15.1} ({:.3}) {:>9.1} {:>8.1} {:>15.1} ({:.3}) {:>11.1} ({:.3}) \
             {:>6.1} {:>13.0} {:>9.3} {:>11.0} {:.0}/{:.0}\n",
            r.memory_mib,
            r.devices,
            r.preserve_ram_ms,
            r.preserve_ram_ms_per_mib,
            r.paused_ms,
            r.after_ms,
            r.retrieve_ram_ms,
            r.retrieve_ram_ms_per_mib,
            r.ioas_map_ms,
            r.ioas_map_ms_per_mib,
            r.vmm_ms,
            r.kexec_boot_ms,
            r.vmm_share,
            r.blackout_ms,
            r.huge_mib_before,
            r.huge_mib_after
        ));
    }
    for (devices, ratio) in &report.flatness {
        out.push_str(&format!(
            "flatness of vmm_ms - ioas_map_ms - retrieve_ram_ms over the sizes, {devices} device(s): {ratio:.2} \
             (target <= 1.2)\n"
        ));
    }
    if let Some(share) = report.share_256_mib_1_device {
        out.push_str(&format!(
            "VMM's part of the blackout / kexec + boot, 256 MiB, 1 device: {:.1} % (target <= 10 %)\n",
            share * 100.0
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(row: &str, phase: &str, start_s: f64, end_s: f64) -> Span {
        Span {
            row: row.into(),
            phase: phase.into(),
            start_s,
            end_s,
        }
    }

    #[test]
    fn the_time_after_the_kexec_is_the_next_agent_and_the_restore() {
        let timeline = [
            span("host", "agent", 5.0, 5.5),
            span("vm1", "restore", 9.0, 10.0),
            span("host", "kexec", 12.0, 30.0),
            span("host", "agent", 30.0, 30.25),
            span("vm1", "watch", 30.3, 30.5),
            span("vm1", "restore", 30.5, 31.5),
        ];
        assert_eq!(after_kexec_ms(&timeline), 1250.0);
        assert!(after_kexec_ms(&timeline[..1]).is_nan());
    }
}
