//! Seccomp filters: every luvmm thread runs under an allow list of the system calls its job
//! needs, ioctls by request number, installed by the thread itself before it runs guest code
//! (a vCPU, before its first `KVM_RUN`) or serves a client (the event loop, the agent). A call
//! outside the list traps, and [`sigsys`] ends the process with one line naming the thread and
//! the call, and [`VIOLATION_EXIT_STATUS`].
//!
//! Each thread kind has its own file: [`vcpu`], [`event_loop`] (the main thread, which also
//! serves the API), [`agent`]; [`allow`] holds what every thread needs. Filters are per thread,
//! not synchronised over the process (TSYNC): a thread started before its kind's filter would
//! otherwise inherit a list that is not its own. vCPU threads are started before the event
//! loop installs its filter, so no thread carries two; the event loop's list has no `clone`,
//! so a thread kind added later must start before it, or fail loudly.

mod agent;
mod allow;
mod event_loop;
mod ioctls;
mod names;
mod sigsys;
mod vcpu;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{BackendError, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use sigsys::VIOLATION_EXIT_STATUS;

use crate::faults::{self, Fault};

/// Whether luvmm's threads run under their filters: on by default; off to debug a call a
/// filter refuses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    #[default]
    On,
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        match word {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            other => Err(format!("{other:?} is neither on nor off")),
        }
    }
}

/// The kinds of luvmm threads, each with its own allow list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread of `run` and `restore`: the event loop and the API.
    EventLoop,
    /// A vCPU thread.
    Vcpu,
    /// The live-update agent's thread.
    Agent,
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Agent => "agent",
        })
    }
}

/// The filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind} seccomp filter")]
    Build {
        kind: ThreadKind,
        #[source]
        source: BackendError,
    },
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    #[error("seccomp was set up already in this process")]
    AlreadySetUp,
    #[error("cannot install the {kind} seccomp filter on thread {thread}")]
    Install {
        kind: ThreadKind,
        thread: String,
        #[source]
        source: seccompiler::Error,
    },
}

/// The compiled filters, one per thread kind.
struct Filters {
    event_loop: BpfProgram,
    vcpu: BpfProgram,
    agent: BpfProgram,
}

impl Filters {
    fn build() -> Result<Filters, SeccompError> {
        let kick = crate::vstate::vcpu::kick_signal();
        Ok(Filters {
            event_loop: compile(ThreadKind::EventLoop, event_loop::allow_list(kick))?,
            vcpu: compile(ThreadKind::Vcpu, vcpu::allow_list())?,
            agent: compile(ThreadKind::Agent, agent::allow_list())?,
        })
    }

    fn of(&self, kind: ThreadKind) -> &BpfProgram {
        match kind {
            ThreadKind::EventLoop => &self.event_loop,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Agent => &self.agent,
        }
    }
}

/// What [`init`] decided for this process.
struct Setup {
    /// `None` with `--seccomp off`.
    filters: Option<Filters>,
    /// The test fault [`Fault::VcpuForbiddenSyscall`] was asked for.
    vcpu_fault: bool,
}

static SETUP: OnceLock<Setup> = OnceLock::new();

/// Turns an allow list into BPF: listed calls are allowed, any other traps.
fn compile(
    kind: ThreadKind,
    list: Result<allow::AllowList, BackendError>,
) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;
    let filter = SeccompFilter::new(
        list.map_err(build)?.into_rules(),
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Builds every filter and installs the SIGSYS handler, once per process and before any
/// thread that needs a filter starts, so that a bad list fails here rather than in a thread.
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    let filters = match mode {
        SeccompMode::On => {
            let filters = Filters::build()?;
            sigsys::install_handler().map_err(SeccompError::Handler)?;
            Some(filters)
        }
        SeccompMode::Off => {
            log::warn!("seccomp is off: luvmm's threads run without their filters");
            None
        }
    };
    let setup = Setup {
        filters,
        vcpu_fault: faults::armed(Fault::VcpuForbiddenSyscall),
    };
    SETUP.set(setup).map_err(|_| SeccompError::AlreadySetUp)
}

/// Installs `kind`'s filter on the calling thread, which a forbidden call's line names
/// `thread`. It does nothing with `--seccomp off`, or in a process that never called [`init`]
/// (the library's own tests).
pub fn apply(kind: ThreadKind, thread: &str) -> Result<(), SeccompError> {
    let Some(setup) = SETUP.get() else {
        return Ok(());
    };
    if let Some(filters) = &setup.filters {
        sigsys::set_thread_name(thread);
        seccompiler::apply_filter(filters.of(kind)).map_err(|source| SeccompError::Install {
            kind,
            thread: thread.to_string(),
            source,
        })?;
    }
    if kind == ThreadKind::Vcpu && setup.vcpu_fault {
        log::warn!("{thread}: fault injection: a system call no filter allows");
        // SAFETY: getppid takes nothing and cannot fail.
        unsafe { libc::getppid() };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds() {
        let filters = Filters::build().expect("the allow lists compile");
        for kind in [ThreadKind::EventLoop, ThreadKind::Vcpu, ThreadKind::Agent] {
            assert!(!filters.of(kind).is_empty(), "{kind}");
        }
    }

    #[test]
    fn the_flag_takes_on_and_off_only() {
        assert_eq!("on".parse(), Ok(SeccompMode::On));
        assert_eq!("off".parse(), Ok(SeccompMode::Off));
        assert!("yes".parse::<SeccompMode>().is_err());
    }
}
