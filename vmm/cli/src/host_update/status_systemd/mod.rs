//! `luvmm update status` where systemd held the sessions: no agent's ledger crossed the kexec,
//! so each VM's outcome is read from what is left of it after the kexec: its VMM (restored
//! from its session in this boot, and when its guest ran again) and its unit,
//! `luvmm@ID.service` (running, failed, or its session still waiting in its fd store).

use std::path::{Path, PathBuf};
use std::time::Duration;

use luvmm_liveupdate::agent::VmPhase;
use luvmm_resources::config::VmConfig;
use luvmm_resources::errors::error_chain;
use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::vmm::VmStatus;

use super::status::{StatusReport, Verdict, VmOutcome};

/// How long `update status` waits for a VMM's answer.
const VMM_WAIT: Duration = Duration::from_secs(2);

/// A VM's unit, as `systemctl show` tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitState {
    /// `ActiveState`: active, activating, failed, inactive...
    pub active: String,
    /// `NFileDescriptorStore`: fds in its store (its session until a restore finished it).
    pub stored: u32,
    /// `NRestarts`: restarts since it was started in this boot.
    pub restarts: u32,
}

/// What the status reads off the host, behind a trait so that its rules are tested alone.
pub trait SystemdHost {
    /// Kexecs with LUO that systemd has seen (its manager's `KExecCount`).
    fn kexecs(&self) -> u32;
    /// When this kernel started, in ms since the Unix epoch.
    fn booted_at_ms(&self) -> u64;
    /// VM `vm`'s unit, if systemd knows it.
    fn unit(&self, vm: &str) -> Option<UnitState>;
    /// The status of the VMM on `socket`, if it answers.
    fn vmm(&self, socket: &Path) -> Option<VmStatus>;
}

/// The VMs configured in `dir` (`ID.json`, as `luvmm start --vm ID` boots them), each with its
/// API socket.
pub fn configured_vms(dir: &Path) -> Result<Vec<(String, Option<PathBuf>)>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut configs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    configs.sort();
    configs
        .iter()
        .filter_map(|path| Some((path, path.file_stem()?.to_str()?.to_string())))
        .map(|(path, vm)| {
            let config = VmConfig::from_json_file(path)
                .map_err(|e| format!("{}: {}", path.display(), error_chain(&e)))?;
            Ok((vm, config.api_socket))
        })
        .collect()
}

/// The report for `vms` on `host`. Without a kexec there is no update to tell of, and no VM
/// is listed (each one booted from its config, as it should).
pub fn gather(vms: &[(String, Option<PathBuf>)], host: &impl SystemdHost) -> StatusReport {
    let kexecs = host.kexecs();
    let kexec_at_ms = (kexecs > 0).then(|| host.booted_at_ms());
    let outcomes: Vec<VmOutcome> = vms
        .iter()
        .filter(|_| kexecs > 0)
        .map(|(vm, socket)| outcome(vm, socket.as_deref(), host, kexec_at_ms))
        .collect();
    let verdict = if kexecs == 0 {
        Verdict::NoUpdate
    } else if outcomes.iter().all(|v| v.why_not.is_none()) {
        Verdict::AllBack
    } else {
        Verdict::NotAllBack
    };
    StatusReport {
        verdict,
        updates: kexecs,
        kexec_at_ms,
        agent_started_at_ms: None,
        vms: outcomes,
    }
}

