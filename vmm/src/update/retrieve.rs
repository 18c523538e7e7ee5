//! After the kexec: take the VM's session back from the agent and retrieve its files, the
//! **state memfd first**. A retrieve is one-shot and a failed one is permanent, so everything
//! the state says is checked (format, checksum, layout, this VM's id, this host's KVM: vCPU
//! count and TSC rate, every passthrough device present and bound to vfio-pci) before any RAM
//! memfd or device is retrieved. Devices are
//! retrieved later, by the builder (`Passthrough::reopen`), and those the old kernel could
//! not preserve are opened again the normal way.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use luvmm_devices::vfio::host::{bound_driver, sysfs_dir};
use luvmm_liveupdate::agent::AgentClient;
use luvmm_resources::config::SerialOutput;
use luvmm_resources::state::{self, UpdateRecord, VmState, RAM_TOKEN_BASE, STATE_TOKEN};

use crate::builder::RestoreArgs;
use crate::restore::{read_state, RestoreError};
use crate::vstate::vm::{host_limits, open_kvm};
use crate::vstate::x86_64::tsc::check_tsc_rate;

/// Claims `vm_id`'s session from the agent behind `agent_socket` and gathers the restore's
/// inputs from it.
pub fn from_session(
    vm_id: &str,
    agent_socket: &Path,
    serial: SerialOutput,
) -> Result<RestoreArgs, RestoreError> {
    let agent = AgentClient::new(agent_socket);
    let claim_failed = |what: &'static str| {
        move |e| RestoreError::Session {
            session: format!("luvmm-{vm_id}"),
            what,
            source: Box::new(e),
        }
    };
    // Nothing is taken from the session yet: what the agent knows of the VM's devices is
    // checked first, so a missing device refuses the restore while it can still be retried.
    let ledger = agent
        .status()
        .map_err(claim_failed("cannot ask the agent about it"))?;
    if let Some(record) = ledger.vms.iter().find(|r| r.vm == vm_id) {
        check_devices(&record.devices).map_err(|why| RestoreError::SessionState {
            session: record.session.clone(),
            why: format!("{why} (nothing was taken from the session: fix it and retry)"),
        })?;
    }
    let session = agent
        .claim(vm_id)
        .map_err(claim_failed("cannot claim it from the agent"))?;
    let name = session.name().to_string();
    let failed = |what: &'static str| {
        let name = name.clone();
        move |e: luvmm_liveupdate::LuoError| RestoreError::Session {
            session: name,
            what,
            source: Box::new(e),
        }
    };
    let state_memfd = File::from(
        session
            .retrieve(STATE_TOKEN)
            .map_err(failed("cannot retrieve the state memfd"))?,
    );
    let blob = read_state(&state_memfd, None, &format!("session {name}"))?;
    let saved = check_state(&name, vm_id, &blob)?;
    let source_paused_at = saved
        .update
        .as_ref()
        .and_then(|u| u.times_ms.get("pause"))
        .map(|&ms| UNIX_EPOCH + Duration::from_millis(ms));
    let retrieving = std::time::Instant::now();
    let memfds = (0..saved.memory.regions.len())
        .map(|index| {
            session
                .retrieve(RAM_TOKEN_BASE + index as u64)
                .map(File::from)
                .map_err(failed("cannot retrieve a RAM memfd"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The kernel rebuilds each memfd folio by folio here: this grows with the guest.
    let retrieve_ram_ms = retrieving.elapsed().as_secs_f64() * 1e3;
    Ok(RestoreArgs {
        state_bytes: blob.len() as u64,
        state: saved,
        state_memfd: Some(state_memfd),
        memfds,
        devices: None,
        device_manifest: Vec::new(),
        source_paused_at,
        session: Some(session),
        serial,
        gather_ms: 0.0,
        retrieve_ram_ms: Some(retrieve_ram_ms),
    })
}

/// Tells the agent the VM is restored and its session finished. The guest runs whatever the
/// agent says: a failure here only keeps the VM out of the next update until it is mended.
pub fn report_finished(agent_socket: &Path, vm_id: &str) {
    if let Err(e) = AgentClient::new(agent_socket).finished(vm_id) {
        log::warn!("the agent did not take VM {vm_id}'s finish: {e}; it cannot prepare again");
    }
}

/// The live-update record of a state saved by a prepare, with one device token (or `None`,
/// not preserved) per passthrough device.
pub(crate) fn update_record(saved: &VmState) -> Result<&UpdateRecord, String> {
    let Some(update) = &saved.update else {
        return Err("it was not saved for a live update".into());
    };
    if update.device_tokens.len() != saved.devices.passthrough.len() {
        return Err(format!(
            "{} device tokens for {} devices",
            update.device_tokens.len(),
            saved.devices.passthrough.len()
        ));
    }
    Ok(update)
}

/// Everything that can be known from the state alone, before anything else is retrieved.
fn check_state(session: &str, vm_id: &str, blob: &[u8]) -> Result<VmState, RestoreError> {
    let refuse = |why: String| RestoreError::SessionState {
        session: session.to_string(),
        why,
    };
    let saved: VmState = state::decode(blob).map_err(|e| refuse(e.to_string()))?;
    let update = update_record(&saved).map_err(refuse)?;
    if update.vm_id != vm_id {
        return Err(refuse(format!(
            "it is VM {:?}'s, not {vm_id:?}'s",
            update.vm_id
        )));
    }
    // The layout against itself: the memfds' real sizes are checked once retrieved.
    let sizes: Vec<u64> = saved.memory.regions.iter().map(|r| r.size).collect();
    saved
        .check_against(&sizes)
        .map_err(|e| refuse(e.to_string()))?;
    // This host's KVM: enough vCPUs, and a TSC the vCPUs can run at.
    let kvm = open_kvm().map_err(|e| refuse(e.to_string()))?;
    let max_vcpus = host_limits(&kvm).max_vcpus as usize;
    if saved.vcpus.len() > max_vcpus {
        return Err(refuse(format!(
            "{} vCPUs, and this host's KVM allows {max_vcpus}",
            saved.vcpus.len()
        )));
    }
    if let Some(saved_khz) = saved.vcpus.first().and_then(|v| v.tsc_khz) {
        check_tsc_rate(&kvm, saved_khz).map_err(|e| refuse(e.to_string()))?;
    }
    let bdfs: Vec<String> = saved
        .devices
        .passthrough
        .iter()
        .map(|d| d.bdf.clone())
        .collect();
    check_devices(&bdfs).map_err(refuse)?;
    Ok(saved)
}

/// Every device is present and bound to vfio-pci.
fn check_devices(bdfs: &[String]) -> Result<(), String> {
    for bdf in bdfs {
        let sysfs = sysfs_dir(bdf);
        if !sysfs.exists() {
            return Err(format!("{bdf}: no such PCI device here"));
        }
        match bound_driver(&sysfs) {
            Some(driver) if driver == "vfio-pci" => {}
            other => {
                return Err(format!(
                    "{bdf}: bound to {}, not vfio-pci",
                    other.as_deref().unwrap_or("no driver")
                ))
            }
        }
    }
    Ok(())
}
