//! `bench restore` measures, for each guest size, the two halves of the blackout a process
//! switch costs: pause → state saved (reported by the VMM) and restore started → guest running
//! again in a new process that received the memfds over the API socket (measured from spawn to
//! the first status reply that says running). Guest memory is never copied or walked on this
//! path, so the blackout should not grow with the guest: the flatness ratio (largest blackout
//! over smallest) should stay near 1.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::vmm::{RestoreTimings, VmPhase, VmStatus};
use serde::Serialize;

use super::{flatness, io, BenchError, STEP_TIMEOUT};
use crate::drill::guest::serial_lines;

/// Runs per size; the median is reported, so one slow process start does not decide.
const ROUNDS: usize = 3;

#[derive(Debug, Serialize)]
struct SizeResult {
    memory_mib: u64,
    pause_to_saved_ms: f64,
    restore_to_resumed_ms: f64,
    /// The restoring VMM's own phase timings, from the median round.
    restore_phases: RestoreTimings,
}

#[derive(Debug, Serialize)]
struct RestoreReport {
    sizes: Vec<SizeResult>,
    flatness_ratio: f64,
}

/// Runs `bench restore`: each size `ROUNDS` times, the median reported.
pub fn run(payload: &Path, sizes: &[u64], json: bool) -> Result<(), BenchError> {
    let mut results = Vec::with_capacity(sizes.len());
    for &mib in sizes {
        let mut rounds = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            rounds.push(restore_once(payload, mib)?);
        }
        rounds.sort_by(|a, b| blackout(a).total_cmp(&blackout(b)));
        results.push(rounds.swap_remove(ROUNDS / 2));
    }
    let blackouts: Vec<f64> = results.iter().map(blackout).collect();
    let report = RestoreReport {
        sizes: results,
        flatness_ratio: flatness(&blackouts),
    };
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

fn blackout(r: &SizeResult) -> f64 {
    r.pause_to_saved_ms + r.restore_to_resumed_ms
}

fn print_table(report: &RestoreReport) {
    println!(
        "memory_mib  pause_to_saved_ms  restore_to_resumed_ms  blackout_ms  \
         (in-VMM: check  vm  memory  devices  vcpus)"
    );
    for r in &report.sizes {
        let p = &r.restore_phases;
        println!(
            "{:>10}  {:>17.2}  {:>21.2}  {:>11.2}  {:>16.2} {:>3.2} {:>7.2} {:>8.2} {:>6.2}",
            r.memory_mib,
            r.pause_to_saved_ms,
            r.restore_to_resumed_ms,
            blackout(r),
            p.check_ms,
            p.vm_ms,
            p.memory_ms,
            p.devices_ms,
            p.vcpus_ms
        );
    }
    println!(
        "flatness ratio (largest blackout / smallest): {:.2} (target <= 1.2)",
        report.flatness_ratio
    );
}

/// Kills the child on every exit path.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn restore_once(payload: &Path, mib: u64) -> Result<SizeResult, BenchError> {
    let dir = std::env::temp_dir().join(format!("luvmm-bench-{}-{mib}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let serial = dir.join("serial.log");
    let first_socket = dir.join("first.sock");
    let second_socket = dir.join("second.sock");
    let exe = std::env::current_exe().map_err(io("find this executable".into()))?;

    let mut first = Reaped(
        Command::new(&exe)
            .arg("run")
            .arg("--payload")
            .arg(payload)
            .args(["--memory-mib", &mib.to_string()])
            .args(["--cmdline", "console=ttyS0 luvmm.fill_pages=256"])
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&first_socket)
            .stdin(Stdio::null())
            .spawn()
            .map_err(io("spawn luvmm run".into()))?,
    );
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

    let report = VmmClient::new(&first_socket).save(None)?;

    let started = Instant::now();
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
    let restore_ms = started.elapsed().as_secs_f64() * 1e3;
    let restore_phases = running
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
    let _ = std::fs::remove_dir_all(&dir);
    Ok(SizeResult {
        memory_mib: mib,
        pause_to_saved_ms: report.pause_to_saved_ms,
        restore_to_resumed_ms: restore_ms,
        restore_phases,
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
