//! The pre-flight (`luvmm update check`): everything that can be known before the point of no
//! return, as blockers (the update would lose something: refuse) and warnings (it goes on, but
//! the operator should know).
//!
//! - LUO is there and held by the luvmm agent, not by someone else;
//! - the memfd handler exists (probed through the agent, in a scratch session);
//! - every VM's devices: on iommufd (the legacy container cannot be preserved), in D0, and
//!   whether this kernel can preserve each (probed through the agent with the VM's own fds;
//!   one it cannot is opened again after the kexec, and its own state is lost);
//! - the next kernel and initrd load (loaded, then unloaded) and its command line carries
//!   `liveupdate=on`;
//! - whether the next kernel has the same file handlers cannot be known from here: a next
//!   kernel without one makes `/dev/liveupdate` fail with `EIO` and loses every session, so
//!   this is a blocker unless the operator says the kernel is known good.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use luvmm_liveupdate::agent::{AgentClient, DEFAULT_AGENT_SOCKET};
use luvmm_liveupdate::luo::probe::HandlerStatus;
use luvmm_liveupdate::luo::{kexec, LiveUpdate, LuoError};
use luvmm_liveupdate::seams::UpdateAgent;
use luvmm_resources::errors::error_chain;
use serde::{Deserialize, Serialize};

use crate::api::client::VmmClient;
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
        "this kernel has no LUO handler for memfds ({found:?}): guest RAM cannot be preserved"
    )]
    NoMemfdHandler { found: Option<HandlerStatus> },
    #[error("{reason}; {luo}")]
    NoAgent { reason: String, luo: String },
    #[error("the agent's probe failed: {reason}")]
    AgentProbe { reason: String },
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
                "{bdf}: this kernel cannot preserve it ({handler:?}): it will be opened \
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

/// What the operator asks to check (`luvmm update check` flags).
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The next kernel's image.
    #[arg(long)]
    pub kernel: PathBuf,
    /// The next kernel's initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The next kernel's whole command line (default: this kernel's).
    #[arg(long, conflicts_with = "append")]
    pub cmdline: Option<String>,
    /// Words appended to this kernel's command line for the next one.
    #[arg(long)]
    pub append: Option<String>,
    /// The agent's socket.
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// A VMM's API socket whose VM goes through the update; repeatable.
    #[arg(long = "vm")]
    pub vms: Vec<PathBuf>,
    /// The next kernel is known to carry the LUO file handlers this one has.
    #[arg(long)]
    pub known_good_kernel: bool,
}

/// The pre-flight's verdict.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckReport {
    /// Empty when the update may go.
    pub blockers: Vec<Blocker>,
    pub warnings: Vec<String>,
    /// The next kernel's command line as it would be used.
    pub next_cmdline: String,
    /// Each VM, by API socket.
    pub vms: Vec<(PathBuf, VmCheck)>,
}

impl CheckReport {
    /// Exit status: 0 the update may go, 3 it would lose something.
    pub fn exit_code(&self) -> u8 {
        if self.blockers.is_empty() {
            0
        } else {
            3
        }
    }

    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for b in &self.blockers {
            text.push_str(&format!("blocker: {b}\n"));
        }
        for w in &self.warnings {
            text.push_str(&format!("warning: {w}\n"));
        }
        text.push_str(if self.blockers.is_empty() {
            "verdict: the update may go\n"
        } else {
            "verdict: blocked\n"
        });
        text
    }
}

/// Runs the pre-flight.
pub fn run(args: &CheckArgs) -> CheckReport {
    let mut report = CheckReport::default();
    let agent = AgentClient::new(&args.agent_socket);
    match agent.status() {
        Ok(_) => match agent.probe(&[]) {
            Ok(handlers) if handlers.first() == Some(&HandlerStatus::Present) => {}
            Ok(handlers) => report.blockers.push(Blocker::NoMemfdHandler {
                found: handlers.first().cloned(),
            }),
            Err(e) => report.blockers.push(Blocker::AgentProbe {
                reason: e.to_string(),
            }),
        },
        Err(e) => {
            let luo = match LiveUpdate::open() {
                Ok(_) => "LUO is free".to_string(),
                Err(LuoError::Busy) => "and /dev/liveupdate is held by another process".into(),
                Err(other) => other.to_string(),
            };
            report.blockers.push(Blocker::NoAgent {
                reason: e.to_string(),
                luo,
            });
        }
    }
    let cmdline = match (&args.cmdline, &args.append) {
        (Some(line), _) => Ok(line.clone()),
        (None, Some(words)) => kexec::current_cmdline_with(words),
        (None, None) => kexec::current_cmdline(),
    };
    match cmdline {
        Ok(line) => {
            if !line.split_whitespace().any(|w| w == "liveupdate=on") {
                report.blockers.push(Blocker::NoLiveUpdateOn {
                    cmdline: line.clone(),
                });
            }
            match kexec::load(&args.kernel, args.initrd.as_deref(), Some(&line)) {
                Ok(()) => {
                    if let Err(e) = kexec::unload() {
                        report
                            .warnings
                            .push(format!("the next kernel loaded but did not unload: {e}"));
                    }
                }
                Err(e) => report.blockers.push(Blocker::KernelLoad {
                    reason: error_chain(&e),
                }),
            }
            report.next_cmdline = line;
        }
        Err(e) => report.blockers.push(Blocker::Cmdline {
            reason: error_chain(&e),
        }),
    }
    if args.known_good_kernel {
        report.warnings.push(format!(
            "{} may not have the LUO file handlers this kernel has; a next kernel without one \
             makes /dev/liveupdate fail with EIO and loses every session (the operator says \
             it is known good)",
            args.kernel.display()
        ));
    } else {
        report.blockers.push(Blocker::UnknownHandlers {
            kernel: args.kernel.clone(),
        });
    }
    for socket in &args.vms {
        match VmmClient::new(socket).check_update(&args.agent_socket) {
            Ok(vm) => {
                report
                    .blockers
                    .extend(vm.blockers.iter().map(|b| Blocker::Vm {
                        vm: socket.clone(),
                        blocker: Box::new(b.clone()),
                    }));
                let name = socket.display();
                report
                    .warnings
                    .extend(vm.warnings.iter().map(|w| format!("VM {name}: {w}")));
                report.vms.push((socket.clone(), vm));
            }
            Err(e) => report.blockers.push(Blocker::VmUnreachable {
                vm: socket.clone(),
                reason: error_chain(&e),
            }),
        }
    }
    report
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
