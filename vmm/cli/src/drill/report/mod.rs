//! The drill's verdict: L1's events, stamped with the host's clock, judged by the guests' own
//! evidence and the open watcher, as a table, one JSON object and an SVG timeline.
//!
//! - [`collect`]: L1's console lines into rounds, VMs, devices and timeline spans.
//! - [`verdict`]: the guests' checks and every round against the plan and the rules.
//! - [`table`]: the console table.
//! - [`svg`]: the timeline.

mod collect;
#[cfg(test)]
mod fixtures;
mod svg;
mod table;
mod verdict;

use std::collections::BTreeMap;

use crate::preflight::CheckReport;
use serde::{Deserialize, Serialize};

use super::judge::LinuxVerdict;
use super::watch::Opens;
use super::Plan;

pub use collect::Collector;

/// The whole drill. `ok` is true only when every guest check passed, every device worked
/// after every update, and no preserved device was opened the normal way.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillReport {
    pub ok: bool,
    pub plan: Plan,
    /// `uname -r` of the first L1 kernel and of the one each round kexecs into.
    pub kernel: String,
    pub next_kernel: String,
    pub rounds: Vec<RoundReport>,
    /// Why `ok` is false, when it is.
    pub failures: Vec<String>,
    /// Every phase of every row (the L1 host, each VM), in host seconds since QEMU started.
    pub timeline: Vec<Span>,
    pub total_s: f64,
}

/// One round: an update (prepare, kexec, restore), or the cancelled prepare of
/// `--cancel-first`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    /// `update` or `cancel`.
    pub kind: String,
    /// From the agent's kexec request to the next kernel's drill start, by the host's clock.
    pub kexec_boot_ms: Option<f64>,
    pub preflight: Option<CheckReport>,
    pub vms: Vec<VmResult>,
    /// Every device the round's prepares preserved, whether its VM came back or not.
    pub preserved_devices: Vec<String>,
    /// What the open watcher saw from the first prepare to the kexec, in the outgoing kernel.
    pub opens_prepare_to_kexec: Option<Opens>,
    /// What it saw from the agent's start to the last resume, in the incoming kernel (kept
    /// when a restore failed).
    pub opens_agent_to_resume: Option<Opens>,
}

impl RoundReport {
    /// The watcher's spans that reported, each with its name.
    pub fn watched(&self) -> impl Iterator<Item = (&'static str, &Opens)> {
        [
            (
                "between the prepare and the kexec",
                &self.opens_prepare_to_kexec,
            ),
            (
                "between the agent's start and the last resume",
                &self.opens_agent_to_resume,
            ),
        ]
        .into_iter()
        .filter_map(|(name, opens)| opens.as_ref().map(|o| (name, o)))
    }

    /// Opens of `bdf`'s cdev or group node over the whole update, both kernels.
    pub fn normal_opens(&self, bdf: &str) -> u32 {
        self.watched()
            .map(|(_, o)| o.per_device.get(bdf).copied().unwrap_or(0))
            .sum()
    }
}

/// One VM in one round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmResult {
    pub vm: String,
    /// `ok`, or why the guest's own evidence says something was lost: its `LOST` line, or a
    /// check that did not go on (seed, check counter, heartbeats).
    pub guest_check: String,
    pub check_before: String,
    /// A Linux guest's checks while its driver recovered a device that came back reset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovery_checks: Vec<String>,
    pub check_after: String,
    /// The Linux judge's verdict (`memory`, `io`, `clock`, `kernel_warnings`,
    /// `controller_resets`), for a Linux guest.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub linux: Option<LinuxVerdict>,
    pub devices: Vec<DeviceResult>,
    /// Milliseconds per phase as luvmm measured them: the prepare's (`preserve_ram`, `pause`,
    /// `quiesce_devices`, `preserve_devices`, `save_state`, `preserve_state`, `ready`) and the
    /// restore's (`restore_gather`, `restore_check`, `restore_vm`, `restore_memory`, `restore_devices`,
    /// `restore_vcpus`, `finish`; `ioas_map` is the part of `restore_devices` that maps guest
    /// RAM into the new IOAS, `retrieve_ram` the part of `restore_gather` that retrieves the
    /// RAM memfds), and `blackout`: the guest's, from its pause before the
    /// kexec to its resume after it, by L1's wall clock.
    pub phases_ms: BTreeMap<String, f64>,
    /// The same blackout by the guest's own clocks: the longest its TSC ran between two of its
    /// 100 ms timer ticks, between its checks before and after (its TSC rate calibrated against
    /// its timer): how much of the blackout the guest itself can tell.
    pub guest_clock_gap_ms: Option<f64>,
    /// The most the guest's TSC went back from one of its ticks to the next between those
    /// checks (0: never): a restore that set its clock back.
    pub guest_clock_back_ms: Option<f64>,
    /// L1's `ShmemHugePages` in KiB (all VMs) before the prepare and after the restore: how
    /// much guest RAM was in huge folios, and how much of it LUO brought back huge.
    pub shmem_huge_kib_before: Option<u64>,
    pub shmem_huge_kib_after: Option<u64>,
}

/// One passthrough device of a VM in one round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceResult {
    pub bdf: String,
    /// The kernel preserved it: after the kexec it could come only from the session.
    pub preserved: bool,
    /// Opens of its cdev or group node the watcher saw over the whole update, both kernels.
    pub normal_opens: u32,
    /// The guest's DMA round trip with its interrupt through it worked afterwards.
    pub works: bool,
    /// The device in its slot still held the identity the guest wrote to it at boot (an edu's
    /// liveness register, which no reset clears: edu has none, and Linux finds no reset
    /// method for it, so it holds in every VFIO handler mode and when opened again): it is
    /// the same device, not another one put in its place. `None`: the guest did not say.
    pub same_device: Option<bool>,
    /// The guest's round line for it.
    pub round_line: String,
}

/// The prepare's phases while the guest is paused: the VMM's part of the blackout before the
/// kexec.
pub const PAUSED_PHASES: [&str; 6] = [
    "pause",
    "quiesce_devices",
    "preserve_devices",
    "save_state",
    "preserve_state",
    "ready",
];

/// The restore's phases: the VMM's part of the blackout after the kexec.
const RESTORE_PHASES: [&str; 7] = [
    "restore_gather",
    "restore_check",
    "restore_vm",
    "restore_memory",
    "restore_devices",
    "restore_vcpus",
    "finish",
];

pub use crate::timeline::Span;
