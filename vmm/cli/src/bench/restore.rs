//! `bench restore` measures, for each guest size, the blackout of a process handover: from
//! the source's pause to the guest running again in a new process. The new process is started
//! while the guest runs and builds its KVM VM and memslots on the source's memfds first
//! (`PUT /vm/handover/stage`); only then does it ask for the VM, which the source pauses and
//! saves at that moment. Guest memory is never copied or walked on this path, so the blackout
//! should not grow with the guest: the flatness ratio (largest median over smallest) should
//! stay near 1.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::vmm::{RestoreTimings, VmPhase, VmStatus};
use serde::{Deserialize, Serialize};

use super::{flatness, io, BenchError, STEP_TIMEOUT};
use crate::drill::guest::serial_lines;
use crate::drill::watch::{vfio_pci_devices, VFIO_PCI};

/// One handover's blackout and its parts, in ms.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Round {
    /// The source's pause to the guest running in the target (both read the wall clock).
    blackout_ms: f64,
    /// At the source: pause to state saved.
    save_ms: f64,
    /// The state's way to the target: saved at the source to decoded in the target.
    transfer_ms: f64,
    /// The target loading the state: checks, VM-wide state, devices, vCPUs.
    load_ms: f64,
    /// The rest: the confirmation to the source and the vCPUs let go.
    confirm_and_run_ms: f64,
    /// Before the pause, not in the blackout: the target's KVM VM and memslots.
    built_ahead_ms: f64,
    /// The target's own phase timings.
    phases: RestoreTimings,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SizeResult {
    memory_mib: u64,
    /// Passthrough devices of the guest.
    devices: u32,
    /// The round with the median blackout.
    median: Round,
    min_blackout_ms: f64,
    max_blackout_ms: f64,
    /// Every round's blackout in the order measured: round k of each size ran in the same
    /// stretch, so sizes can be compared round by round.
    blackouts_ms: Vec<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RestoreReport {
    rounds_per_size: usize,
    sizes: Vec<SizeResult>,
    /// Per device count, the largest median blackout over the smallest across the sizes.
    flatness: Vec<(u32, f64)>,
    /// Per size, the most devices' median blackout over none's (when both were measured).
    devices_over_none: Vec<(u64, f64)>,
}

/// Runs `bench restore` here: each size and device count `rounds` times (after one handover
/// not counted), a guest with devices given the first functions bound to vfio-pci.
pub fn run(
    payload: &Path,
    sizes: &[u64],
    devices: &[u32],
    rounds: usize,
    json: bool,
) -> Result<(), BenchError> {
    let report = measure(payload, sizes, devices, rounds)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(BenchError::Encode)?
        );
    } else {
        print_table(&report);
    }
    Ok(())
}

fn measure(
    payload: &Path,
    sizes: &[u64],
    devices: &[u32],
    rounds_per_size: usize,
) -> Result<RestoreReport, BenchError> {
    let most = devices.iter().copied().max().unwrap_or(0);
    let bound = if most == 0 {
        Vec::new()
    } else {
        match vfio_pci_devices() {
            Ok(bound) => bound,
            // No vfio-pci driver here: nothing is bound to it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(format!("list {VFIO_PCI}"))(e)),
        }
    };
    if bound.len() < most as usize {
        return Err(BenchError::Devices {
            needed: most as usize,
            found: bound.len(),
        });
    }
    let mut results = Vec::with_capacity(sizes.len() * devices.len());
    for &count in devices {
        let bdfs = &bound[..count as usize];
        // One handover not counted first: the first of a run pays for cold caches (the
        // executable, the payload) that no later one does.
        if let Some(&first) = sizes.first() {
            handover_once(payload, first, bdfs)?;
        }
        // Round by round across the sizes, so that whatever else this host does in a stretch
        // of the run weighs on every size alike, not on whichever was measured then.
        let mut rounds: Vec<Vec<Round>> = sizes.iter().map(|_| Vec::new()).collect();
        for round in 1..=rounds_per_size {
            for (&mib, measured_rounds) in sizes.iter().zip(rounds.iter_mut()) {
                let measured = handover_once(payload, mib, bdfs)?;
                eprintln!(
                    "bench restore: {mib} MiB, {count} device(s), round {round}/{rounds_per_size}: \
                     blackout {:.2} ms (save {:.2}, transfer {:.2}, load {:.2}, confirm and run \
                     {:.2})",
                    measured.blackout_ms,
                    measured.save_ms,
                    measured.transfer_ms,
                    measured.load_ms,
                    measured.confirm_and_run_ms
                );
                measured_rounds.push(measured);
            }
        }
        for (&mib, mut rounds) in sizes.iter().zip(rounds) {
            let blackouts_ms: Vec<f64> = rounds.iter().map(|r| r.blackout_ms).collect();
            rounds.sort_by(|a, b| a.blackout_ms.total_cmp(&b.blackout_ms));
            results.push(SizeResult {
                memory_mib: mib,
                devices: count,
                min_blackout_ms: rounds[0].blackout_ms,
                max_blackout_ms: rounds[rounds_per_size - 1].blackout_ms,
                median: rounds.swap_remove(rounds_per_size / 2),
                blackouts_ms,
            });
        }
    }
    let median = |mib: u64, count: u32| {
        results
            .iter()
            .find(|r| r.memory_mib == mib && r.devices == count)
            .map(|r| r.median.blackout_ms)
    };
    let flatness_of = |count: u32| {
        let medians: Vec<f64> = sizes.iter().filter_map(|&mib| median(mib, count)).collect();
        (count, flatness(&medians))
    };
    Ok(RestoreReport {
        rounds_per_size,
        flatness: devices.iter().map(|&count| flatness_of(count)).collect(),
        devices_over_none: if most == 0 {
            Vec::new()
        } else {
            sizes
                .iter()
                .filter_map(|&mib| Some((mib, median(mib, most)? / median(mib, 0)?)))
                .collect()
        },
        sizes: results,
    })
}

