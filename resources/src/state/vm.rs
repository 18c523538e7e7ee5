//! The typed root of a saved VM and the state of each component.
//!
//! Every type here is plain data: no fds, no pointers. Live handles are passed to the restore
//! functions separately.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use crate::config::BarMode;
use crate::layout::{MemoryLayout, MMIO_HOLE_END, MMIO_HOLE_START};

/// Everything needed to rebuild a paused VM on top of its own memfds.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Which luvmm wrote it, for error messages and drills.
    pub producer: String,
    /// The RAM layout; region `i` is memfd `i`.
    pub memory: MemoryLayout,
    /// VM-wide KVM state.
    pub vm: KvmVmState,
    /// One entry per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Emulated devices.
    pub devices: DevicesState,
    /// Set when the state was saved for a host live update: what is in the LUO session.
    #[serde(default)]
    pub update: Option<UpdateRecord>,
    /// Guest RAM asked for transparent huge pages (format 1.4); a restore asks again.
    #[serde(default)]
    pub memory_thp: bool,
}

/// LUO tokens in a VM's session: the state memfd, then one per RAM memfd, then one per
/// passthrough device (which only a kernel with a VFIO handler preserves).
pub const STATE_TOKEN: u64 = 0x5;
/// RAM memfd `i` is preserved under `RAM_TOKEN_BASE + i`.
pub const RAM_TOKEN_BASE: u64 = 0x100;
/// Passthrough device `i` (state order) under `DEVICE_TOKEN_BASE + i`.
pub const DEVICE_TOKEN_BASE: u64 = 0x200;

/// What a VM saved for a live update put in its LUO session, and when each phase began.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub vm_id: String,
    /// Per passthrough device, in state order: its token if the kernel preserved it, `None`
    /// if it had no handler for it (then the device is opened again after the kexec).
    pub device_tokens: Vec<Option<u64>>,
    /// Wall-clock ms since the Unix epoch at which each phase began.
    pub times_ms: std::collections::BTreeMap<String, u64>,
}

/// VM-wide KVM state: the in-kernel interrupt controllers, the PIT and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    /// 8259 master (`KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: kvm_irqchip,
    /// 8259 slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock; restored so the guest's clock does not jump back.
    pub clock: kvm_clock_data,
}

/// The architectural state of one vCPU, as KVM reports it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU id (also its APIC id).
    pub id: u32,
    /// CPUID the guest saw; restored as is so the guest's view does not change under it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM would save for this vCPU.
    pub msrs: Vec<kvm_msr_entry>,
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87, SSE and extended state (the legacy XSAVE area holds the FPU).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC registers, including its timer.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// Running, halted or waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// TSC frequency in kHz, when KVM reports one.
    pub tsc_khz: Option<u32>,
    /// The TSC's offset from the host's (`KVM_VCPU_TSC_OFFSET`), where KVM gives it and the
    /// TSC ran unscaled: with the kvmclock's host TSC stamp it lets a restore move the guest's
    /// TSC on over the pause exactly (format 1.5).
    #[serde(default)]
    pub tsc_offset: Option<u64>,
    /// MSRs on KVM's save list that this vCPU refused to read, by name: their values are not
    /// in `msrs` and the restored vCPU keeps KVM's defaults for them (format 1.2).
    #[serde(default)]
    pub unreadable_msrs: Vec<String>,
}

/// COM1 registers: the fields of vm-superio's `SerialState`, kept here as serde data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The guest-control port: the requests still waiting for the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestControlState {
    /// A check was requested and the guest has not read it yet.
    pub check_pending: bool,
    /// The other requests waiting, one bit each (the port word without the check bit).
    #[serde(default)]
    pub requests: u32,
}

/// State of the devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialRegisters,
    /// The guest-control port.
    #[serde(default)]
    pub guest_control: GuestControlState,
    /// Passed-through PCI functions, in guest slot order.
    #[serde(default)]
    pub passthrough: Vec<PassthroughState>,
    /// The VM's IOMMU context, shared by its iommufd devices.
    #[serde(default)]
    pub iommu: Option<IommuState>,
}

/// The one iommufd IOAS a VM's devices share: its id in the iommufd, the HWPTs over it that
/// devices are attached to, and what is mapped in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuState {
    pub ioas_id: u32,
    pub hwpts: Vec<u32>,
    pub mappings: Vec<DmaMapping>,
}

