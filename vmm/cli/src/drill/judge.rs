//! The Linux guest's judge (`tests/guest/linux/judge.c`, in the bed's guest initramfs): what
//! its `LUVMM-LINUX-CHECK` lines say, and what the drill and the tests require of them. The
//! guest's own kernel and drivers are the witnesses: its memory, its block I/O through its
//! nvme driver, its kernel log and its clocks.

use serde::{Deserialize, Serialize};

/// One `LUVMM-LINUX-CHECK` line of the Linux guest's judge: what the guest itself saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinuxCheck {
    /// Checks answered so far, this one included.
    pub checks: u64,
    /// The guest's CLOCK_BOOTTIME at the check.
    pub uptime_s: f64,
    pub memory: LinuxMemory,
    /// `None` when the guest has no device to drive.
    pub io: Option<LinuxIo>,
    /// The first warnings of the guest's kernel log, as logged.
    pub kernel_warnings: Vec<String>,
    /// All of them, past the first ones kept.
    pub kernel_warning_count: u64,
    /// NVMe timeouts, aborts and controller resets the guest's driver logged.
    pub controller_resets: u64,
    pub clock: LinuxClock,
}

/// The memory report: `"ok"`, or the first page that lost its word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LinuxMemory {
    Bad(LinuxBadPage),
    Status(String),
}

impl LinuxMemory {
    /// Every filled page still holds its word.
    pub fn ok(&self) -> bool {
        matches!(self, LinuxMemory::Status(s) if s == "ok")
    }
}

/// The first page whose word changed, and how many did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxBadPage {
    /// Index of the page in the judge's filled region.
    pub first_bad_page: u64,
    pub expected: String,
    pub found: String,
    pub bad_pages: u64,
}

/// The I/O loop's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinuxIo {
    pub written: u64,
    /// Blocks read back (at once, or a pass later) and found as written.
    pub verified: u64,
    /// Failed or short reads and writes.
    pub errors: u64,
    /// Blocks read back that differ from what was written.
    pub mismatches: u64,
    /// The longest wait for one I/O, or between two completions, since the previous check.
    pub longest_stall_ms: f64,
    /// errno of the last error, 0 if none.
    pub last_errno: i32,
    #[serde(default)]
    pub first_mismatch: Option<LinuxMismatch>,
}

/// Where the first mismatch was and what was wrong: `crc` (torn or corrupted), `stale` (an
/// older or misplaced block) or `data` (a consistent block with the wrong payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxMismatch {
    pub lba: u64,
    pub why: String,
}

/// The guest's clocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinuxClock {
    /// Guest CLOCK_REALTIME minus the host's, read through the guest-control port.
    pub realtime_offset_ms: f64,
    pub monotonic_backwards: bool,
    /// The largest gap between two of the judge's ~1 ms samples of CLOCK_MONOTONIC since the
    /// previous check: the longest the guest saw itself stopped.
    pub longest_gap_ms: f64,
    /// Over one of those samples, the most CLOCK_MONOTONIC moved on beyond the TSC (signed):
    /// a guest TSC left standing over a pause lags by the pause.
    #[serde(default)]
    pub tsc_lag_ms: f64,
}

impl LinuxCheck {
    /// The span since `previous` ran smoothly: blocks verified, no new timeout or reset, and
    /// no I/O stalled as long as a second. A guest whose driver recovered a reset device
    /// reaches this; one still recovering does not.
    pub fn ran_smoothly_since(&self, previous: &LinuxCheck) -> bool {
        let io_went_on = match (&self.io, &previous.io) {
            (Some(now), Some(then)) => {
                now.verified > then.verified
                    && now.errors == then.errors
                    && now.longest_stall_ms < 1000.0
            }
            _ => false,
        };
        io_went_on && self.controller_resets == previous.controller_resets
    }
}

/// The prefix of the judge's check lines.
pub const LINUX_CHECK: &str = "LUVMM-LINUX-CHECK ";

/// Parses one `LUVMM-LINUX-CHECK {json}` line; `None` for any other or a malformed one.
pub fn parse_linux_check(line: &str) -> Option<LinuxCheck> {
    let json = line.trim_end().strip_prefix(LINUX_CHECK)?;
    serde_json::from_str(json).ok()
}

/// The judge's verdict on one VM across a round (its check before the update, and every check
/// after it), under the names scripts rely on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinuxVerdict {
    /// `ok`, or the first page that lost its word, after the round.
    pub memory: LinuxMemory,
    /// The I/O loop's counters after the round; its longest stall is the longest over the
    /// round. `None`: the guest drives no NVMe controller.
    pub io: Option<LinuxIo>,
    /// The clocks after the resume; `longest_gap_ms` is the longest the guest saw itself
    /// stopped over the round: the blackout as the guest saw it.
    pub clock: LinuxClock,
    /// The warnings the guest's kernel logged (since its boot: any is one too many).
    pub kernel_warnings: Vec<String>,
    /// NVMe timeouts, aborts and controller resets the guest's driver logged over the round.
    pub controller_resets: u64,
}

