//! The nested bed's driver: builds (or reuses) the L1 kernel and initramfs, boots L1 under QEMU
//! TCG with an emulated Intel IOMMU and the PCI devices a test asks for (`edu`, NVMe, ...), and
//! collects its `LUVMM-L1` lines with host timestamps. On any failure it prints the tail of
//! the L1 console.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The kernel, its selftests and the initramfs, ready to boot.
pub struct Bed {
    pub kernel_dir: PathBuf,
    pub initrd: PathBuf,
}

fn nested_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nested")
}

fn run_script(script: &str, args: &[&Path]) -> String {
    let out = Command::new("bash")
        .arg(nested_dir().join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed ({})", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// Gets the kernel from `kernel.sh` (cached after the first build) and packs `binaries` into
/// the initramfs under `work`. Both scripts first check that the setup step installed the
/// bed's tools (QEMU, the kernel build, busybox) and fail naming it if not.
pub fn prepare(work: &Path, binaries: &[PathBuf]) -> Bed {
    // One kernel per test process, built or found once even when tests run in parallel.
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    let kernel_dir = KERNEL
        .get_or_init(|| PathBuf::from(run_script("kernel.sh", &[])))
        .clone();
    let mut args: Vec<&Path> = vec![work, &kernel_dir];
    args.extend(binaries.iter().map(PathBuf::as_path));
    let initrd = PathBuf::from(run_script("initramfs.sh", &args));
    Bed { kernel_dir, initrd }
}

/// One line of L1 output and the host time it arrived, in seconds since QEMU started.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: f64,
    pub text: String,
}

/// What an L1 run printed.
pub struct L1Run {
    pub lines: Vec<Line>,
    pub timed_out: bool,
}

impl L1Run {
    /// `LUVMM-L1` lines without the prefix.
    pub fn results(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| {
                l.text
                    .split_once("LUVMM-L1 ")
                    .map(|(_, rest)| rest.trim_end())
            })
            .collect()
    }

    /// Host time of the first line containing `needle`.
    pub fn time_of(&self, needle: &str) -> Option<f64> {
        self.lines
            .iter()
            .find(|l| l.text.contains(needle))
            .map(|l| l.at)
    }

    /// The last `n` console lines, for failure reports.
    pub fn tail(&self, n: usize) -> String {
        let start = self.lines.len().saturating_sub(n);
        self.lines[start..]
            .iter()
            .map(|l| format!("[{:8.3}] {}", l.at, l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One `edu` device, for scenarios that need just one.
pub const ONE_EDU: &[&str] = &["edu"];

/// Boots L1 with `scenario` and `devices` (each a QEMU `-device` value, in order), and waits
/// for it to power off (or `timeout`, after which QEMU is killed).
pub fn run_l1(bed: &Bed, scenario: &str, devices: &[&str], timeout: Duration) -> L1Run {
    // no_timer_check: on a loaded host a TCG vCPU can miss the timer ticks Linux counts while
    // it checks the IO-APIC timer during boot, and with interrupt remapping on that check
    // panics ("timer doesn't work through Interrupt-remapped IO-APIC") instead of falling back.
    let append = format!(
        "console=ttyS0 intel_iommu=on iommu=pt liveupdate=on kho=on no_timer_check panic=-1 loglevel=4 luvmm.scenario={scenario}"
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,kernel-irqchip=split"])
        .args(["-accel", "tcg,thread=multi"])
        // `max` under TCG: SVM with NPT for nested KVM, and XSAVE, which luvmm's vCPU state
        // needs (plain qemu64 has none, so L1's KVM lacks KVM_CAP_XCRS).
        .args(["-cpu", "max"])
        .args(["-smp", "1", "-m", "3G"])
        // The IOMMU comes first, so it is there when the devices are.
        .args(["-device", "intel-iommu,intremap=on"]);
    for device in devices {
        cmd.args(["-device", device]);
    }
    cmd.arg("-kernel")
        .arg(bed.kernel_dir.join("bzImage"))
        .arg("-initrd")
        .arg(&bed.initrd)
        .args(["-append", &append])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // One L1 at a time: TCG is CPU-bound and the machine has two cores.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start qemu-system-x86_64");
    let (tx, rx) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx
                    .send(Line {
                        at: started.elapsed().as_secs_f64(),
                        text,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    drop(tx);
    let deadline = started + timeout;
    let mut lines = Vec::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    L1Run { lines, timed_out }
}
