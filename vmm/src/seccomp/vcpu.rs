//! A vCPU thread's allow list: `KVM_RUN` and the guest's port and MMIO exits, which land on the
//! emulated devices (serial, guest control, PCI config space) and, through PCI, on passthrough
//! devices.

use seccompiler::BackendError;

use super::allow::{every_thread, AllowList};
use super::ioctls;

pub(super) fn allow_list() -> Result<AllowList, BackendError> {
    let mut list = every_thread()?;
    list
        // Its own fd: run, and read the vCPU's state when the VM is saved.
        .ioctls(&ioctls::vcpu_own())?
        // A guest that programs a passthrough device's MSI or MSI-X, or moves one of its BARs.
        .ioctls(&ioctls::device_emulation())?
        // A passthrough device's MSI-X: the eventfds of its vectors, made when the guest first
        // enables it, and looked at (never read) for the pending bits.
        .any(libc::SYS_eventfd2)
        .any(libc::SYS_poll)
        .any(libc::SYS_ppoll)
        // Trapped BARs and config space of passthrough devices, read and written at offsets of
        // the VFIO device fd.
        .any(libc::SYS_pread64)
        .any(libc::SYS_pwrite64);
    Ok(list)
}