impl LinuxVerdict {
    /// The verdict of the round's checks after the update, `earlier` ones then `last` (the
    /// state the guest is left in), against `before`.
    pub fn of(before: &LinuxCheck, earlier: &[LinuxCheck], last: &LinuxCheck) -> LinuxVerdict {
        let after = || earlier.iter().chain([last]);
        let longest = |f: fn(&LinuxCheck) -> Option<f64>| after().filter_map(f).reduce(f64::max);
        let mut io = last.io.clone();
        if let (Some(io), Some(stall)) = (
            io.as_mut(),
            longest(|c| c.io.as_ref().map(|io| io.longest_stall_ms)),
        ) {
            io.longest_stall_ms = stall;
        }
        let mut clock = last.clock.clone();
        clock.longest_gap_ms = longest(|c| Some(c.clock.longest_gap_ms)).unwrap_or(0.0);
        clock.monotonic_backwards = after().any(|c| c.clock.monotonic_backwards);
        LinuxVerdict {
            memory: last.memory.clone(),
            io,
            clock,
            kernel_warnings: last.kernel_warnings.clone(),
            controller_resets: last
                .controller_resets
                .saturating_sub(before.controller_resets),
        }
    }

    /// The guest's block loop went on across the round: blocks verified since `before`, no
    /// error and no mismatch.
    pub fn io_went_on(&self, before: &LinuxCheck) -> bool {
        match (&self.io, &before.io) {
            (Some(io), Some(then)) => {
                io.errors == 0 && io.mismatches == 0 && io.verified > then.verified
            }
            _ => false,
        }
    }

    /// What the guest lost, or did not go on with, across the round; empty when nothing.
    /// `drives`: the guest has an NVMe controller, whose blocks must have gone on.
    /// `resets_allowed`: the device came back reset, so its driver's timeouts and resets are
    /// its recovery, not a loss.
    pub fn losses(
        &self,
        before: &LinuxCheck,
        after: &LinuxCheck,
        drives: bool,
        resets_allowed: bool,
    ) -> Vec<String> {
        let mut lost = Vec::new();
        if let LinuxMemory::Bad(bad) = &self.memory {
            lost.push(format!(
                "memory: {} page(s) lost their word, the first page {} ({} became {})",
                bad.bad_pages, bad.first_bad_page, bad.expected, bad.found
            ));
        } else if !self.memory.ok() {
            lost.push(format!("memory: {:?}", self.memory));
        }
        if after.uptime_s < before.uptime_s || after.checks <= before.checks {
            lost.push(format!(
                "another boot: uptime {:.1} s, check {} before; {:.1} s, check {} after",
                before.uptime_s, before.checks, after.uptime_s, after.checks
            ));
        }
        match (&self.io, before.io.as_ref()) {
            (Some(io), Some(then)) => {
                if io.errors > 0 || io.mismatches > 0 {
                    lost.push(format!(
                        "io: {} error(s) (last errno {}), {} mismatch(es){}",
                        io.errors,
                        io.last_errno,
                        io.mismatches,
                        io.first_mismatch
                            .as_ref()
                            .map(|m| format!(", the first at block {} ({})", m.lba, m.why))
                            .unwrap_or_default()
                    ));
                }
                if io.verified <= then.verified {
                    lost.push(format!(
                        "io: no block verified since the check before ({} then {})",
                        then.verified, io.verified
                    ));
                }
            }
            (None, _) | (_, None) if drives => {
                lost.push("io: the guest reports no I/O on its NVMe controller".to_string());
            }
            _ => {}
        }
        if let Some(first) = self.kernel_warnings.first() {
            lost.push(format!(
                "kernel: {} warning(s), the first: {first}",
                after.kernel_warning_count
            ));
        }
        if self.clock.monotonic_backwards {
            lost.push("clock: CLOCK_MONOTONIC went back".to_string());
        }
        if self.clock.realtime_offset_ms.abs() >= WALL_CLOCK_SLACK_MS {
            lost.push(format!(
                "clock: the guest's wall clock is {:.0} ms off the host's",
                self.clock.realtime_offset_ms
            ));
        }
        if !resets_allowed && self.controller_resets > 0 {
            lost.push(format!(
                "nvme: the guest's driver logged {} timeout(s) or reset(s) of a device kept as \
                 it ran",
                self.controller_resets
            ));
        }
        lost
    }
}

/// How far a guest's wall clock may be from the host's after a round: the judge reads the
/// host's through an I/O port, so the reading itself costs well under a millisecond, and a
/// clock that stood still over a blackout is seconds off.
pub const WALL_CLOCK_SLACK_MS: f64 = 1000.0;
