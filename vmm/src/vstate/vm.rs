//! The KVM VM: its fd, the in-kernel interrupt controllers and PIT, memslots, and the VM-wide
//! state that a save carries.

use kvm_bindings::{
    kvm_clock_data, kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO,
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_CLOCK_REALTIME,
    KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_ioctls::{Cap, Kvm, VmFd};
use luvmm_devices::vfio::VfioDeviceFd;
use luvmm_resources::config::HostLimits;
use luvmm_resources::layout::KVM_TSS_ADDRESS;
use luvmm_resources::state::KvmVmState;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestRam;
use super::x86_64::xsave::XsaveArea;
use crate::faults::{self, Fault};

/// KVM capabilities luvmm cannot run without, with what each is for.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel LAPIC, IOAPIC and PIC"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "device interrupts through eventfds"),
    (Cap::UserMemory, "memslots"),
    (Cap::SetTssAddr, "the TSS region"),
    (Cap::Xsave, "FPU and extended state save"),
    (Cap::Xcrs, "XCR save"),
    (Cap::VcpuEvents, "pending event save"),
    (Cap::Debugregs, "debug register save"),
    (Cap::ImmediateExit, "kicking vCPUs out of KVM_RUN"),
    (Cap::AdjustClock, "kvmclock save"),
];

/// [`KVM_TSS_ADDRESS`] as `KVM_SET_TSS_ADDR` takes it; the assert makes the cast exact.
#[allow(clippy::cast_possible_truncation)]
const TSS_ADDRESS: usize = {
    assert!(KVM_TSS_ADDRESS <= usize::MAX as u64);
    KVM_TSS_ADDRESS as usize
};

/// A KVM operation on the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability luvmm depends on.
    #[error("KVM lacks {cap:?}, needed for {why}")]
    MissingCap { cap: Cap, why: &'static str },
    /// A VM-level ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// vfio-ioctls would not duplicate its KVM VFIO device fd (it says no more).
    #[error("cannot duplicate the KVM VFIO device fd")]
    VfioDeviceDup,
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { op, source }
}

/// Takes VFIO file `file` off the KVM VFIO pseudo-device. KVM holds a reference to each file
/// added to it, so a device's file is released (and the device can be opened again) only once
/// it is off as well as closed.
pub fn remove_vfio_file(kvm_vfio: &VfioDeviceFd, file: BorrowedFd<'_>) -> Result<(), VmError> {
    let device = kvm_vfio
        .try_clone()
        .and_then(VfioDeviceFd::to_kvm)
        .map_err(|_| VmError::VfioDeviceDup)?;
    let fd: i32 = file.as_raw_fd();
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_DEV_VFIO_FILE,
        attr: u64::from(KVM_DEV_VFIO_FILE_DEL),
        // KVM reads the fd, an int, from here during the call.
        addr: &fd as *const i32 as u64,
    };
    device
        .set_device_attr(&attr)
        .map_err(ioctl("KVM_SET_DEVICE_ATTR (KVM_DEV_VFIO_FILE_DEL)"))
}

/// Opens `/dev/kvm` and checks every capability luvmm needs.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for &(cap, why) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap { cap, why });
        }
    }
    Ok(kvm)
}

/// What this host's KVM, memory and CPU allow, for config validation.
pub fn host_limits(kvm: &Kvm) -> HostLimits {
    HostLimits {
        max_vcpus: u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX),
        ram_bytes: super::host::ram_bytes().unwrap_or(u64::MAX),
        phys_addr_bits: super::host::phys_addr_bits(),
    }
}

/// A KVM VM with its in-kernel irqchip and PIT.
pub struct KvmVm {
    fd: Arc<VmFd>,
    /// The size of its vCPUs' XSAVE area, read once the VM exists (`KVM_CAP_XSAVE2` is a VM
    /// question) and before any vCPU does.
    xsave_area: XsaveArea,
}

impl KvmVm {
    /// Creates the VM, its TSS region, irqchip and PIT. The same recipe serves a fresh boot and
    /// a restore; a restore then overwrites the device state with [`KvmVm::restore_state`].
    pub fn new(kvm: &Kvm) -> Result<KvmVm, VmError> {
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let xsave_area = XsaveArea::of_vm(&fd);
        Ok(KvmVm {
            fd: Arc::new(fd),
            xsave_area,
        })
    }

    /// The VM fd, for creating vCPUs.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The size of its vCPUs' XSAVE area.
    pub fn xsave_area(&self) -> XsaveArea {
        self.xsave_area
    }

