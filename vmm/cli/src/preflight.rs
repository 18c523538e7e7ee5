//! The host's pre-flight (`luvmm update check`): everything that can be known before the point
//! of no return, as blockers (the update would lose something: refuse) and warnings (it goes
//! on, but the operator should know).
//!
//! - LUO is there and held by the luvmm agent, not by someone else;
//! - the memfd handler exists (probed through the agent, in a scratch session);
//! - each VM's part, asked of its VMM through its control API (`luvmm_vmm::update::check`);
//! - the next kernel and initrd load (loaded, then unloaded) and its command line carries
//!   `liveupdate=on`;
//! - whether the next kernel has the same file handlers cannot be known from here: a next
//!   kernel without one makes `/dev/liveupdate` fail with `EIO` and loses every session, so
//!   this is a blocker unless the operator says the kernel is known good.
//!
//! It drives VMMs from outside, so it lives with the binary.

use std::path::PathBuf;

use luvmm_liveupdate::agent::{AgentClient, DEFAULT_AGENT_SOCKET};
use luvmm_liveupdate::luo::probe::HandlerStatus;
use luvmm_liveupdate::luo::{kexec, LiveUpdate, LuoError};
use luvmm_resources::errors::error_chain;
use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::update::check::{Blocker, VmCheck};
use serde::{Deserialize, Serialize};

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
    /// Who holds the VMs' sessions through the kexec: the agent, or systemd (its services'
    /// fd stores, systemd 261 or later); auto: systemd where PID 1 is such a systemd and no
    /// agent answers.
    #[arg(long, value_enum, default_value_t = HostHolder::Auto)]
    pub holder: HostHolder,
}

/// Who holds the VMs' sessions through a host's kexec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostHolder {
    Auto,
    Agent,
    Systemd,
}

impl HostHolder {
    /// Whether systemd holds them here: `auto` decides by PID 1's version and the agent.
    pub fn is_systemd(self, agent_socket: &std::path::Path) -> bool {
        use luvmm_liveupdate::fdstore::{host_systemd, preserves_fd_stores};
        match self {
            HostHolder::Agent => false,
            HostHolder::Systemd => true,
            HostHolder::Auto => {
                preserves_fd_stores(host_systemd())
                    && AgentClient::new(agent_socket).status().is_err()
            }
        }
    }
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

/// Whether this kernel preserves a memfd, tried in a scratch session on /dev/liveupdate
/// (waited for while a VMM creating its session has it).
fn probe_memfd_handler() -> Result<HandlerStatus, LuoError> {
    let started = std::time::Instant::now();
    let device = loop {
        match LiveUpdate::open() {
            Err(LuoError::Busy) if started.elapsed() < std::time::Duration::from_secs(5) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other?,
        }
    };
    let memfd = luvmm_liveupdate::luo::probe::scratch_memfd().map_err(LuoError::Open)?;
    Ok(luvmm_liveupdate::luo::probe::try_preserve(
        &device,
        std::os::fd::AsFd::as_fd(&memfd),
    ))
}

/// Runs the pre-flight.
pub fn run(args: &CheckArgs) -> CheckReport {
    let mut report = CheckReport::default();
    let agent = AgentClient::new(&args.agent_socket);
    if args.holder.is_systemd(&args.agent_socket) {
        // Each VMM creates its own session; this process probes the device as they will.
        match probe_memfd_handler() {
            Ok(HandlerStatus::Present) => {}
            Ok(found) => report
                .blockers
                .push(Blocker::NoMemfdHandler { found: Some(found) }),
            Err(e) => report.blockers.push(Blocker::LuoProbe {
                reason: error_chain(&e),
            }),
        }
    } else {
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
            // A kernel already loaded is the agent's for a pending update (or another tool's):
            // loading over it or unloading it would take the update's kernel away.
            if kexec::loaded() == Some(true) {
                report.warnings.push(
                    "a next kernel is loaded already (the agent's, for a pending update, or \
                     another tool's): it is left in place, and the kernel to check was not \
                     loaded"
                        .into(),
                );
            } else {
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
