//! The pre-flight's blockers, and a VM's part of it: its devices against what the agent's
//! kernel can preserve (on iommufd, in D0, and whether each has a handler, probed through the
//! agent with the VM's own fds; one without is opened again after the kexec, and its own state
//! is lost). The host's part (LUO held by the agent, the memfd handler, the next kernel and its
//! command line, its handlers vouched for) is the `luvmm` binary's `preflight`, which asks each
//! VMM for this one. A blocker means the update would lose something: the prepare is refused
//! before anything is touched.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use luvmm_liveupdate::luo::probe::HandlerStatus;
use luvmm_liveupdate::seams::UpdateAgent;
use serde::{Deserialize, Serialize};

use crate::update::vm::UpdateVm;
use crate::update::UpdateError;

/// What stops an update: it would lose something. Matched by variant in code; in JSON each
/// has a stable `kind`; for an operator, its message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Blocker {
    #[error("{bdf}: not in D0; a device is preserved only at full power")]
    NotInD0 { bdf: String },
    #[error(
        "{bdf}: on the legacy VFIO container, which cannot be preserved (use iommufd and the \
         VFIO cdev)"
    )]
    LegacyContainer { bdf: String },
    #[error(
        "this kernel has no LUO handler for memfds (its probe: {}): guest RAM cannot be \
         preserved",
        found.as_ref().map_or("no answer".to_string(), HandlerStatus::to_string)
    )]
    NoMemfdHandler { found: Option<HandlerStatus> },
    #[error("{reason}; {luo}")]
    NoAgent { reason: String, luo: String },
    #[error("the agent's probe failed: {reason}")]
    AgentProbe { reason: String },
    #[error("systemd holds the sessions on this host, but /dev/liveupdate could not be probed: {reason}")]
    LuoProbe { reason: String },
    #[error("the next kernel's command line lacks liveupdate=on: {cmdline}")]
    NoLiveUpdateOn { cmdline: String },
    #[error("the next kernel does not load: {reason}")]
    KernelLoad { reason: String },
    #[error("cannot read this kernel's command line: {reason}")]
    Cmdline { reason: String },
    #[error(
        "{kernel} may not have the LUO file handlers this kernel has; a next kernel without one \
         makes /dev/liveupdate fail with EIO and loses every session: pass \
         --known-good-kernel once it is known to carry them"
    )]
    UnknownHandlers { kernel: PathBuf },
    #[error("VM {vm}: {blocker}")]
    Vm { vm: PathBuf, blocker: Box<Blocker> },
    #[error("VM {vm}: {reason}")]
    VmUnreachable { vm: PathBuf, reason: String },
}

impl Blocker {
    /// The blockers' messages, `; `-separated.
    pub fn join(blockers: &[Blocker]) -> String {
        blockers
            .iter()
            .map(Blocker::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One VM's part of the pre-flight, as its VMM reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmCheck {
    /// The agent's kernel's LUO handler for memfds (guest RAM and the state), once probed.
    #[serde(default)]
    pub memfd_handler: Option<HandlerStatus>,
    pub devices: Vec<DeviceCheck>,
    pub blockers: Vec<Blocker>,
    pub warnings: Vec<String>,
}

/// One passthrough device in the pre-flight.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceCheck {
    pub bdf: String,
    /// On VFIO cdev + iommufd (what can be preserved).
    pub iommufd: bool,
    pub in_d0: bool,
    /// This kernel's LUO handler for it.
    pub handler: HandlerStatus,
}

/// This VM's devices against what the agent's kernel can preserve.
pub fn check_vm(vm: &impl UpdateVm, agent: &dyn UpdateAgent) -> Result<VmCheck, UpdateError> {
    let mut check = VmCheck::default();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut probed = Vec::new();
    for device in vm.device_files().map_err(UpdateError::DeviceFds)? {
        let bdf = device.bdf;
        if !device.in_d0 {
            check.blockers.push(Blocker::NotInD0 { bdf: bdf.clone() });
        }
        match device.fd {
            Some(fd) => {
                fds.push(fd);
                probed.push((bdf, device.in_d0));
            }
            None => {
                check
                    .blockers
                    .push(Blocker::LegacyContainer { bdf: bdf.clone() });
                check.devices.push(DeviceCheck {
                    bdf,
                    iommufd: false,
                    in_d0: device.in_d0,
                    handler: HandlerStatus::Absent,
                });
            }
        }
    }
    let borrowed: Vec<&OwnedFd> = fds.iter().collect();
    let handlers = agent.probe(&borrowed)?;
    check.memfd_handler = handlers.first().cloned();
    for ((bdf, in_d0), handler) in probed.into_iter().zip(handlers.into_iter().skip(1)) {
        if handler != HandlerStatus::Present {
            check.warnings.push(format!(
                "{bdf}: this kernel cannot preserve it (its LUO handler: {handler}): it will be opened \
                 again after the kexec, and its own state (queues, registers) is lost"
            ));
        }
        check.devices.push(DeviceCheck {
            bdf,
            iommufd: true,
            in_d0,
            handler,
        });
    }
    Ok(check)
}

impl VmCheck {
    /// What refuses a prepare before anything is touched: the blockers, a kernel that cannot
    /// preserve memfds, and with `require_preserved_devices` a device it cannot preserve.
    pub fn refuse_prepare(&self, require_preserved_devices: bool) -> Result<(), UpdateError> {
        if self.memfd_handler != Some(HandlerStatus::Present) {
            return Err(UpdateError::Blocked {
                blockers: vec![Blocker::NoMemfdHandler {
                    found: self.memfd_handler.clone(),
                }],
            });
        }
        if !self.blockers.is_empty() {
            return Err(UpdateError::Blocked {
                blockers: self.blockers.clone(),
            });
        }
        match self
            .devices
            .iter()
            .find(|d| d.handler != HandlerStatus::Present)
        {
            Some(device) if require_preserved_devices => Err(UpdateError::DeviceNotPreserved {
                bdf: device.bdf.clone(),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(memfd: Option<HandlerStatus>, device: HandlerStatus) -> VmCheck {
        VmCheck {
            memfd_handler: memfd,
            devices: vec![DeviceCheck {
                bdf: "0000:00:03.0".into(),
                iommufd: true,
                in_d0: true,
                handler: device,
            }],
            blockers: Vec::new(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn a_prepare_is_refused_before_anything_is_touched() {
        let present = Some(HandlerStatus::Present);
        assert!(check(present.clone(), HandlerStatus::Absent)
            .refuse_prepare(false)
            .is_ok());
        assert!(check(present.clone(), HandlerStatus::Present)
            .refuse_prepare(true)
            .is_ok());
        assert!(matches!(
            check(present.clone(), HandlerStatus::Absent).refuse_prepare(true),
            Err(UpdateError::DeviceNotPreserved { bdf }) if bdf == "0000:00:03.0"
        ));
        let no_memfd = check(Some(HandlerStatus::Absent), HandlerStatus::Present);
        assert!(no_memfd
            .refuse_prepare(false)
            .unwrap_err()
            .to_string()
            .contains("no LUO handler for memfds"));
        let mut legacy = check(present, HandlerStatus::Present);
        let blocker = Blocker::LegacyContainer {
            bdf: "0000:00:03.0".into(),
        };
        legacy.blockers.push(blocker.clone());
        assert!(matches!(
            legacy.refuse_prepare(false),
            Err(UpdateError::Blocked { blockers }) if blockers == [blocker]
        ));
    }
}
