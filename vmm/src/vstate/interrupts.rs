//! What passthrough devices ask of KVM while the guest runs: interrupt routing (INTx lines and
//! MSI GSI routes) and memslots for direct-mapped BARs. `KVM_SET_GSI_ROUTING` replaces the whole table, so the router keeps
//! it: the IOAPIC and PIC pins that KVM routes by default, plus one entry per MSI route.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use luvmm_devices::vfio::{GuestMapper, HypervisorError, IrqRouter};
use luvmm_resources::layout::{MemoryLayout, MSI_GSI_START};
use luvmm_resources::sync::lock;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::vm::KvmVm;

/// The router and memslot mapper passthrough devices use in `vm`, whose RAM is `layout`.
pub fn device_routes(
    vm: &KvmVm,
    layout: &MemoryLayout,
) -> (Arc<dyn IrqRouter>, Arc<dyn GuestMapper>) {
    let router: Arc<dyn IrqRouter> = Arc::new(KvmIrqRouter::new(vm.shared_fd()));
    let mapper: Arc<dyn GuestMapper> = Arc::new(KvmGuestMapper::new(
        vm.shared_fd(),
        u32::try_from(layout.regions.len()).unwrap_or(u32::MAX),
    ));
    (router, mapper)
}

const IOAPIC_PINS: u32 = 24;
/// IOAPIC pins for PCI INTx: 16-23, above the ISA lines.
const INTX_LINE_START: u32 = 16;
/// KVM_CAP_IRQ_ROUTING's usual table size; GSIs beyond it are refused.
pub(crate) const MAX_GSI: u32 = 4096;

/// MSI routes of one VM.
pub struct KvmIrqRouter {
    vm: Arc<VmFd>,
    routes: Mutex<Routes>,
}

struct Routes {
    /// MSI GSIs handed out.
    gsis: BTreeSet<u32>,
    /// IOAPIC pins handed out for INTx.
    intx_lines: BTreeSet<u32>,
    msi: BTreeMap<u32, (u64, u32)>,
}

/// Takes `saved` from `range` if it is in it and free, or else the lowest free number.
fn claim(
    taken: &mut BTreeSet<u32>,
    range: std::ops::Range<u32>,
    saved: Option<u32>,
    what: &'static str,
) -> Result<u32, HypervisorError> {
    let number = match saved {
        Some(number) if !range.contains(&number) || taken.contains(&number) => {
            return Err(HypervisorError::Taken { what, number })
        }
        Some(number) => number,
        None => range
            .clone()
            .find(|n| !taken.contains(n))
            .ok_or(HypervisorError::Exhausted { what })?,
    };
    taken.insert(number);
    Ok(number)
}

impl KvmIrqRouter {
    /// A router with no MSI routes yet.
    pub fn new(vm: Arc<VmFd>) -> KvmIrqRouter {
        KvmIrqRouter {
            vm,
            routes: Mutex::new(Routes {
                gsis: BTreeSet::new(),
                intx_lines: BTreeSet::new(),
                msi: BTreeMap::new(),
            }),
        }
    }

    fn apply(&self, routes: &Routes) -> Result<(), HypervisorError> {
        let mut entries = Vec::with_capacity(40 + routes.msi.len());
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for pin in (0..16).filter(|&p| p != 2) {
            let chip = if pin < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip_entry(pin, chip, pin % 8));
        }
        for (&gsi, &(address, data)) in &routes.msi {
            let mut entry = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            // The message address split into its halves: truncation is the point.
            #[allow(clippy::cast_possible_truncation)]
            let low = address as u32;
            entry.u.msi.address_lo = low;
            entry.u.msi.address_hi = (address >> 32) as u32;
            entry.u.msi.data = data;
            entries.push(entry);
        }
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|_| HypervisorError::Exhausted {
                what: "GSI routing table entry",
            })?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(ioctl(|| "KVM_SET_GSI_ROUTING".into()))
    }
}

