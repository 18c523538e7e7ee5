//! The nested bed's driver: builds (or reuses) the L1 kernel and initramfs, boots L1 under QEMU
//! TCG with an emulated Intel IOMMU and the PCI devices a test asks for (`edu`, NVMe, ...)
//! through luvmm's own bed driver, and reads its `LUVMM-L1` lines with host timestamps.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use luvmm::drill::bed::L1Spec;
use luvmm_resources::sync::lock;

/// The kernel, its selftests and the initramfs, ready to boot.
pub struct Bed {
    pub kernel_dir: PathBuf,
    pub initrd: PathBuf,
}

impl Bed {
    /// `--kernel K --initrd I` for luvmm's own bed commands (`drill`, `bench ... --kernel`):
    /// the L1 kernel and the base image without /boot, to which they add what they need.
    pub fn luvmm_args(&self) -> [std::ffi::OsString; 4] {
        let base = self.initrd.with_file_name("initrd-stage2.cpio.gz");
        [
            "--kernel".into(),
            self.kernel_dir.join("bzImage").into(),
            "--initrd".into(),
            base.into(),
        ]
    }
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
    // Not while an L1 runs: a kernel build or an initramfs's gzip beside a running L1 starves
    // its TCG vCPU, and a Linux guest in it then reports stalls it would never have.
    let _turn = one_l1_at_a_time();
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

/// As [`prepare`], for an L1 whose init is Debian sid's systemd (`systemd-initramfs.sh`, on
/// the root the setup step built with `sid-root.sh`).
pub fn prepare_systemd(work: &Path, binaries: &[PathBuf]) -> Bed {
    let _turn = one_l1_at_a_time();
    let kernel_dir = PathBuf::from(run_script("kernel.sh", &[]));
    let mut args: Vec<&Path> = vec![work, &kernel_dir];
    args.extend(binaries.iter().map(PathBuf::as_path));
    let initrd = PathBuf::from(run_script("systemd-initramfs.sh", &args));
    Bed { kernel_dir, initrd }
}

/// The Linux microVM guest from `guest-kernel.sh` (built once, then cached), copied into
/// `into` as `guest-vmlinux`, `guest-bzImage` and `guest-initrd.cpio.gz`, the names the
/// scenarios use under /luvmm/bin.
pub fn linux_guest(into: &Path) -> Vec<PathBuf> {
    // Not while an L1 runs (see `prepare`).
    let _turn = one_l1_at_a_time();
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    let dir = GUEST
        .get_or_init(|| PathBuf::from(run_script("guest-kernel.sh", &[])))
        .clone();
    ["vmlinux", "bzImage", "initrd.cpio.gz"]
        .iter()
        .map(|name| {
            let to = into.join(format!("guest-{name}"));
            std::fs::copy(dir.join(name), &to)
                .unwrap_or_else(|e| panic!("cannot copy the guest's {name}: {e}"));
            to
        })
        .collect()
}

pub use luvmm::drill::bed::{L1Run, Line};

/// What the bed's scenarios print.
pub trait Results {
    /// `LUVMM-L1` lines without the prefix.
    fn results(&self) -> Vec<&str>;
    /// Host time of the first line containing `needle`.
    fn time_of(&self, needle: &str) -> Option<f64>;
}

impl Results for L1Run {
    fn results(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| {
                l.text
                    .split_once("LUVMM-L1 ")
                    .map(|(_, rest)| rest.trim_end())
            })
            .collect()
    }

    fn time_of(&self, needle: &str) -> Option<f64> {
        self.lines
            .iter()
            .find(|l| l.text.contains(needle))
            .map(|l| l.at)
    }
}

/// One `edu` device, for scenarios that need just one.
pub const ONE_EDU: &[&str] = &["edu"];

/// Boots L1 (with luvmm's own bed driver, as `luvmm drill` does) with `scenario`, `append`
/// added to the kernel command line, and `devices` (each a QEMU `-device` value, in order),
/// and waits for it to power off (or `timeout`, after which QEMU is killed).
/// `drives` are QEMU `-drive` values for L1's NVMe namespaces.
pub fn run_l1(
    bed: &Bed,
    scenario: &str,
    append: &str,
    devices: &[&str],
    drives: &[String],
    timeout: Duration,
) -> L1Run {
    let append = format!("luvmm.scenario={scenario} {append}");
    let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    let kernel = bed.kernel_dir.join("bzImage");
    let spec = L1Spec {
        kernel: &kernel,
        initrd: &bed.initrd,
        append: &append,
        devices: &devices,
        drives,
        memory_mib: 3072,
    };
    // One L1 at a time: TCG is CPU-bound and the machine has two cores.
    let _turn = one_l1_at_a_time();
    // Each console line also goes to a file as it arrives, to follow a long run (or one that
    // hangs) from outside.
    let live = std::env::temp_dir().join(format!("luvmm-l1-{scenario}.log"));
    let mut live = std::fs::File::create(&live).ok();
    luvmm::drill::bed::run_l1(&spec, timeout, |line| {
        if let Some(file) = live.as_mut() {
            let _ = writeln!(file, "[{:8.3}] {}", line.at, line.text);
        }
    })
    .expect("boot L1 under QEMU")
}

/// Held while an L1 runs, by the scenario tests and the drill tests alike, and while a test
/// prepares what its L1 boots, so that no CPU-bound preparation runs beside an L1.
pub fn one_l1_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    lock(&ONE_AT_A_TIME)
}
