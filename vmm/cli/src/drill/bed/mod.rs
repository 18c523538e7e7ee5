//! The nested bed from the host's side: an L1 host under QEMU with an emulated Intel IOMMU
//! and the PCI devices asked for, its initramfs, and its console lines stamped with the
//! host's clock.
//!
//! The initramfs is the bed's base image (busybox, the bed's `/init` and the shared libraries
//! luvmm needs, from `tests/nested/initramfs.sh`) with newc archives appended, which the
//! kernel unpacks over it in order: this luvmm, the payload, the plan, and the next kernel
//! with its own initramfs for the kexec.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

pub use vcpu_thread::VcpuThreadError;

use luvmm_vmm::vstate::x86_64::tsc_rate::{measure_tsc_khz, ClockError};

mod vcpu_thread;

/// This host's TSC rate, measured once per process (a quarter of a second) for every L1 it
/// boots.
fn host_tsc_khz() -> Result<u32, BedError> {
    static MEASURED: OnceLock<u32> = OnceLock::new();
    if let Some(&khz) = MEASURED.get() {
        return Ok(khz);
    }
    let khz = measure_tsc_khz().map_err(BedError::TscRate)?;
    Ok(*MEASURED.get_or_init(|| khz))
}

/// Setting up or running L1 failed.
#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes; a newc archive member holds at most 4 GiB")]
    TooBig { path: PathBuf, size: usize },
    #[error("cannot start qemu-system-x86_64 (the bed's setup installs it)")]
    Qemu(#[source] std::io::Error),
    #[error(transparent)]
    VcpuThread(#[from] VcpuThreadError),
    #[error("cannot measure this host's TSC rate for L1")]
    TscRate(#[source] ClockError),
}

/// A file to put into L1's initramfs.
pub struct InitrdFile<'a> {
    /// Absolute path in L1.
    pub path: &'a str,
    pub mode: u32,
    pub data: &'a [u8],
}

/// Reads a file for the initramfs.
pub fn read(path: &Path) -> Result<Vec<u8>, BedError> {
    std::fs::read(path).map_err(|source| BedError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `base` with a newc archive of `files` (and the directories they need) appended.
pub fn extend_initrd(base: &[u8], files: &[InitrdFile<'_>]) -> Result<Vec<u8>, BedError> {
    let mut out = base.to_vec();
    // The kernel looks for the next archive's magic at a 4-byte boundary.
    out.resize(out.len().next_multiple_of(4), 0);
    let mut dirs: Vec<String> = Vec::new();
    for file in files {
        let mut dir = Path::new(file.path.trim_start_matches('/'));
        let mut parents = Vec::new();
        while let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            parents.push(parent.to_string_lossy().into_owned());
            dir = parent;
        }
        for parent in parents.into_iter().rev() {
            if !dirs.contains(&parent) {
                dirs.push(parent);
            }
        }
    }
    let io = |source| BedError::Write {
        path: PathBuf::from("(initramfs)"),
        source,
    };
    for dir in &dirs {
        let writer = cpio::newc::Builder::new(dir)
            .mode(0o040_755)
            .nlink(2)
            .write(&mut out, 0);
        writer.finish().map_err(io)?;
    }
    for file in files {
        let size = u32::try_from(file.data.len()).map_err(|_| BedError::TooBig {
            path: PathBuf::from(file.path),
            size: file.data.len(),
        })?;
        let mut writer = cpio::newc::Builder::new(file.path.trim_start_matches('/'))
            .mode(0o100_000 | file.mode)
            .nlink(1)
            .write(&mut out, size);
        writer.write_all(file.data).map_err(io)?;
        writer.finish().map_err(io)?;
    }
    cpio::newc::trailer(&mut out).map_err(io)?;
    Ok(out)
}

/// Writes `data` to `path`.
pub fn write(path: &Path, data: &[u8]) -> Result<(), BedError> {
    std::fs::write(path, data).map_err(|source| BedError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// What to boot as L1.
pub struct L1Spec<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// Kernel command line words after the bed's own.
    pub append: &'a str,
    /// QEMU `-device` values, in order (after the IOMMU).
    pub devices: &'a [String],
    /// QEMU `-drive` values: the host files behind L1's NVMe namespaces.
    pub drives: &'a [String],
    pub memory_mib: u64,
}

/// One console line of L1 and the host time it arrived, in seconds since QEMU started.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: f64,
    pub text: String,
}

/// How an L1 run ended.
pub struct L1Run {
    pub lines: Vec<Line>,
    pub timed_out: bool,
}

/// The bed's own command line words: the IOMMU with interrupt remapping, LUO and KHO on, KVM
/// taking the XCR0 an L2 guest set without an exit (patches/0006: TCG's nested SVM lets
/// XSETBV through, and a Linux L2 guest's XSAVE breaks without it), and L1's TSC taken as
/// reliable. L1's TSC is QEMU's, from the host's clock, but under TCG L1's clocksource
/// watchdog sees its one vCPU's readings skew ("Marking clocksource tsc unstable due to
/// frequency skew", HPET 193830 ns against TSC 192229 ns, in a drill); KVM then drops its
/// master clock and moves each L2 vCPU's TSC on by itself at every schedule-in, and a
/// two-vCPU guest saw `CLOCK_MONOTONIC` go back across its vCPUs (five drills of seven).
pub const BED_CMDLINE: &str =
    "console=ttyS0 intel_iommu=on iommu=pt liveupdate=on kho=on no_timer_check panic=-1 loglevel=4 \
     kvm.luvmm_adopt_xcr0=1 tsc=reliable";

/// How long L1's console may stay silent before the bed writes a newline to it. QEMU's TCG has
/// been seen (twice, in CI) to leave L1's only vCPU halted with nothing on its console until
/// a character arrived: a received character raises the UART's interrupt, which makes QEMU
/// look at L1's pending interrupts again. Such a stall stops L1's guests' clocks while L1's
/// own moves on (a 60 s one left an L2 guest 60 s behind L1's wall clock), so it is cut short
/// at once: a newline after every half second of silence. Harmless to an L1 that is merely
/// quiet: no scenario reads its console, and the blank line L1 echoes is not kept.
const L1_SILENCE_NUDGE: Duration = Duration::from_millis(500);

/// A silence this long despite the nudges is said among the lines.
const L1_SILENCE_REPORT: Duration = Duration::from_secs(60);

/// Boots L1 and hands each console line to `on_line` as it arrives, until L1 powers off (or
/// `timeout`, after which QEMU is killed). A console silent for [`L1_SILENCE_NUDGE`] gets a
/// newline; one silent for [`L1_SILENCE_REPORT`] all the same is said among the lines.
pub fn run_l1(
    spec: &L1Spec<'_>,
    timeout: Duration,
    on_line: impl FnMut(&Line),
) -> Result<L1Run, BedError> {
    // no_timer_check: on a loaded host a TCG vCPU can miss the timer ticks Linux counts while
    // it checks the IO-APIC timer during boot, and with interrupt remapping on that check
    // panics ("timer doesn't work through Interrupt-remapped IO-APIC") instead of falling back.
    // tsc_early_khz: L1's KVM is built in, so it runs its guests' TSCs and kvmclocks at L1's
    // first, quick TSC calibration, which under TCG is now and then 0.11 % off (2593.2 MHz for
    // this machine's 2596.1) while L1's own clock keeps the refined rate; a Linux L2 guest on
    // such an L1 stalled (RCU stalls at boot, soft lockups of minutes after a restore: shown
    // by booting L1 with tsc_early_khz=2593218). Measured here, L1's rate is the TSC's own.
    let append = format!(
        "{BED_CMDLINE} tsc_early_khz={} {}",
        host_tsc_khz()?,
        spec.append
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,kernel-irqchip=split"])
        .args(["-accel", "tcg,thread=multi"])
        // `max` under TCG: SVM with NPT for nested KVM, and XSAVE, which luvmm's vCPU state
        // needs (plain qemu64 has none, so L1's KVM lacks KVM_CAP_XCRS).
        .args(["-cpu", "max"])
        .args(["-smp", "1", "-m", &format!("{}M", spec.memory_mib)])
        // The IOMMU comes first, so it is there when the devices are.
        .args(["-device", "intel-iommu,intremap=on"]);
    for drive in spec.drives {
        cmd.args(["-drive", drive]);
    }
    for device in spec.devices {
        cmd.args(["-device", device]);
    }
    cmd.arg("-kernel")
        .arg(spec.kernel)
        .arg("-initrd")
        .arg(spec.initrd)
        .args(["-append", &append])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-no-reboot")
        // Names QEMU's threads, so that L1's vCPU thread can be found and kept on one CPU.
        .args(["-name", "luvmm-l1,debug-threads=on"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(BedError::Qemu)?;
    // A process id fits an i32: the kernel's pid_max is at most 2^22.
    let pinned =
        vcpu_thread::pin_vcpu_thread(child.id() as i32, || matches!(child.try_wait(), Ok(None)));
    if let Err(err) = pinned {
        let _ = child.kill();
        let _ = child.wait();
        return Err(err.into());
    }
    let (tx, rx) = mpsc::channel();
    let streams = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for stream in streams.into_iter().flatten() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(stream).lines().map_while(Result::ok) {
                let line = Line {
                    at: started.elapsed().as_secs_f64(),
                    text,
                };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let console = Console {
        started,
        deadline: started + timeout,
        nudge_after: L1_SILENCE_NUDGE,
        report_after: L1_SILENCE_REPORT,
    };
    let run = console.follow(&rx, child.stdin.take(), on_line);
    if run.timed_out {
        let _ = child.kill();
    }
    let _ = child.wait();
    Ok(run)
}

/// L1's console as the host follows it: its lines (blank ones left out) until the streams
/// close or the deadline, a newline written to its input after each silence of `nudge_after`,
/// and a line said once a silence lasts `report_after`.
struct Console {
    started: Instant,
    deadline: Instant,
    nudge_after: Duration,
    report_after: Duration,
}

impl Console {
    fn follow(
        &self,
        rx: &mpsc::Receiver<Line>,
        mut input: Option<impl Write>,
        mut on_line: impl FnMut(&Line),
    ) -> L1Run {
        let mut lines = Vec::new();
        let mut keep = |line: Line| {
            on_line(&line);
            lines.push(line);
        };
        // The last line with something on it, and whether its silence was said.
        let mut last_said = Instant::now();
        let mut reported = false;
        let timed_out = loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(self.nudge_after)) {
                // L1's echo of a nudge.
                Ok(line) if line.text.trim().is_empty() => {}
                Ok(line) => {
                    last_said = Instant::now();
                    reported = false;
                    keep(line);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break false,
                Err(mpsc::RecvTimeoutError::Timeout) if left > self.nudge_after => {
                    let sent = input
                        .as_mut()
                        .is_some_and(|input| input.write_all(b"\n").and(input.flush()).is_ok());
                    let silent = last_said.elapsed();
                    if silent >= self.report_after && !reported {
                        reported = true;
                        keep(Line {
                            at: self.started.elapsed().as_secs_f64(),
                            text: format!(
                                "bed: L1's console has been silent for {:.0} s; {}",
                                silent.as_secs_f64(),
                                if sent {
                                    "newlines go on being sent to it"
                                } else {
                                    "a newline could not be sent to it"
                                }
                            ),
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break true,
            }
        };
        L1Run { lines, timed_out }
    }
}

impl L1Run {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_console_gets_newlines_its_echo_is_not_kept_and_a_long_silence_is_said() {
        let (tx, rx) = mpsc::channel();
        let at = |text: &str| Line {
            at: 0.0,
            text: text.into(),
        };
        let sender = std::thread::spawn(move || {
            tx.send(at("booted")).expect("send");
            std::thread::sleep(Duration::from_millis(100));
            // L1's echo of a newline: not kept, and no end to the silence.
            tx.send(at(" ")).expect("send");
            std::thread::sleep(Duration::from_millis(150));
            tx.send(at("woken")).expect("send");
        });
        let started = Instant::now();
        let console = Console {
            started,
            deadline: started + Duration::from_secs(30),
            nudge_after: Duration::from_millis(20),
            report_after: Duration::from_millis(200),
        };
        let mut input = Vec::new();
        let mut seen = 0;
        let run = console.follow(&rx, Some(&mut input), |_| seen += 1);
        sender.join().expect("sender");
        assert!(!run.timed_out);
        let texts: Vec<_> = run.lines.iter().map(|l| l.text.as_str()).collect();
        // A newline after every silence of 20 ms; the 250 ms one said once.
        assert!(
            input.len() >= 5 && input.iter().all(|&b| b == b'\n'),
            "{input:?}"
        );
        assert_eq!(texts.len(), 3, "{texts:?}");
        assert_eq!(texts[0], "booted");
        assert!(
            texts[1].starts_with("bed: L1's console has been silent for")
                && texts[1].ends_with("newlines go on being sent to it"),
            "{texts:?}"
        );
        assert_eq!(texts[2], "woken");
        assert_eq!(seen, texts.len());
    }

    #[test]
    fn a_console_silent_past_the_deadline_times_out() {
        let (_tx, rx) = mpsc::channel::<Line>();
        let started = Instant::now();
        let console = Console {
            started,
            deadline: started + Duration::from_millis(150),
            nudge_after: Duration::from_secs(60),
            report_after: Duration::from_secs(60),
        };
        let run = console.follow(&rx, None::<Vec<u8>>, |_| {});
        assert!(run.timed_out);
        assert!(run.lines.is_empty());
    }

    #[test]
    fn appended_files_form_a_newc_archive_after_the_base() {
        let base = b"base!".to_vec();
        let image = extend_initrd(
            &base,
            &[InitrdFile {
                path: "/luvmm/bin/x",
                mode: 0o755,
                data: b"hello",
            }],
        )
        .expect("archive");
        assert_eq!(&image[..5], b"base!");
        let mut archive = &image[8..];
        let mut names = Vec::new();
        loop {
            let mut entry = cpio::NewcReader::new(archive).expect("entry");
            if entry.entry().is_trailer() {
                break;
            }
            names.push((entry.entry().name().to_string(), entry.entry().mode()));
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("data");
            if entry.entry().name() == "luvmm/bin/x" {
                assert_eq!(data, b"hello");
            }
            archive = entry.finish().expect("next");
        }
        assert_eq!(
            names,
            [
                ("luvmm".to_string(), 0o040_755),
                ("luvmm/bin".to_string(), 0o040_755),
                ("luvmm/bin/x".to_string(), 0o100_755),
            ]
        );
    }
}
