//! The ioctl request numbers the filters allow, restated from the kernel's uAPI headers
//! (`linux/kvm.h`, `linux/vfio.h`, `linux/iommufd.h`): the crates that make these calls keep
//! their numbers private. LUO's come from [`luvmm_liveupdate::luo::uapi`].

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_device_attr, kvm_fpu, kvm_irq_routing,
    kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use luvmm_liveupdate::luo::uapi;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// `KVMIO`.
const KVMIO: u32 = 0xAE;
/// `VFIO_TYPE` (`';'`), shared by VFIO and iommufd.
const VFIO_TYPE: u32 = 0x3B;
/// `VFIO_BASE`: VFIO's numbers count from here.
const VFIO_BASE: u32 = 100;
/// `IOMMUFD_CMD_BASE`: iommufd's numbers count from here.
const IOMMUFD_BASE: u32 = 0x80;

// The vCPU's own: run, and read its state for a save.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);

// The VM's: its clock and interrupt controllers for a save, memslots and interrupt routes
// for passthrough devices, and the KVM VFIO pseudo-device.
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);

// VFIO: the legacy container and group, and the device (`_IO(VFIO_TYPE, VFIO_BASE + n)`).
ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE, VFIO_BASE);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE, VFIO_BASE + 1);
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE, VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE, VFIO_BASE + 3);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE, VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_UNSET_CONTAINER, VFIO_TYPE, VFIO_BASE + 5);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE, VFIO_BASE + 6);
ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE, VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE, VFIO_BASE + 9);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE, VFIO_BASE + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE, VFIO_BASE + 11);
ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE, VFIO_BASE + 12);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE, VFIO_BASE + 14);
ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE, VFIO_BASE + 17);
ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE, VFIO_BASE + 18);
ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 19);
ioctl_io_nr!(VFIO_DEVICE_DETACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 20);

// iommufd: the IOAS guest RAM is mapped into, and the page table a device attaches to.
ioctl_io_nr!(IOMMU_DESTROY, VFIO_TYPE, IOMMUFD_BASE);
ioctl_io_nr!(IOMMU_IOAS_ALLOC, VFIO_TYPE, IOMMUFD_BASE + 1);
ioctl_io_nr!(IOMMU_IOAS_IOVA_RANGES, VFIO_TYPE, IOMMUFD_BASE + 4);
ioctl_io_nr!(IOMMU_IOAS_MAP, VFIO_TYPE, IOMMUFD_BASE + 5);
ioctl_io_nr!(IOMMU_IOAS_UNMAP, VFIO_TYPE, IOMMUFD_BASE + 6);
ioctl_io_nr!(IOMMU_HWPT_ALLOC, VFIO_TYPE, IOMMUFD_BASE + 9);
ioctl_io_nr!(IOMMU_GET_HW_INFO, VFIO_TYPE, IOMMUFD_BASE + 10);
ioctl_io_nr!(IOMMU_IOAS_MAP_FILE, VFIO_TYPE, IOMMUFD_BASE + 15);

/// What a vCPU thread asks of its own fd: run, read its state when the VM is saved, and tell
/// the guest's kvmclock it was paused.
pub(super) fn vcpu_own() -> Vec<u64> {
    vec![
        KVM_RUN(),
        KVM_KVMCLOCK_CTRL(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_FPU(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_TSC_KHZ(),
        // The TSC offset (`KVM_VCPU_TSC_OFFSET`).
        KVM_GET_DEVICE_ATTR(),
        KVM_GET_XSAVE(),
        KVM_GET_XSAVE2(),
        KVM_GET_XCRS(),
    ]
}

/// What serving a passthrough device's config space asks of KVM and VFIO, from whichever
/// thread the guest's access lands on: MSI and MSI-X routes, their irqfds and the device's
/// interrupt triggers, and the memslot of a BAR the guest moves.
pub(super) fn device_emulation() -> Vec<u64> {
    vec![
        KVM_SET_GSI_ROUTING(),
        KVM_IRQFD(),
        KVM_SET_USER_MEMORY_REGION(),
        VFIO_DEVICE_SET_IRQS(),
    ]
}

/// The VM-level state a save reads from the event loop.
pub(super) fn vm_save() -> Vec<u64> {
    vec![KVM_GET_CLOCK(), KVM_GET_IRQCHIP(), KVM_GET_PIT2()]
}

/// Opening, resetting, re-arming and closing passthrough devices at run time (a cancelled
/// update re-opens what the preserve reset; shutdown detaches), on either IOMMU path.
pub(super) fn vfio_devices() -> Vec<u64> {
    vec![
        KVM_SET_DEVICE_ATTR(),
        VFIO_GET_API_VERSION(),
        VFIO_CHECK_EXTENSION(),
        VFIO_SET_IOMMU(),
        VFIO_GROUP_GET_STATUS(),
        VFIO_GROUP_SET_CONTAINER(),
        VFIO_GROUP_UNSET_CONTAINER(),
        VFIO_GROUP_GET_DEVICE_FD(),
        VFIO_DEVICE_GET_INFO(),
        VFIO_DEVICE_GET_REGION_INFO(),
        VFIO_DEVICE_GET_IRQ_INFO(),
        VFIO_DEVICE_RESET(),
        VFIO_IOMMU_GET_INFO(),
        VFIO_IOMMU_MAP_DMA(),
        VFIO_IOMMU_UNMAP_DMA(),
        VFIO_DEVICE_FEATURE(),
        VFIO_DEVICE_BIND_IOMMUFD(),
        VFIO_DEVICE_ATTACH_IOMMUFD_PT(),
        VFIO_DEVICE_DETACH_IOMMUFD_PT(),
        IOMMU_DESTROY(),
        IOMMU_IOAS_ALLOC(),
        IOMMU_IOAS_IOVA_RANGES(),
        IOMMU_IOAS_MAP(),
        IOMMU_IOAS_UNMAP(),
        IOMMU_HWPT_ALLOC(),
        IOMMU_GET_HW_INFO(),
        IOMMU_IOAS_MAP_FILE(),
    ]
}

/// A VMM's side of its LUO session: preserve RAM, devices and state into it; after the
/// kexec, retrieve them and finish it.
pub(super) fn luo_session() -> Vec<u64> {
    vec![
        uapi::LIVEUPDATE_SESSION_PRESERVE_FD(),
        uapi::LIVEUPDATE_SESSION_RETRIEVE_FD(),
        uapi::LIVEUPDATE_SESSION_FINISH(),
        uapi::LIVEUPDATE_SESSION_GET_NAME(),
    ]
}

/// The agent's side of LUO: `/dev/liveupdate` creates and retrieves sessions.
pub(super) fn luo_device() -> Vec<u64> {
    vec![
        uapi::LIVEUPDATE_IOCTL_CREATE_SESSION(),
        uapi::LIVEUPDATE_IOCTL_RETRIEVE_SESSION(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // From an x86_64 kernel's headers, as strace prints them.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_GET_PIT2(), 0x8070_ae9f);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(VFIO_DEVICE_SET_IRQS(), 0x3b6e);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD(), 0x3b76);
        assert_eq!(IOMMU_IOAS_MAP(), 0x3b85);
        assert_eq!(IOMMU_IOAS_MAP_FILE(), 0x3b8f);
    }
}
