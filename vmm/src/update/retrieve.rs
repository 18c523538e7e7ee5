//! After the kexec, first phase: take the VM's session back from the agent and retrieve its
//! files, the **state memfd first**. A retrieve is one-shot and a failed one is permanent, so
//! everything the state says is checked (format, checksum, layout, this VM's id, this host's
//! KVM: vCPU count and TSC rate, every passthrough device present and bound to vfio-pci)
//! before any RAM memfd or device is retrieved. Then the RAM memfds, then each device the old
//! kernel preserved (one it could not is opened again the normal way by the rebuild), then the
//! iommufd a failed restore of the session left with the agent ([`crate::update::retry`]).

use std::fs::File;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use luvmm_devices::vfio::host::{bound_driver, sysfs_dir};
use luvmm_devices::vfio::BoundRecord;
use luvmm_liveupdate::agent::AgentClientError;
use luvmm_liveupdate::luo::{LuoError, Token};
use luvmm_liveupdate::seams::{RetrieveSession, UpdateAgent};
use luvmm_resources::state::{
    self, ReadError, StateError, StateMismatch, UpdateRecord, VmState, RAM_TOKEN_BASE, STATE_TOKEN,
};

use crate::faults::{self, Fault};
use crate::update::finish::report_failed;
use crate::update::retry::{earlier_iommu, KeptError};
use crate::vstate::x86_64::compat::CpuMismatch;
use crate::vstate::x86_64::host_kvm::HostKvm;
use crate::vstate::x86_64::tsc::TscError;

/// Everything a session gave back, for the rebuild.
pub struct Retrieved {
    /// The saved state, decoded and checked, and the memfd it came in.
    pub state: VmState,
    pub state_bytes: u64,
    pub state_memfd: File,
    /// The RAM memfds, in layout order.
    pub memfds: Vec<File>,
    /// Per saved device, in state order: its cdev as the old kernel preserved it, or `None`
    /// (not preserved: opened again by BDF).
    pub devices: Vec<Option<File>>,
    /// The iommufd a failed restore of the session left, with its record.
    pub earlier_iommu: Option<(File, BoundRecord)>,
    /// When the old VMM paused the guest, by the wall clock (which survives the kexec).
    pub source_paused_at: Option<SystemTime>,
    /// How long retrieving the RAM memfds took: the kernel rebuilds each folio by folio.
    pub retrieve_ram_ms: f64,
    /// The session, to finish once the VM is rebuilt.
    pub session: Box<dyn RetrieveSession>,
}

/// The session could not be retrieved.
#[derive(Debug, thiserror::Error)]
pub enum RetrieveError {
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("session {session}: {what}")]
    Luo {
        session: String,
        what: &'static str,
        #[source]
        source: LuoError,
    },
    #[error("session {session}: what a failed restore left")]
    Kept {
        session: String,
        #[source]
        source: KeptError,
    },
    #[error("session {session}: the saved state is refused before anything else is retrieved")]
    State {
        session: String,
        #[source]
        source: StateRefused,
    },
}

/// The session could not be claimed; nothing was taken from it.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("session luvmm-{vm_id}: {what}")]
    Agent {
        vm_id: String,
        what: &'static str,
        #[source]
        source: AgentClientError,
    },
    #[error(
        "session luvmm-{vm_id}: a device it needs is not usable here; nothing was taken from \
         the session (fix it and retry)"
    )]
    DevicesBeforeClaim {
        vm_id: String,
        #[source]
        source: HostDeviceError,
    },
}