/// A failed KVM ioctl; `op` is only built when the call failed (irqfds are attached and
/// detached on every MSI-X mask change).
fn ioctl(op: impl FnOnce() -> String) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Ioctl {
        op: op(),
        errno: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

impl IrqRouter for KvmIrqRouter {
    fn allocate_gsi(&self, saved: Option<u32>) -> Result<u32, HypervisorError> {
        let mut routes = lock(&self.routes);
        claim(
            &mut routes.gsis,
            MSI_GSI_START..MAX_GSI,
            saved,
            "GSI for MSI",
        )
    }

    fn allocate_intx_line(&self, saved: Option<u32>) -> Result<u32, HypervisorError> {
        let mut routes = lock(&self.routes);
        claim(
            &mut routes.intx_lines,
            INTX_LINE_START..IOAPIC_PINS,
            saved,
            "IOAPIC pin for INTx",
        )
    }

    fn register_resample_irqfd(
        &self,
        trigger: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), HypervisorError> {
        self.vm
            .register_irqfd_with_resample(trigger, resample, gsi)
            .map_err(ioctl(|| format!("KVM_IRQFD with resample for GSI {gsi}")))
    }

    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), HypervisorError> {
        let mut routes = lock(&self.routes);
        routes.msi.insert(gsi, (address, data));
        self.apply(&routes)
    }

    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), HypervisorError> {
        self.vm
            .register_irqfd(evt, gsi)
            .map_err(ioctl(|| format!("KVM_IRQFD for GSI {gsi}")))
    }

    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), HypervisorError> {
        self.vm
            .unregister_irqfd(evt, gsi)
            .map_err(ioctl(|| format!("KVM_IRQFD deassign for GSI {gsi}")))
    }
}

/// KVM memslots for direct-mapped BARs, numbered after the RAM slots.
pub struct KvmGuestMapper {
    vm: Arc<VmFd>,
    /// Slot numbers in use.
    slots: Mutex<Vec<u32>>,
    first_slot: u32,
}

impl KvmGuestMapper {
    /// A mapper whose slots start after the `ram_slots` RAM memslots.
    pub fn new(vm: Arc<VmFd>, ram_slots: u32) -> KvmGuestMapper {
        KvmGuestMapper {
            vm,
            slots: Mutex::new(Vec::new()),
            first_slot: ram_slots,
        }
    }

    fn set(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), HypervisorError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: `host` is a live mapping of `size` bytes owned by the `DirectBar` that asked
        // for it, whose Drop deletes the slot (size 0, through `unmap`) before it munmaps.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(ioctl(|| {
            format!("KVM_SET_USER_MEMORY_REGION slot {slot} at {gpa:#x}")
        }))
    }
}

impl GuestMapper for KvmGuestMapper {
    fn map(&self, gpa: u64, size: u64, host: u64) -> Result<u32, HypervisorError> {
        let mut slots = lock(&self.slots);
        let slot = (self.first_slot..)
            .find(|s| !slots.contains(s))
            .ok_or(HypervisorError::Exhausted { what: "memslot" })?;
        self.set(slot, gpa, size, host)?;
        slots.push(slot);
        Ok(slot)
    }

    fn unmap(&self, slot: u32) -> Result<(), HypervisorError> {
        let mut slots = lock(&self.slots);
        self.set(slot, 0, 0, 0)?;
        slots.retain(|&s| s != slot);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_claims_the_numbers_the_guest_saw() {
        let mut taken = BTreeSet::new();
        assert_eq!(claim(&mut taken, 24..28, Some(26), "GSI").ok(), Some(26));
        assert_eq!(claim(&mut taken, 24..28, None, "GSI").ok(), Some(24));
        assert_eq!(claim(&mut taken, 24..28, None, "GSI").ok(), Some(25));
        // The next free one skips what a restore claimed.
        assert_eq!(claim(&mut taken, 24..28, None, "GSI").ok(), Some(27));
        assert!(matches!(
            claim(&mut taken, 24..28, None, "GSI"),
            Err(HypervisorError::Exhausted { what: "GSI" })
        ));
        let mut taken = BTreeSet::from([25]);
        for wanted in [25, 23, 28] {
            assert!(matches!(
                claim(&mut taken, 24..28, Some(wanted), "GSI"),
                Err(HypervisorError::Taken { number, .. }) if number == wanted
            ));
        }
    }
}