pub(super) fn print_table(report: &RestoreReport) {
    println!(
        "memory_mib  devices  blackout_ms (min-max)  = save  transfer  load  confirm+run   \
         built_ahead_ms (before the pause)"
    );
    for r in &report.sizes {
        let m = &r.median;
        println!(
            "{:>10}  {:>7}  {:>6.2} ({:.2}-{:.2})  = {:>4.2}  {:>8.2}  {:>4.2}  {:>11.2}   {:>8.2}",
            r.memory_mib,
            r.devices,
            m.blackout_ms,
            r.min_blackout_ms,
            r.max_blackout_ms,
            m.save_ms,
            m.transfer_ms,
            m.load_ms,
            m.confirm_and_run_ms,
            m.built_ahead_ms,
        );
    }
    println!("medians of {} rounds", report.rounds_per_size);
    for (devices, ratio) in &report.flatness {
        println!(
            "flatness over the sizes, {devices} device(s) (largest median / smallest): {ratio:.2} \
             (target <= 1.1)"
        );
    }
    for (mib, ratio) in &report.devices_over_none {
        println!("{mib} MiB: the most devices' median over none's: {ratio:.2} (target <= 1.5)");
    }
}

/// A scratch directory, removed on every exit path.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn create(path: std::path::PathBuf) -> Result<Scratch, BenchError> {
        std::fs::create_dir_all(&path).map_err(io(format!("create {}", path.display())))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills the child on every exit path.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots a guest of `mib` MiB, hands it over to a new process while it runs, and returns the
/// blackout the new process measured, once the guest vouched for its memory.
fn handover_once(payload: &Path, mib: u64, bdfs: &[String]) -> Result<Round, BenchError> {
    let dir = Scratch::create(
        std::env::temp_dir().join(format!("luvmm-bench-{}-{mib}", std::process::id())),
    )?;
    let dir = dir.0.as_path();
    let serial = dir.join("serial.log");
    let first_socket = dir.join("first.sock");
    let second_socket = dir.join("second.sock");
    let exe = std::env::current_exe().map_err(io("find this executable".into()))?;

    let mut run = Command::new(&exe);
    run.arg("run")
        .arg("--payload")
        .arg(payload)
        .args(["--memory-mib", &mib.to_string()])
        .args(["--cmdline", "console=ttyS0 luvmm.fill_pages=256"])
        .arg("--serial")
        .arg(&serial)
        .arg("--api-socket")
        .arg(&first_socket)
        .stdin(Stdio::null());
    for bdf in bdfs {
        run.args(["--vfio", bdf]);
    }
    let mut first = Reaped(run.spawn().map_err(io("spawn luvmm run".into()))?);
    let mut exited = None;
    wait_for(
        || {
            exited = first.0.try_wait().ok().flatten();
            exited.is_some() || !serial_lines(&serial, "LUVMM-BOOT").is_empty()
        },
        "the guest to boot",
    )?;
    if let Some(status) = exited {
        return Err(BenchError::Exited { status });
    }

    let second = Reaped(
        Command::new(&exe)
            .arg("restore")
            .arg("--from-socket")
            .arg(&first_socket)
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&second_socket)
            .stdin(Stdio::null())
            .spawn()
            .map_err(io("spawn luvmm restore".into()))?,
    );
    let restored = VmmClient::new(&second_socket);
    let mut running: Option<VmStatus> = None;
    wait_for(
        || {
            running = restored
                .status()
                .ok()
                .filter(|s| s.phase == VmPhase::Running);
            running.is_some()
        },
        "the restored guest to run",
    )?;
    let phases = running
        .and_then(|s| s.restore_timings)
        .ok_or(BenchError::NoTimings)?;

    // The restored guest must vouch for its memory, or the figure means nothing.
    wait_for(
        || !serial_lines(&serial, "LUVMM-CHECK").is_empty(),
        "the restored guest's check",
    )?;
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    if !log.contains("LUVMM-CHECK ok") {
        return Err(BenchError::NotOk { log });
    }
    let _ = restored.shutdown(false);
    drop(second);
    drop(first);
    round_of(phases)
}

/// The blackout's parts from the target's timings.
fn round_of(phases: RestoreTimings) -> Result<Round, BenchError> {
    let (Some(blackout_ms), Some(save_ms), Some(handed_ms), Some(built_ahead_ms)) = (
        phases.blackout_ms,
        phases.source_save_ms,
        phases.handed_after_pause_ms,
        phases.built_ahead_ms,
    ) else {
        return Err(BenchError::NoTimings);
    };
    let load_ms =
        phases.check_ms + phases.vm_ms + phases.memory_ms + phases.devices_ms + phases.vcpus_ms;
    Ok(Round {
        blackout_ms,
        save_ms,
        transfer_ms: handed_ms - save_ms,
        load_ms,
        confirm_and_run_ms: blackout_ms - handed_ms - load_ms,
        built_ahead_ms,
        phases,
    })
}

fn wait_for(mut done: impl FnMut() -> bool, what: &'static str) -> Result<(), BenchError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while Instant::now() < deadline {
        if done() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(BenchError::Timeout { what })
}
