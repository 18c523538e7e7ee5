//! The Linux guest's judge (`tests/guest/linux/judge.c`) run on the host in its test mode: each
//! of its checks is broken under its feet (a block of its file, a page of its memory, its kernel
//! log, its clock) and must say so in its `LUVMM-LINUX-CHECK` line.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use luvmm_tests::{
    judge, parse_linux_check, wait_until, LinuxCheck, LinuxMemory, TestDir, TIMEOUT,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Blocks of the judge's I/O file: small, so a whole pass takes a moment.
const IO_BLOCKS: u64 = 16;
const BLOCK: u64 = 4096;

/// A judge in host-test mode, killed when dropped.
struct Judge {
    child: Child,
    lines: Receiver<String>,
    requests: File,
    kmsg: File,
    file: std::path::PathBuf,
    /// The READY line's fields.
    ready: serde_json::Value,
    _dir: TestDir,
}

impl Judge {
    /// Starts a judge whose kernel log already holds `boot_log`, with `extra` flags, and waits
    /// for its READY line.
    fn start(name: &str, boot_log: &str, extra: &[&str]) -> Judge {
        let dir = TestDir::new(name);
        let file = dir.join("io.bin");
        let kmsg_path = dir.join("kmsg");
        let requests_path = dir.join("requests");
        std::fs::write(&kmsg_path, boot_log).expect("write the boot log");
        File::create(&requests_path).expect("create the requests file");
        let io_kib = (IO_BLOCKS * BLOCK / 1024).to_string();
        let mut child = Command::new(judge())
            .arg("--host-test")
            .arg("--file")
            .arg(&file)
            .arg("--kmsg")
            .arg(&kmsg_path)
            .arg("--requests")
            .arg(&requests_path)
            .args(["--io-kib", &io_kib, "--mem-kib", "2048"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the judge");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines.recv_timeout(TIMEOUT).expect("the judge's first line");
        let ready = first
            .strip_prefix("LUVMM-LINUX-READY ")
            .unwrap_or_else(|| panic!("not a READY line: {first}"));
        let ready: serde_json::Value = serde_json::from_str(ready).expect("READY is JSON");
        let open = |p| {
            OpenOptions::new()
                .append(true)
                .open(p)
                .expect("open for append")
        };
        Judge {
            child,
            lines,
            requests: open(&requests_path),
            kmsg: open(&kmsg_path),
            file,
            ready,
            _dir: dir,
        }
    }

    /// Asks for a check and returns its line, which must be the judge's next one.
    fn check(&mut self) -> LinuxCheck {
        self.requests
            .write_all(b"check\n")
            .expect("ask for a check");
        let line = self
            .lines
            .recv_timeout(TIMEOUT)
            .expect("a check line within the timeout");
        parse_linux_check(&line).unwrap_or_else(|| panic!("not a check line: {line}"))
    }

    /// Checks until `done` holds for one, which it returns.
    fn check_until(&mut self, what: &str, done: impl Fn(&LinuxCheck) -> bool) -> LinuxCheck {
        wait_until(what, || {
            let c = self.check();
            done(&c).then_some(c)
        })
    }

    /// Appends lines to the kernel log.
    fn log(&mut self, text: &str) {
        self.kmsg
            .write_all(text.as_bytes())
            .expect("append to kmsg");
    }

    /// Waits for two whole passes over the file, so every block has been checked at rest.
    fn two_passes(&mut self) -> LinuxCheck {
        self.check_until("two passes of the I/O loop", |c| {
            c.io.as_ref().is_some_and(|io| io.written >= 2 * IO_BLOCKS)
        })
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits an i32"))
    }
}

impl Drop for Judge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A boot's log: the boot's own clocksource switch, an NVMe line that is no reset, and notices
/// (seen in this host's own log) that name a warning word without being one.
const BOOT_LOG: &str = "6,1,1000,-;clocksource: Switched to clocksource kvm-clock\n\
     6,2,2000,-;nvme nvme0: 2/0/0 default/read/poll queues\n\
     \x20SUBSYSTEM=nvme\n\
     4,3,3000,-;Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc/html/latest/admin-guide/hw-vuln/srso.html for mitigation options.\n\
     6,4,4000,-;NMI watchdog: Perf NMI watchdog permanently disabled\n";

#[test]
fn linux_judge_clean_run_is_all_ok() {
    let mut j = Judge::start("judge-clean", BOOT_LOG, &[]);
    assert_eq!(j.ready["pages"], 512, "2 MiB of 4 KiB pages: {}", j.ready);
    assert_eq!(j.ready["io_blocks"], IO_BLOCKS);
    let c = j.two_passes();
    let io = c.io.as_ref().expect("an I/O report");
    assert!(c.memory.ok(), "{c:?}");
    assert!(io.written > 0 && io.verified > 0, "{io:?}");
    assert_eq!((io.errors, io.mismatches), (0, 0), "{io:?}");
    assert!(
        io.verified > io.written,
        "blocks are verified at rest too: {io:?}"
    );
    assert!(c.kernel_warnings.is_empty(), "{:?}", c.kernel_warnings);
    assert_eq!((c.kernel_warning_count, c.controller_resets), (0, 0));
    assert!(!c.clock.monotonic_backwards);
    assert!(c.clock.realtime_offset_ms.abs() < 50.0, "{:?}", c.clock);
    // Exactly one line per request, numbered.
    let next = j.check();
    assert_eq!(next.checks, c.checks + 1);
    assert!(next.uptime_s >= c.uptime_s);
}

#[test]
fn linux_judge_reports_a_corrupted_block() {
    let mut j = Judge::start("judge-block", "", &[]);
    j.two_passes();
    // Under the judge's feet: a few bytes in the payload of every block, once.
    let file = OpenOptions::new()
        .write(true)
        .open(&j.file)
        .expect("open the judge's file");
    for lba in 0..IO_BLOCKS {
        file.write_at(b"under its feet", lba * BLOCK + 1000)
            .expect("corrupt a block");
    }
    file.sync_all().expect("sync the corruption");
    let c = j.check_until("a mismatch", |c| {
        c.io.as_ref().is_some_and(|io| io.mismatches > 0)
    });
    let io = c.io.expect("an I/O report");
    let first = io.first_mismatch.expect("where the first mismatch was");
    assert_eq!(
        first.why, "crc",
        "payload bytes changed, the header did not: {first:?}"
    );
    assert!(first.lba < IO_BLOCKS);
    assert_eq!(io.errors, 0);
    assert!(c.memory.ok());
}

#[test]
fn linux_judge_counts_failed_io_as_errors() {
    let mut j = Judge::start("judge-errors", "", &[]);
    j.two_passes();
    // Cut the file: the blocks past its end read short. Again until it shows: a cut just before
    // the last block's write leaves the whole length to read (its holes read as zeros).
    let file = j.file.clone();
    let c = j.check_until("an I/O error", |c| {
        File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(0))
            .expect("truncate the judge's file");
        c.io.as_ref().is_some_and(|io| io.errors > 0)
    });
    let io = c.io.expect("an I/O report");
    assert_eq!(io.last_errno, libc::EIO, "a short read is an EIO: {io:?}");
    assert!(
        io.longest_stall_ms >= 10.0,
        "the loop waits 10 ms after an error: {io:?}"
    );
}

#[test]
fn linux_judge_reports_a_corrupted_page() {
    let mut j = Judge::start("judge-page", "", &[]);
    assert!(j.check().memory.ok());
    let base = j.ready["mem_base"]
        .as_str()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no mem_base in {}", j.ready));
    // Its parent may write its memory: one word of page 7 and one of page 100.
    let mem = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/mem", j.child.id()))
        .expect("open the judge's memory");
    let word = 0x0bad_0bad_0bad_0badu64;
    for page in [7, 100] {
        mem.write_at(&word.to_le_bytes(), base + page * BLOCK)
            .expect("write the judge's page");
    }
    let c = j.check();
    let LinuxMemory::Bad(bad) = &c.memory else {
        panic!("the pages were changed: {c:?}");
    };
    assert_eq!(bad.first_bad_page, 7);
    assert_eq!(bad.bad_pages, 2);
    assert_eq!(bad.found, format!("0x{word:016x}"));
    assert_ne!(bad.expected, bad.found);
}

#[test]
fn linux_judge_reports_kernel_warnings_and_controller_resets() {
    let mut j = Judge::start("judge-kmsg", BOOT_LOG, &[]);
    let c = j.check();
    assert!(
        c.kernel_warnings.is_empty() && c.controller_resets == 0,
        "the boot's log is clean: {c:?}"
    );
    let warnings = [
        "WARNING: CPU: 1 PID: 42 at kernel/time/timekeeping.c:100 update_wall_time+0x10/0x20",
        "watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [judge:60]",
        "rcu: INFO: rcu_sched self-detected stall on CPU",
        "INFO: task kworker/0:1:12 blocked for more than 120 seconds.",
        "clocksource: timekeeping watchdog on CPU1: Marking clocksource 'tsc' as unstable because the skew is too large:",
        "clocksource: Switched to clocksource hpet",
        "Oops: general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP",
    ];
    for (i, w) in warnings.iter().enumerate() {
        j.log(&format!("4,{},{},-;{w}\n", 10 + i, 5_000_000 + i));
    }
    // As plain lines too, and the driver's timeout, which is a reset and no warning.
    j.log("nvme nvme0: I/O 12 QID 1 timeout, reset controller\n");
    j.log("nvme nvme0: I/O tag 3 (1003) QID 0 timeout, completion polled\n");
    j.log("6,30,6000000,-;nvme nvme0: 2/0/0 default/read/poll queues\n");
    // A command line that sets the driver's timeouts is neither.
    j.log("5,31,6000001,-;Kernel command line: console=ttyS0 nvme_core.io_timeout=3\n");
    let c = j.check_until("the new log lines", |c| {
        c.kernel_warning_count >= warnings.len() as u64
    });
    assert_eq!(c.kernel_warnings, warnings, "each warning, in order");
    assert_eq!(c.kernel_warning_count, warnings.len() as u64);
    assert_eq!(c.controller_resets, 2);
}

/// Each of the judge's warning patterns alone on a line (real lines often hold several).
#[test]
fn linux_judge_matches_each_warning_pattern() {
    let mut j = Judge::start("judge-patterns", "", &[]);
    let lines = [
        "Oops: 0000 [#1] SMP",
        "BUG: unable to handle page fault for address: ffffffffffffffe8",
        "WARNING: CPU: 0 PID: 1 at a.c:1 f+0x1/0x2",
        "soft lockup - CPU#0 stuck for 23s! [judge:60]",
        "Watchdog detected hard LOCKUP on cpu 1",
        "rcu: INFO: rcu_sched detected expedited stalls on CPUs/tasks: { 1-... }",
        "rcu_sched self-detected stall on CPU",
        "rcu_preempt detected stalls on CPUs/tasks:",
        "INFO: task sh:1 blocked for more than 122 seconds.",
        "watchdog: watchdog0: watchdog did not stop!",
        "general protection fault, probably for non-canonical address 0xdead000000000100",
        "Kernel panic - not syncing: Fatal exception",
        "clocksource: Marking clocksource 'tsc' as unstable because the skew is too large",
        "clocksource: Switched to clocksource hpet",
    ];
    j.log(&lines.map(|l| format!("{l}\n")).concat());
    j.log("an ordinary line\n");
    let c = j.check_until("the warnings", |c| {
        c.kernel_warning_count >= lines.len() as u64
    });
    assert_eq!(c.kernel_warnings, lines);
    assert_eq!(c.controller_resets, 0);
}

#[test]
fn linux_judge_keeps_the_first_twenty_warnings() {
    let mut j = Judge::start("judge-many", "", &[]);
    let text: String = (0..25)
        .map(|i| format!("BUG: scheduling while atomic: {i}\n"))
        .collect();
    j.log(&text);
    let c = j.check_until("25 warnings", |c| c.kernel_warning_count == 25);
    assert_eq!(c.kernel_warnings.len(), 20);
    assert_eq!(c.kernel_warnings[19], "BUG: scheduling while atomic: 19");
}

#[test]
fn linux_judge_sees_a_stall() {
    let mut j = Judge::start("judge-stall", "", &[]);
    let before = j.two_passes();
    assert!(before.clock.longest_gap_ms < 400.0, "{:?}", before.clock);
    // Frozen, as a guest whose vCPUs stop.
    kill(j.pid(), Signal::SIGSTOP).expect("stop the judge");
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    kill(j.pid(), Signal::SIGCONT).expect("continue the judge");
    let held = stopped.elapsed().as_secs_f64() * 1000.0;
    let c = j.check();
    assert!(
        c.clock.longest_gap_ms >= 450.0 && c.clock.longest_gap_ms <= held + 100.0,
        "the clock thread's gap spans the stop ({held} ms): {:?}",
        c.clock
    );
    let io = c.io.expect("an I/O report");
    assert!(
        io.longest_stall_ms >= 450.0,
        "the I/O loop stalled across the stop: {io:?}"
    );
    assert!(!c.clock.monotonic_backwards);
    // Each check says what its own span saw. An I/O in flight across the stop may complete
    // after the check above and count its whole stall again in the span it ends in; the
    // span after the loop has moved on has no stop in it.
    let moved_on = io.written + io.verified;
    j.check_until("the I/O loop to go on after the stop", |c| {
        c.io.as_ref()
            .is_some_and(|io| io.written + io.verified > moved_on)
    });
    let next = j.check();
    assert!(next.clock.longest_gap_ms < 400.0, "{:?}", next.clock);
    let io = next.io.expect("an I/O report");
    assert!(io.longest_stall_ms < 400.0, "{io:?}");
}

#[test]
fn linux_judge_measures_the_host_clock_offset() {
    // The "host" clock runs 1.5 s ahead of the judge's: the guest is 1.5 s behind.
    let mut j = Judge::start("judge-offset", "", &["--host-offset-ms", "1500"]);
    let c = j.check();
    assert!(
        (c.clock.realtime_offset_ms + 1500.0).abs() < 50.0,
        "{:?}",
        c.clock
    );
}

#[test]
fn linux_judge_parser_reads_the_line() {
    let line = r#"LUVMM-LINUX-CHECK {"checks":3,"uptime_s":12.5,"memory":{"first_bad_page":9,"expected":"0x01","found":"0x02","bad_pages":1},"io":null,"kernel_warnings":["BUG: x"],"kernel_warning_count":1,"controller_resets":2,"clock":{"realtime_offset_ms":-0.25,"monotonic_backwards":true,"longest_gap_ms":7.0}}"#;
    let c = parse_linux_check(&format!("{line}\r")).expect("a check line");
    assert_eq!(c.checks, 3);
    assert!(!c.memory.ok());
    assert!(c.io.is_none());
    assert_eq!(c.kernel_warnings, ["BUG: x"]);
    assert_eq!(c.controller_resets, 2);
    assert!(c.clock.monotonic_backwards);
    assert!(parse_linux_check("LUVMM-CHECK ok pages=1").is_none());
    assert!(parse_linux_check(&line.replace("\"checks\":3,", "")).is_none());
    assert!(
        parse_linux_check(&line[..line.len() - 1]).is_none(),
        "a cut line"
    );
}
