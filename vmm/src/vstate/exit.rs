//! What a `KVM_RUN` exit means to the vCPU loop: the guest goes on, or it has stopped and why.

use std::fmt;

use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SEV_TERM, KVM_SYSTEM_EVENT_SHUTDOWN,
    KVM_SYSTEM_EVENT_SUSPEND, KVM_SYSTEM_EVENT_WAKEUP,
};

/// How one `KVM_RUN` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// A port or MMIO access was served on the bus; the guest goes on.
    Io,
    /// The guest halted. The in-kernel LAPIC wakes it, so the guest goes on.
    Halt,
    /// `KVM_RUN` returned early for a kick (a signal, or `immediate_exit`); the guest goes on
    /// once the loop has looked at its channel.
    Kicked,
    /// The guest shut down (a triple fault): it cannot run again.
    Shutdown,
    /// The guest asked for a system event (`KVM_SYSTEM_EVENT_*`: shutdown, reset, crash, ...).
    SystemEvent { kind: u32 },
    /// KVM could not handle an exit itself, e.g. an instruction it cannot emulate
    /// (`KVM_INTERNAL_ERROR_*` suberror, with the data KVM gave).
    InternalError { suberror: u32, data: Vec<u64> },
    /// The CPU refused to enter the guest (hardware-specific reason, host CPU).
    FailEntry { reason: u64, cpu: u32 },
    /// An exit luvmm does not expect, by its `KVM_EXIT_*` number.
    Unhandled { exit_reason: u32 },
}

impl RunExit {
    /// The internal error KVM reported in `run`, read after `KVM_RUN` returned
    /// `KVM_EXIT_INTERNAL_ERROR`.
    pub fn internal_error(run: &kvm_run) -> RunExit {
        // SAFETY: the union holds only integers and arrays of them, so whatever KVM last wrote
        // is a valid `internal`; after KVM_EXIT_INTERNAL_ERROR it is the one KVM filled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = usize::try_from(internal.ndata).unwrap_or(usize::MAX);
        RunExit::InternalError {
            suberror: internal.suberror,
            data: internal.data[..ndata.min(internal.data.len())].to_vec(),
        }
    }
}

impl fmt::Display for RunExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunExit::Io => write!(f, "port or MMIO access served"),
            RunExit::Halt => write!(f, "halted"),
            RunExit::Kicked => write!(f, "kicked out of KVM_RUN"),
            RunExit::Shutdown => write!(f, "shutdown (triple fault or reset)"),
            RunExit::SystemEvent { kind } => {
                write!(f, "system event {kind} ({})", system_event_name(*kind))
            }
            RunExit::InternalError { suberror, data } => {
                let name = internal_error_name(*suberror);
                write!(f, "KVM internal error {suberror} ({name}), data [")?;
                for (i, word) in data.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{word:#x}")?;
                }
                write!(f, "]")
            }
            RunExit::FailEntry { reason, cpu } => {
                write!(f, "entry failed: reason {reason:#x} on host cpu {cpu}")
            }
            RunExit::Unhandled { exit_reason } => write!(f, "unhandled exit {exit_reason}"),
        }
    }
}

fn system_event_name(kind: u32) -> &'static str {
    match kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => "shutdown",
        KVM_SYSTEM_EVENT_RESET => "reset",
        KVM_SYSTEM_EVENT_CRASH => "crash",
        KVM_SYSTEM_EVENT_WAKEUP => "wakeup",
        KVM_SYSTEM_EVENT_SUSPEND => "suspend",
        KVM_SYSTEM_EVENT_SEV_TERM => "SEV termination",
        _ => "unknown",
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "exit while delivering an event",
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown",
    }
}

/// `KVM_RUN` itself failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The ioctl returned an error other than an interruption.
    #[error("KVM_RUN failed")]
    KvmRun(#[source] kvm_ioctls::Error),
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_13;

    use super::*;

    #[test]
    fn an_internal_error_carries_its_suberror_and_only_the_data_kvm_gave() {
        let mut run = kvm_run {
            exit_reason: kvm_bindings::KVM_EXIT_INTERNAL_ERROR,
            ..Default::default()
        };
        let mut data = [0u64; 16];
        data[..3].copy_from_slice(&[0x10, 0x20, 0x30]);
        run.__bindgen_anon_1.internal = kvm_run__bindgen_ty_1__bindgen_ty_13 {
            suberror: KVM_INTERNAL_ERROR_EMULATION,
            ndata: 2,
            data,
        };
        let exit = RunExit::internal_error(&run);
        assert_eq!(
            exit,
            RunExit::InternalError {
                suberror: 1,
                data: vec![0x10, 0x20]
            }
        );
        assert_eq!(
            exit.to_string(),
            "KVM internal error 1 (instruction emulation failed), data [0x10, 0x20]"
        );

        // An ndata past the array is cut to it.
        run.__bindgen_anon_1.internal.ndata = 100;
        match RunExit::internal_error(&run) {
            RunExit::InternalError { data, .. } => assert_eq!(data.len(), 16),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn stops_are_described_for_the_log() {
        assert_eq!(
            RunExit::SystemEvent { kind: 3 }.to_string(),
            "system event 3 (crash)"
        );
        assert_eq!(
            RunExit::FailEntry {
                reason: 0x21,
                cpu: 1
            }
            .to_string(),
            "entry failed: reason 0x21 on host cpu 1"
        );
        assert_eq!(
            RunExit::Shutdown.to_string(),
            "shutdown (triple fault or reset)"
        );
    }
}
