//! After the kexec, across restores of one session: what a restore leaves with the agent so
//! that the next one can carry on where it failed. LUO gives the same file to every retrieve
//! of a token, so the state and RAM memfds come back as they were; a preserved device does
//! too, but bound to the iommufd of the restore that bound it first (VFIO unbinds a device
//! only at its file's last close, and the session holds the file). That iommufd would die
//! with its process and strand the device, so each restore hands it to the agent, with a
//! record of what it bound there, before it binds anything; a retry takes both back and
//! goes on in that context (`Passthrough::reopen`).

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};

use luvmm_devices::vfio::BoundRecord;
use luvmm_liveupdate::agent::AgentClientError;
use luvmm_liveupdate::seams::UpdateAgent;

use crate::passthrough::{IommuKeeper, KeepError};

/// What a failed restore left with the agent cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeptError {
    #[error("cannot ask the agent what a failed restore left")]
    Agent(#[source] AgentClientError),
    #[error("the failed restore's note does not parse")]
    Note(#[source] serde_json::Error),
    #[error("the failed restore left {0} fds with the agent, not its one iommufd")]
    FdCount(usize),
}

/// The iommufd a failed restore of VM `vm_id` left with the agent, and its record of what is
/// bound there; `None` after no such restore (or one that failed before it made one).
pub fn earlier_iommu(
    agent: &dyn UpdateAgent,
    vm_id: &str,
) -> Result<Option<(File, BoundRecord)>, KeptError> {
    let Some(kept) = agent.kept(vm_id).map_err(KeptError::Agent)? else {
        return Ok(None);
    };
    let record = serde_json::from_str(&kept.note).map_err(KeptError::Note)?;
    let count = kept.fds.len();
    let mut fds = kept.fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(iommufd), None) => Ok(Some((File::from(iommufd), record))),
        _ => Err(KeptError::FdCount(count)),
    }
}

/// Leaves a restore's iommufd and record with the agent, for VM `vm_id`.
pub struct AgentKeeper {
    agent: Box<dyn UpdateAgent>,
    vm_id: String,
}

impl AgentKeeper {
    pub fn new(agent: Box<dyn UpdateAgent>, vm_id: &str) -> AgentKeeper {
        AgentKeeper {
            agent,
            vm_id: vm_id.to_string(),
        }
    }
}

impl IommuKeeper for AgentKeeper {
    fn keep(&self, iommufd: BorrowedFd<'_>, record: &BoundRecord) -> Result<(), KeepError> {
        let note = serde_json::to_string(record).map_err(|e| KeepError(Box::new(e)))?;
        let fd: OwnedFd = iommufd
            .try_clone_to_owned()
            .map_err(|e| KeepError(Box::new(e)))?;
        self.agent
            .keep(&self.vm_id, &note, &[&fd])
            .map_err(|e| KeepError(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    use luvmm_devices::vfio::BoundDevice;
    use luvmm_liveupdate::fake::FakeHost;
    use nix::sys::memfd::{memfd_create, MFdFlags};

    use super::*;

    /// A host past its kexec with VM vm1's session claimed.
    fn claimed() -> FakeHost {
        let host = FakeHost::new();
        let agent = host.agent();
        let _outgoing = agent.subscribe("vm1", None).unwrap();
        agent.ready("vm1", &[]).unwrap();
        host.kexec();
        // The claimant's session copy stays open for the test: it is alive.
        std::mem::forget(agent.claim("vm1").unwrap());
        host
    }

    fn record() -> BoundRecord {
        BoundRecord {
            ioas_id: 1,
            hwpts: vec![3],
            devices: vec![BoundDevice {
                bdf: "0000:00:03.0".into(),
                dev_id: 2,
                hwpt_id: 3,
            }],
        }
    }

    #[test]
    fn nothing_lost_a_retry_gets_back_the_iommufd_and_record_a_failed_restore_left() {
        let host = claimed();
        let agent = host.agent();
        assert!(earlier_iommu(&agent, "vm1").unwrap().is_none());
        // A memfd stands in for the iommufd: what comes back must be the same file.
        let iommufd = File::from(memfd_create("iommufd", MFdFlags::MFD_CLOEXEC).unwrap());
        let keeper = AgentKeeper::new(Box::new(host.agent()), "vm1");
        keeper
            .keep(iommufd.as_fd(), &BoundRecord::default())
            .unwrap();
        // A later keep, after a device is bound, replaces the first.
        keeper.keep(iommufd.as_fd(), &record()).unwrap();
        let (file, kept) = earlier_iommu(&agent, "vm1").unwrap().unwrap();
        assert_eq!(kept, record());
        let inode = |f: &File| f.metadata().unwrap().ino();
        assert_eq!(inode(&file), inode(&iommufd));
        // Once the VM is finished nobody holds a claim to ask with.
        agent.finished("vm1").unwrap();
        assert!(matches!(
            earlier_iommu(&agent, "vm1"),
            Err(KeptError::Agent(_))
        ));
    }

    #[test]
    fn a_note_that_does_not_parse_or_the_wrong_fds_are_refused() {
        let host = claimed();
        let agent = host.agent();
        let fd = memfd_create("iommufd", MFdFlags::MFD_CLOEXEC).unwrap();
        agent.keep("vm1", "not json", &[&fd]).unwrap();
        assert!(matches!(
            earlier_iommu(&agent, "vm1"),
            Err(KeptError::Note(_))
        ));
        let note = serde_json::to_string(&record()).unwrap();
        agent.keep("vm1", &note, &[&fd, &fd]).unwrap();
        assert!(matches!(
            earlier_iommu(&agent, "vm1"),
            Err(KeptError::FdCount(2))
        ));
        agent.keep("vm1", &note, &[]).unwrap();
        assert!(matches!(
            earlier_iommu(&agent, "vm1"),
            Err(KeptError::FdCount(0))
        ));
    }
}