/// How a passthrough device was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VfioBackend {
    /// `/dev/vfio/devices/vfioN` bound to an iommufd, DMA through an IOAS.
    IommufdCdev,
    /// An IOMMU group in a legacy type1 container, DMA mapped by address.
    LegacyContainer,
}

/// One IOAS mapping: guest RAM region `memfd_index` from `offset`, `len` bytes at `iova`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaMapping {
    pub iova: u64,
    pub memfd_index: usize,
    pub offset: u64,
    pub len: u64,
}

/// The emulated MSI capability: where it is and the route behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiState {
    /// Capability offset in configuration space.
    pub offset: usize,
    pub enabled: bool,
    pub gsi: u32,
}

/// The emulated MSI-X capability and the guest's vector table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// Capability offset in configuration space.
    pub offset: usize,
    pub enabled: bool,
    /// Four dwords per vector: address low, address high, data, vector control.
    pub table: Vec<u32>,
    /// GSI of each vector, once enabled.
    pub gsis: Vec<u32>,
}

/// The INTx line the device was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntxState {
    pub line: u32,
    pub enabled: bool,
}

/// What a passthrough device needs to be put back as the guest left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassthroughState {
    /// Host PCI address.
    pub bdf: String,
    /// Guest slot on bus 0.
    pub guest_slot: u8,
    pub backend: VfioBackend,
    pub mappings: Vec<DmaMapping>,
    /// The guest-visible configuration space (BARs as the guest programmed them, command,
    /// MSI capability contents), 256 bytes.
    pub config: Vec<u8>,
    pub msi: Option<MsiState>,
    #[serde(default)]
    pub msix: Option<MsixState>,
    #[serde(default)]
    pub intx: Option<IntxState>,
    /// The HWPT an iommufd device is attached to.
    #[serde(default)]
    pub hwpt_id: Option<u32>,
    /// Whether its BARs were mapped into the guest or trapped.
    #[serde(default)]
    pub bar_access: BarMode,
}

/// A decoded state that does not fit what it is being restored onto.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateMismatch {
    /// The state holds no vCPU.
    #[error("state has no vCPUs")]
    NoVcpus,
    /// vCPU ids are not 0, 1, 2, ... in order.
    #[error("state vCPU #{index} has id {id}")]
    VcpuId { index: usize, id: u32 },
    /// The layout itself is inconsistent (unsorted, overlapping, empty or in the MMIO hole).
    #[error("state memory layout is invalid at region {index}")]
    BadLayout { index: usize },
    /// A different number of memfds than regions.
    #[error("state has {in_state} memory regions but {given} memfds were given")]
    RegionCount { in_state: usize, given: usize },
    /// A memfd's size differs from its region.
    #[error("memory region {index}: state says {in_state:#x} bytes, memfd has {given:#x}")]
    RegionSize {
        index: usize,
        in_state: u64,
        given: u64,
    },
    /// A DMA mapping names a memfd the state does not have, or reaches past its end.
    #[error("passthrough {bdf}: DMA mapping {mapping} (memfd {memfd_index}, offset {offset:#x}, {len:#x} bytes) is not inside guest RAM")]
    DmaOutsideRam {
        bdf: String,
        mapping: usize,
        memfd_index: usize,
        offset: u64,
        len: u64,
    },
    /// A device's configuration space is not 256 bytes.
    #[error("passthrough {bdf}: configuration space is {len} bytes, not {PCI_CONFIG_SPACE_LEN}")]
    ConfigSpaceLength { bdf: String, len: usize },
    /// An iommufd device is not attached to a HWPT of the VM's IOMMU context.
    #[error("passthrough {bdf}: no HWPT of the VM's IOAS holds it")]
    NoHwpt { bdf: String },
    /// Two devices claim one guest slot, GSI or INTx line, or one host device appears twice.
    #[error("passthrough {bdf}: {what} {value} is used twice")]
    Duplicate {
        bdf: String,
        what: &'static str,
        value: String,
    },
}