/// Why a saved state cannot be restored here.
#[derive(Debug, thiserror::Error)]
pub enum StateRefused {
    #[error("cannot read it")]
    Read(#[source] ReadError),
    #[error("it does not decode")]
    Decode(#[source] StateError),
    #[error("it was not saved for a live update")]
    NotForUpdate,
    #[error("{tokens} device tokens for {devices} devices")]
    TokenCount { tokens: usize, devices: usize },
    #[error("it is VM {saved:?}'s, not {wanted:?}'s")]
    OtherVm { saved: String, wanted: String },
    #[error("its memory layout does not hold")]
    Layout(#[source] StateMismatch),
    #[error("{saved} vCPUs, and this host's KVM allows {max}")]
    TooManyVcpus { saved: usize, max: usize },
    #[error("its TSC rate cannot be kept here")]
    Tsc(#[source] TscError),
    #[error("its vCPUs cannot run on this host's KVM")]
    Cpu(#[source] CpuMismatch),
    #[error(transparent)]
    Device(#[from] HostDeviceError),
}

/// A passthrough device is not usable on this host.
#[derive(Debug, thiserror::Error)]
pub enum HostDeviceError {
    #[error("{bdf}: no such PCI device here")]
    Missing { bdf: String },
    #[error("{bdf}: bound to {}, not vfio-pci", driver.as_deref().unwrap_or("no driver"))]
    NotOnVfioPci { bdf: String, driver: Option<String> },
}

/// Claims `vm_id`'s session from `agent` and retrieves everything in it (see the module doc).
/// The state is checked against `host`, the KVM the VM will be rebuilt on, asked beforehand.
/// A failure after the claim is reported to the agent, which keeps the session for the next
/// restore.
pub fn retrieve(
    vm_id: &str,
    agent: &dyn UpdateAgent,
    host: &HostKvm,
) -> Result<Retrieved, RetrieveError> {
    let session = claim(vm_id, agent)?;
    retrieve_claimed(vm_id, session, agent, host).inspect_err(|e| report_failed(agent, vm_id, e))
}

fn retrieve_claimed(
    vm_id: &str,
    session: Box<dyn RetrieveSession>,
    agent: &dyn UpdateAgent,
    host: &HostKvm,
) -> Result<Retrieved, RetrieveError> {
    let name = session.name().to_string();
    let take = |token: Token, what: &'static str| {
        session
            .retrieve(token)
            .map(File::from)
            .map_err(|source| RetrieveError::Luo {
                session: name.clone(),
                what,
                source,
            })
    };
    let state_memfd = take(STATE_TOKEN, "cannot retrieve the state memfd")?;
    let refused = |source| RetrieveError::State {
        session: name.clone(),
        source,
    };
    let blob = state::read_blob(&state_memfd, None).map_err(|e| refused(StateRefused::Read(e)))?;
    let saved = check_state(vm_id, &blob, host).map_err(refused)?;
    let update = update_record(&saved).map_err(refused)?;
    let source_paused_at = update
        .times_ms
        .get("pause")
        .map(|&ms| UNIX_EPOCH + Duration::from_millis(ms));
    let device_tokens = update.device_tokens.clone();
    let retrieving = Instant::now();
    let memfds = (0..saved.memory.regions.len())
        .map(|index| take(RAM_TOKEN_BASE + index as u64, "cannot retrieve a RAM memfd"))
        .collect::<Result<Vec<_>, _>>()?;
    let retrieve_ram_ms = retrieving.elapsed().as_secs_f64() * 1e3;
    let devices = device_tokens
        .iter()
        .map(|token| {
            token
                .map(|token| take(token, "cannot retrieve a passthrough device"))
                .transpose()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let earlier_iommu = earlier_iommu(agent, vm_id).map_err(|source| RetrieveError::Kept {
        session: name.clone(),
        source,
    })?;
    Ok(Retrieved {
        state_bytes: blob.len() as u64,
        state: saved,
        state_memfd,
        memfds,
        devices,
        earlier_iommu,
        source_paused_at,
        retrieve_ram_ms,
        session,
    })
}

/// Claims `vm_id`'s session from `agent` once what the agent knows of the VM's devices is
/// checked: a missing device refuses a restore (or a release) while it can still be retried.
pub(crate) fn claim(
    vm_id: &str,
    agent: &dyn UpdateAgent,
) -> Result<Box<dyn RetrieveSession>, ClaimError> {
    let asking = |what| {
        move |source| ClaimError::Agent {
            vm_id: vm_id.to_string(),
            what,
            source,
        }
    };
    let ledger = agent
        .status()
        .map_err(asking("cannot ask the agent about it"))?;
    if let Some(record) = ledger.vms.iter().find(|r| r.vm == vm_id) {
        check_devices(&record.devices).map_err(|source| ClaimError::DevicesBeforeClaim {
            vm_id: vm_id.to_string(),
            source,
        })?;
    }
    let session = agent
        .claim(vm_id)
        .map_err(asking("cannot claim it from the agent"))?;
    if faults::armed(Fault::StopAfterClaim) {
        faults::stop_here();
    }
    Ok(session)
}

/// The live-update record of a state saved by a prepare, with one device token (or `None`,
/// not preserved) per passthrough device.
pub(crate) fn update_record(saved: &VmState) -> Result<&UpdateRecord, StateRefused> {
    let update = saved.update.as_ref().ok_or(StateRefused::NotForUpdate)?;
    if update.device_tokens.len() != saved.devices.passthrough.len() {
        return Err(StateRefused::TokenCount {
            tokens: update.device_tokens.len(),
            devices: saved.devices.passthrough.len(),
        });
    }
    Ok(update)
}

/// Everything that can be known from the state alone, before anything else is retrieved.
fn check_state(vm_id: &str, blob: &[u8], host: &HostKvm) -> Result<VmState, StateRefused> {
    let saved: VmState = state::decode(blob).map_err(StateRefused::Decode)?;
    let update = update_record(&saved)?;
    if update.vm_id != vm_id {
        return Err(StateRefused::OtherVm {
            saved: update.vm_id.clone(),
            wanted: vm_id.to_string(),
        });
    }
    // The layout against itself: the memfds' real sizes are checked once retrieved.
    let sizes: Vec<u64> = saved.memory.regions.iter().map(|r| r.size).collect();
    saved.check_against(&sizes).map_err(StateRefused::Layout)?;
    // This host's KVM: enough vCPUs, and a TSC the vCPUs can run at.
    let max = host.max_vcpus as usize;
    if saved.vcpus.len() > max {
        return Err(StateRefused::TooManyVcpus {
            saved: saved.vcpus.len(),
            max,
        });
    }
    if let Some(saved_khz) = saved.vcpus.first().and_then(|v| v.tsc_khz) {
        host.check_tsc_rate(saved_khz).map_err(StateRefused::Tsc)?;
    }
    // Every vCPU has the same features and MSRs; the first stands for all.
    if let Some(vcpu) = saved.vcpus.first() {
        host.check_accepts(&vcpu.cpuid, &vcpu.msrs)
            .map_err(StateRefused::Cpu)?;
    }
    let bdfs: Vec<String> = saved
        .devices
        .passthrough
        .iter()
        .map(|d| d.bdf.clone())
        .collect();
    check_devices(&bdfs)?;
    Ok(saved)
}

/// Every device is present and bound to vfio-pci.
fn check_devices(bdfs: &[String]) -> Result<(), HostDeviceError> {
    for bdf in bdfs {
        let sysfs = sysfs_dir(bdf);
        if !sysfs.exists() {
            return Err(HostDeviceError::Missing { bdf: bdf.clone() });
        }
        match bound_driver(&sysfs) {
            Some(driver) if driver == "vfio-pci" => {}
            driver => {
                return Err(HostDeviceError::NotOnVfioPci {
                    bdf: bdf.clone(),
                    driver,
                })
            }
        }
    }
    Ok(())
}