fn outcome(
    vm: &str,
    socket: Option<&Path>,
    host: &impl SystemdHost,
    kexec_at_ms: Option<u64>,
) -> VmOutcome {
    let unit = host.unit(vm);
    let status = socket.and_then(|s| host.vmm(s));
    let restore = status.as_ref().and_then(|s| s.restore_timings.clone());
    // Restored from its session in this boot: only a live update's restore finishes one.
    let updated = restore.as_ref().filter(|t| t.finish_ms.is_some());
    let back_at_ms = updated.and_then(|t| t.resumed_at_ms);
    let unit_name = format!("luvmm@{vm}.service");
    let (phase, why_not) = match (&status, updated, &unit) {
        (Some(_), Some(_), _) if back_at_ms.is_some() => (VmPhase::Finished, None),
        (Some(_), Some(_), _) => (
            VmPhase::Claimed,
            Some("restored, its guest not yet resumed".into()),
        ),
        (Some(_), None, _) => (
            VmPhase::Failed,
            Some(
                "booted afresh from its config: no session came back for it (its guest \
                 restarted)"
                    .into(),
            ),
        ),
        (None, _, Some(u)) if u.stored > 0 && u.active == "failed" => (
            VmPhase::Failed,
            Some(format!(
                "{unit_name} failed after {} restart(s); its session waits in the unit's fd \
                 store (systemctl restart {unit_name} tries again)",
                u.restarts
            )),
        ),
        (None, _, Some(u))
            if u.stored > 0 && (u.active == "activating" || u.active == "active") =>
        {
            (
                VmPhase::Claimed,
                Some(format!("{unit_name} is restoring it")),
            )
        }
        (None, _, Some(u)) if u.stored > 0 => (
            VmPhase::Incoming,
            Some(format!(
                "{unit_name} is {}; its session waits in the unit's fd store",
                u.active
            )),
        ),
        (None, _, Some(u)) => (
            VmPhase::Failed,
            Some(format!(
                "{unit_name} is {} and its fd store is empty: nothing of it came back",
                u.active
            )),
        ),
        (None, _, None) => (
            VmPhase::Failed,
            Some(format!("systemd does not know {unit_name}")),
        ),
    };
    let since = |from: Option<u64>| Some(back_at_ms?.saturating_sub(from?));
    VmOutcome {
        vm: vm.to_string(),
        phase,
        back_at_ms,
        back_after_kexec_ms: since(kexec_at_ms),
        ready_to_back_ms: updated
            .and_then(|t| Duration::try_from_secs_f64(t.blackout_ms? / 1e3).ok())
            .and_then(|blackout| u64::try_from(blackout.as_millis()).ok()),
        why_not,
        claims: u32::from(updated.is_some()),
        restore: updated.cloned(),
    }
}

/// This host, asked through `systemctl` and each VMM's API.
pub struct Host;

impl Host {
    fn show(unit: Option<&str>, properties: &str) -> Vec<String> {
        let mut command = std::process::Command::new("systemctl");
        command.args(["show", "-p", properties, "--value"]);
        if let Some(unit) = unit {
            command.arg(unit);
        }
        command
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl SystemdHost for Host {
    fn kexecs(&self) -> u32 {
        Host::show(None, "KExecCount")
            .first()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    fn booted_at_ms(&self) -> u64 {
        let now = |clock| {
            nix::time::clock_gettime(clock)
                .map(|t| i128::from(t.tv_sec()) * 1000 + i128::from(t.tv_nsec()) / 1_000_000)
                .unwrap_or(0)
        };
        let real = now(nix::time::ClockId::CLOCK_REALTIME);
        let boot = now(nix::time::ClockId::CLOCK_BOOTTIME);
        u64::try_from(real - boot).unwrap_or(0)
    }

    fn unit(&self, vm: &str) -> Option<UnitState> {
        let unit = format!("luvmm@{vm}.service");
        let property = |name| {
            Host::show(Some(&unit), name)
                .into_iter()
                .next()
                .unwrap_or_default()
        };
        if property("LoadState") != "loaded" {
            return None;
        }
        Some(UnitState {
            active: property("ActiveState"),
            stored: property("NFileDescriptorStore").parse().unwrap_or(0),
            restarts: property("NRestarts").parse().unwrap_or(0),
        })
    }

    fn vmm(&self, socket: &Path) -> Option<VmStatus> {
        VmmClient::new(socket).with_timeout(VMM_WAIT).status().ok()
    }
}

#[cfg(test)]
mod tests;