/// Checks a RAM layout against itself (sorted, no empty region, none in the MMIO hole) and
/// against the sizes of the memfds it will be mapped from. Runs before any KVM object exists.
pub fn check_layout(layout: &MemoryLayout, memfd_sizes: &[u64]) -> Result<(), StateMismatch> {
    let regions = &layout.regions;
    for (index, region) in regions.iter().enumerate() {
        let sorted = index == 0 || regions[index - 1].end() <= region.gpa;
        let in_hole = region.gpa < MMIO_HOLE_END && region.end() > MMIO_HOLE_START;
        if region.size == 0 || region.gpa.checked_add(region.size).is_none() || !sorted || in_hole {
            return Err(StateMismatch::BadLayout { index });
        }
    }
    if regions.len() != memfd_sizes.len() {
        return Err(StateMismatch::RegionCount {
            in_state: regions.len(),
            given: memfd_sizes.len(),
        });
    }
    for (index, (region, &given)) in regions.iter().zip(memfd_sizes).enumerate() {
        if region.size != given {
            return Err(StateMismatch::RegionSize {
                index,
                in_state: region.size,
                given,
            });
        }
    }
    Ok(())
}

/// A type-0 configuration space as the state keeps it.
pub const PCI_CONFIG_SPACE_LEN: usize = 256;

