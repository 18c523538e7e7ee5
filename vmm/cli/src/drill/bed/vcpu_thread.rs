//! L1's vCPU thread kept on one host CPU.
//!
//! Under TCG, L1's TSC is the host's own `rdtsc`, read on whichever host CPU runs QEMU's vCPU
//! thread, and a host's CPUs' TSCs need not be in step: on the bed's 2-CPU machines, TSC reads
//! handed between the two CPUs went back by up to 426 cycles (22 664 times in 40 million).
//! Each time the scheduler moved the thread, L1 saw its TSC step back, and so did the L2
//! guests whose TSC is L1's plus an offset. Kept on one CPU, L1's TSC only moves forward.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// QEMU's name for L1's one vCPU thread under TCG (with `-name …,debug-threads=on`).
const VCPU_THREAD_NAME: &str = "CPU 0/TCG";

/// How long QEMU may take to start its vCPU thread: it does so while it builds the machine,
/// before it loads the kernel and initramfs.
const FIND_TIMEOUT: Duration = Duration::from_secs(10);

/// L1's vCPU thread could not be kept on one host CPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuThreadError {
    #[error(
        "QEMU (pid {qemu}) started no thread named {VCPU_THREAD_NAME:?} within {FIND_TIMEOUT:?}"
    )]
    NotFound { qemu: i32 },
    #[error("cannot read this process's CPU affinity")]
    OwnAffinity(#[source] nix::Error),
    #[error("cannot keep QEMU's vCPU thread {tid} on host CPU {cpu}")]
    Pin {
        tid: i32,
        cpu: usize,
        #[source]
        source: nix::Error,
    },
}

/// Keeps QEMU `qemu`'s vCPU thread on the last host CPU this process may use, once QEMU has
/// started it. Nothing is done where there is only one CPU (nothing moves) or where QEMU
/// exited first (its exit is the run's to report).
pub fn pin_vcpu_thread(qemu: i32, mut alive: impl FnMut() -> bool) -> Result<(), VcpuThreadError> {
    let allowed = sched_getaffinity(Pid::from_raw(0)).map_err(VcpuThreadError::OwnAffinity)?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect();
    let Some(&cpu) = cpus.last().filter(|_| cpus.len() > 1) else {
        return Ok(());
    };
    let tasks = Path::new("/proc").join(qemu.to_string()).join("task");
    let started = Instant::now();
    let tid = loop {
        if let Some(tid) = find_thread(&tasks, VCPU_THREAD_NAME) {
            break tid;
        }
        if !alive() {
            return Ok(());
        }
        if started.elapsed() > FIND_TIMEOUT {
            return Err(VcpuThreadError::NotFound { qemu });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut only = CpuSet::new();
    only.set(cpu)
        .map_err(|source| VcpuThreadError::Pin { tid, cpu, source })?;
    sched_setaffinity(Pid::from_raw(tid), &only).map_err(|source| VcpuThreadError::Pin {
        tid,
        cpu,
        source,
    })
}

/// The id of the thread named `name` among `tasks` (a `/proc/PID/task` directory).
fn find_thread(tasks: &Path, name: &str) -> Option<i32> {
    std::fs::read_dir(tasks).ok()?.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        (comm.trim_end() == name)
            .then(|| task.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_found_by_its_name() {
        let (started, running) = std::sync::mpsc::channel();
        let named = std::thread::Builder::new()
            .name("luvmm-pin-test".into())
            // Rust names the thread before it runs the closure.
            .spawn(move || {
                let _ = started.send(());
                std::thread::sleep(Duration::from_millis(500));
            })
            .expect("spawn");
        running.recv().expect("the named thread runs");
        let tasks = Path::new("/proc/self/task");
        let tid = find_thread(tasks, "luvmm-pin-test").expect("the named thread");
        assert!(tasks.join(tid.to_string()).exists());
        assert_eq!(find_thread(tasks, "no such thread"), None);
        named.join().expect("join");
    }
}