    /// A shared handle to the VM fd, for what routes interrupts while the VM runs.
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// Registers every RAM region as a memslot, slot `i` for region `i`.
    pub fn register_memory(&self, ram: &GuestRam) -> Result<(), VmError> {
        for (slot, region) in (0u32..).zip(ram.memory().iter()) {
            let memory_region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `ram`, which
            // the VMM keeps alive for as long as this VM exists (it drops the VM first).
            unsafe { self.fd.set_user_memory_region(memory_region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// The KVM VFIO pseudo-device, which KVM uses to know the VFIO files a VM's devices come
    /// from (for DMA coherency, among others); passthrough devices are added to it.
    pub fn create_vfio_device(&self) -> Result<Arc<VfioDeviceFd>, VmError> {
        let mut create = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let fd = self
            .fd
            .create_device(&mut create)
            .map_err(ioctl("KVM_CREATE_DEVICE (KVM_DEV_TYPE_VFIO)"))?;
        Ok(Arc::new(VfioDeviceFd::new_from_kvm(fd)))
    }

    /// Routes an eventfd to a legacy interrupt line.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD"))
    }

    /// Reads the PIC, IOAPIC, PIT and kvmclock. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<KvmVmState, VmError> {
        let irqchip = |chip_id| -> Result<kvm_irqchip, VmError> {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(ioctl("KVM_GET_IRQCHIP"))?;
            Ok(chip)
        };
        Ok(KvmVmState {
            pic_master: irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: with_wall_clock(self.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?),
        })
    }

    /// The kvmclock now, with its host TSC stamp where KVM gives one.
    pub fn clock(&self) -> Result<kvm_clock_data, VmError> {
        self.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))
    }

    /// Writes back what [`KvmVm::save_state`] read.
    pub fn restore_state(&self, state: &KvmVmState) -> Result<(), VmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(ioctl("KVM_SET_PIT2"))?;
        self.restore_clock(&state.clock)
    }

    /// Puts the saved kvmclock back. KVM_SET_CLOCK takes only the REALTIME flag; with it, KVM
    /// advances the clock by the host time that passed since the save, so the guest does not
    /// see time stand still. Asked again once the vCPUs are there, it lets KVM run its master
    /// clock (which needs every vCPU's TSC in step), and so give the host TSC stamp.
    pub fn restore_clock(&self, saved: &kvm_clock_data) -> Result<(), VmError> {
        if faults::armed(Fault::NoKvmclockRestore) {
            log::warn!("test fault: the saved kvmclock is not put back");
            return Ok(());
        }
        let clock = kvm_clock_data {
            flags: saved.flags & KVM_CLOCK_REALTIME,
            ..*saved
        };
        self.fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }
}

/// `clock` with the host's wall-clock time of its reading. KVM adds it (`KVM_CLOCK_REALTIME`)
/// only while its master clock runs, which needs a TSC clocksource on the host; on a host
/// whose kernel found its TSC unstable it leaves it out, and a restore could not tell how much
/// time passed: the guest's clock would stand still over the whole blackout. There luvmm takes
/// the wall clock itself, microseconds after KVM read the kvmclock.
fn with_wall_clock(clock: kvm_clock_data) -> kvm_clock_data {
    if clock.flags & KVM_CLOCK_REALTIME != 0 {
        return clock;
    }
    let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        return clock;
    };
    log::info!(
        "KVM gives the kvmclock without the host's wall clock (no master clock: the host's \
         clocksource is not the TSC); luvmm takes it"
    );
    kvm_clock_data {
        flags: clock.flags | KVM_CLOCK_REALTIME,
        realtime: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
        ..clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_without_the_hosts_wall_clock_gets_it_and_keeps_the_rest() {
        let now = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        };
        let before = now();
        let bare = kvm_clock_data {
            clock: 123_456_789,
            flags: 0,
            ..Default::default()
        };
        let clock = with_wall_clock(bare);
        let after = now();
        assert_eq!(clock.flags, KVM_CLOCK_REALTIME);
        assert_eq!(clock.clock, 123_456_789);
        assert!((before..=after).contains(&u128::from(clock.realtime)));
    }

    #[test]
    fn kvms_own_wall_clock_is_kept() {
        let from_kvm = kvm_clock_data {
            clock: 5,
            flags: KVM_CLOCK_REALTIME,
            realtime: 42,
            ..Default::default()
        };
        let clock = with_wall_clock(from_kvm);
        assert_eq!(
            (clock.flags, clock.realtime, clock.clock),
            (KVM_CLOCK_REALTIME, 42, 5)
        );
    }
}