impl VmState {
    /// Checks the state against itself and against the sizes of the memfds it will be
    /// restored onto. Runs before any KVM object exists.
    pub fn check_against(&self, memfd_sizes: &[u64]) -> Result<(), StateMismatch> {
        if self.vcpus.is_empty() {
            return Err(StateMismatch::NoVcpus);
        }
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            if vcpu.id as usize != index {
                return Err(StateMismatch::VcpuId { index, id: vcpu.id });
            }
        }
        check_layout(&self.memory, memfd_sizes)?;
        self.check_passthrough()
    }

    /// Each passthrough entry must fit the layout: mappings inside a region's memfd, a whole
    /// configuration space, and no slot or host device twice.
    fn check_passthrough(&self) -> Result<(), StateMismatch> {
        let regions = &self.memory.regions;
        let devices = &self.devices.passthrough;
        for (index, device) in devices.iter().enumerate() {
            let bdf = || device.bdf.clone();
            for (mapping, m) in device.mappings.iter().enumerate() {
                let inside = regions.get(m.memfd_index).is_some_and(|r| {
                    m.len > 0 && m.offset.checked_add(m.len).is_some_and(|end| end <= r.size)
                });
                if !inside {
                    return Err(StateMismatch::DmaOutsideRam {
                        bdf: bdf(),
                        mapping,
                        memfd_index: m.memfd_index,
                        offset: m.offset,
                        len: m.len,
                    });
                }
            }
            if device.config.len() != PCI_CONFIG_SPACE_LEN {
                return Err(StateMismatch::ConfigSpaceLength {
                    bdf: bdf(),
                    len: device.config.len(),
                });
            }
            let earlier = &devices[..index];
            if earlier.iter().any(|d| d.guest_slot == device.guest_slot) {
                return Err(StateMismatch::Duplicate {
                    bdf: bdf(),
                    what: "guest slot",
                    value: device.guest_slot.to_string(),
                });
            }
            if earlier.iter().any(|d| d.bdf == device.bdf) {
                return Err(StateMismatch::Duplicate {
                    bdf: bdf(),
                    what: "host device",
                    value: device.bdf.clone(),
                });
            }
            if device.backend == VfioBackend::IommufdCdev {
                let attached = self.devices.iommu.as_ref().is_some_and(|iommu| {
                    device
                        .hwpt_id
                        .is_some_and(|hwpt| iommu.hwpts.contains(&hwpt))
                });
                if !attached {
                    return Err(StateMismatch::NoHwpt { bdf: bdf() });
                }
            }
        }
        // The guest programmed these numbers: each must mean one thing.
        let mut seen: Vec<(&'static str, u32)> = Vec::new();
        for device in devices {
            let msi = device.msi.iter().map(|m| ("GSI", m.gsi));
            let msix = device
                .msix
                .iter()
                .flat_map(|m| m.gsis.iter().map(|&g| ("GSI", g)));
            let intx = device.intx.iter().map(|i| ("INTx line", i.line));
            for (what, number) in msi.chain(msix).chain(intx) {
                if seen.contains(&(what, number)) {
                    return Err(StateMismatch::Duplicate {
                        bdf: device.bdf.clone(),
                        what,
                        value: number.to_string(),
                    });
                }
                seen.push((what, number));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::GuestRegion;
    use crate::state::{decode, encode};

    const MIB: u64 = 1 << 20;

    fn vcpu(id: u32) -> VcpuState {
        let regs = kvm_regs {
            rip: 0x10_0000 + u64::from(id),
            ..Default::default()
        };
        let mut xsave = kvm_xsave::default();
        xsave.region[7] = 0xdead_beef;
        VcpuState {
            id,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f0,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            }],
            regs,
            sregs: kvm_sregs::default(),
            xsave,
            xcrs: kvm_xcrs::default(),
            lapic: kvm_lapic_state::default(),
            vcpu_events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            debug_regs: kvm_debugregs::default(),
            tsc_khz: Some(2_000_000),
            tsc_offset: Some(5u64.wrapping_neg()),
            unreadable_msrs: vec!["MSR_IA32_TSX_CTRL (0x122)".into()],
        }
    }

    fn state() -> VmState {
        VmState {
            producer: "luvmm test".into(),
            memory: MemoryLayout::contiguous(64 * MIB),
            vm: KvmVmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data {
                    clock: 42,
                    ..Default::default()
                },
            },
            vcpus: vec![vcpu(0), vcpu(1)],
            devices: DevicesState {
                serial: SerialRegisters {
                    line_control: 3,
                    in_buffer: vec![b'a'],
                    ..Default::default()
                },
                guest_control: GuestControlState {
                    check_pending: true,
                    requests: 0b10,
                },
                passthrough: vec![PassthroughState {
                    bdf: "0000:00:03.0".into(),
                    guest_slot: 1,
                    backend: VfioBackend::IommufdCdev,
                    mappings: vec![DmaMapping {
                        iova: 0,
                        memfd_index: 0,
                        offset: 0,
                        len: 64 * MIB,
                    }],
                    config: vec![0x34; 256],
                    msi: Some(MsiState {
                        offset: 0x40,
                        enabled: true,
                        gsi: 24,
                    }),
                    msix: None,
                    intx: Some(IntxState {
                        line: 16,
                        enabled: false,
                    }),
                    hwpt_id: Some(3),
                    bar_access: BarMode::Trapped,
                }],
                iommu: Some(IommuState {
                    ioas_id: 1,
                    hwpts: vec![3],
                    mappings: vec![DmaMapping {
                        iova: 0,
                        memfd_index: 0,
                        offset: 0,
                        len: 64 * MIB,
                    }],
                }),
            },
            memory_thp: false,
            update: Some(UpdateRecord {
                vm_id: "vm1".into(),
                device_tokens: vec![None],
                times_ms: [("paused".to_string(), 7)].into(),
            }),
        }
    }

    #[test]
    fn vm_state_round_trips_through_the_container() {
        let original = state();
        let back: VmState = decode(&encode(&original).unwrap()).unwrap();
        assert_eq!(back.memory, original.memory);
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vcpus[1].regs.rip, 0x10_0001);
        assert_eq!(back.vcpus[0].xsave.region[7], 0xdead_beef);
        assert_eq!(back.update, original.update);
        assert_eq!(back.vcpus[0].cpuid[0].eax, 0x806f0);
        assert_eq!(back.vcpus[0].msrs[0].data, 12345);
        assert_eq!(back.vcpus[0].tsc_khz, Some(2_000_000));
        assert_eq!(back.vcpus[0].tsc_offset, Some(5u64.wrapping_neg()));
        assert_eq!(back.vm.clock.clock, 42);
        assert_eq!(back.devices, original.devices);
    }

    #[test]
    fn matching_memfds_pass() {
        assert_eq!(state().check_against(&[64 * MIB]), Ok(()));
    }

    #[test]
    fn layout_mismatch_is_refused() {
        assert_eq!(
            state().check_against(&[64 * MIB, MIB]),
            Err(StateMismatch::RegionCount {
                in_state: 1,
                given: 2
            })
        );
        assert_eq!(
            state().check_against(&[32 * MIB]),
            Err(StateMismatch::RegionSize {
                index: 0,
                in_state: 64 * MIB,
                given: 32 * MIB
            })
        );
    }

    #[test]
    fn inconsistent_states_are_refused() {
        let mut no_vcpus = state();
        no_vcpus.vcpus.clear();
        assert_eq!(
            no_vcpus.check_against(&[64 * MIB]),
            Err(StateMismatch::NoVcpus)
        );

        let mut swapped = state();
        swapped.vcpus.swap(0, 1);
        assert_eq!(
            swapped.check_against(&[64 * MIB]),
            Err(StateMismatch::VcpuId { index: 0, id: 1 })
        );

        let mut in_hole = state();
        in_hole.memory.regions.push(GuestRegion {
            gpa: MMIO_HOLE_START,
            size: MIB,
        });
        assert_eq!(
            in_hole.check_against(&[64 * MIB, MIB]),
            Err(StateMismatch::BadLayout { index: 1 })
        );
    }

    #[test]
    fn passthrough_entries_must_fit_the_layout() {
        let with = |change: fn(&mut VmState)| {
            let mut s = state();
            change(&mut s);
            s.check_against(&[64 * MIB])
        };
        let outside = |memfd_index, offset, len| StateMismatch::DmaOutsideRam {
            bdf: "0000:00:03.0".into(),
            mapping: 0,
            memfd_index,
            offset,
            len,
        };
        assert_eq!(
            with(|s| s.devices.passthrough[0].mappings[0].memfd_index = 1),
            Err(outside(1, 0, 64 * MIB))
        );
        assert_eq!(
            with(|s| s.devices.passthrough[0].mappings[0].offset = 4096),
            Err(outside(0, 4096, 64 * MIB))
        );
        assert_eq!(
            with(|s| s.devices.passthrough[0].mappings[0].offset = u64::MAX),
            Err(outside(0, u64::MAX, 64 * MIB))
        );
        assert_eq!(
            with(|s| s.devices.passthrough[0].mappings[0].len = 0),
            Err(outside(0, 0, 0))
        );
        assert_eq!(
            with(|s| s.devices.passthrough[0].config.truncate(64)),
            Err(StateMismatch::ConfigSpaceLength {
                bdf: "0000:00:03.0".into(),
                len: 64
            })
        );
        let twice = |change: fn(&mut PassthroughState)| {
            let mut s = state();
            let mut other = s.devices.passthrough[0].clone();
            change(&mut other);
            s.devices.passthrough.push(other);
            s.check_against(&[64 * MIB])
        };
        assert_eq!(
            twice(|d| d.bdf = "0000:00:04.0".into()),
            Err(StateMismatch::Duplicate {
                bdf: "0000:00:04.0".into(),
                what: "guest slot",
                value: "1".into()
            })
        );
        assert_eq!(
            twice(|d| d.guest_slot = 2),
            Err(StateMismatch::Duplicate {
                bdf: "0000:00:03.0".into(),
                what: "host device",
                value: "0000:00:03.0".into()
            })
        );
        fn elsewhere(d: &mut PassthroughState) {
            d.guest_slot = 2;
            d.bdf = "0000:00:04.0".into();
            d.intx = None;
            d.msi = Some(MsiState {
                offset: 0x40,
                enabled: false,
                gsi: 25,
            });
        }
        assert_eq!(twice(elsewhere), Ok(()));
        let duplicate = |what: &'static str, value: &str| {
            Err(StateMismatch::Duplicate {
                bdf: "0000:00:04.0".into(),
                what,
                value: value.into(),
            })
        };
        assert_eq!(
            twice(|d| {
                elsewhere(d);
                d.msi = None;
                d.msix = Some(MsixState {
                    offset: 0x50,
                    enabled: true,
                    table: Vec::new(),
                    gsis: vec![26, 24],
                });
            }),
            duplicate("GSI", "24")
        );
        assert_eq!(
            twice(|d| {
                elsewhere(d);
                d.intx = Some(IntxState {
                    line: 16,
                    enabled: true,
                });
            }),
            duplicate("INTx line", "16")
        );
        let nowhere = StateMismatch::NoHwpt {
            bdf: "0000:00:03.0".into(),
        };
        assert_eq!(with(|s| s.devices.iommu = None), Err(nowhere.clone()));
        assert_eq!(
            with(|s| s.devices.passthrough[0].hwpt_id = Some(9)),
            Err(nowhere)
        );
        assert_eq!(
            with(|s| {
                s.devices.iommu = None;
                s.devices.passthrough[0].backend = VfioBackend::LegacyContainer;
            }),
            Ok(())
        );
    }
}
