//! The x86 architectural state of a vCPU: how a fresh one is set up for boot, how its state is
//! saved and put back, and the parts of it that need a policy of their own (MSRs, the TSC rate
//! and its progress over a pause, the XSAVE area).
//!
//! Everything here works on a `VcpuFd` and knows nothing of the vCPU thread.

pub mod compat;
pub mod cpuid;
pub mod host_kvm;
pub mod msr;
pub mod regs;
pub mod state;
pub mod tsc;
pub mod tsc_carry;
pub mod tsc_rate;
pub mod xsave;

use msr::MsrError;
use tsc::TscError;
use xsave::XsaveError;

/// Setting up, saving or restoring a vCPU's architectural state failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A register ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A CPUID table does not fit KVM's.
    #[error("{entries} CPUID entries are more than KVM takes")]
    Cpuid { entries: usize },
    /// MSRs could not be read or written.
    #[error(transparent)]
    Msr(#[from] MsrError),
    /// The saved TSC rate cannot be kept.
    #[error(transparent)]
    Tsc(#[from] TscError),
    /// The guest's TSC could not be moved on over the pause.
    #[error(transparent)]
    TscOffset(#[from] tsc_carry::OffsetError),
    /// The XSAVE area could not be read or written.
    #[error(transparent)]
    Xsave(#[from] XsaveError),
}

/// Turns a failed ioctl `op` into an [`ArchError`].
fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Ioctl { op, source }
}
