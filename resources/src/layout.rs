//! The guest physical layout shared by the boot path and the restore path.
//!
//! Constants describe where boot structures and devices live; [`MemoryLayout`] describes the RAM
//! regions. A saved state carries its `MemoryLayout`, and a restore compares it with the memfds it
//! was handed before it creates anything.

use serde::{Deserialize, Serialize};

/// Guest page size; regions and their sizes are multiples of it.
pub const PAGE_SIZE: u64 = 4096;

/// Start of the 32-bit MMIO hole: no RAM may sit in `[MMIO_HOLE_START, MMIO_HOLE_END)`.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// KVM's three-page TSS region (Intel needs it), placed inside the MMIO hole.
pub const KVM_TSS_ADDRESS: u64 = 0xFFFB_D000;

/// The boot GDT written by the VMM for the 64-bit Linux entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// The (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map, right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// The PVH module list (the initrd's entry), after the memory map's few entries.
pub const PVH_MODLIST_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8FF0;
/// Identity page tables for the 64-bit Linux entry: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xA000;
/// Page directory (512 x 2 MiB = the first 1 GiB).
pub const PDE_START: u64 = 0xB000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line accepted, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Top of the low RAM the e820 map reports as usable (the EBDA starts here).
pub const EBDA_START: u64 = 0x9_FC00;
/// Where the kernel image is loaded: 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The PCI 32-bit MMIO window, for BARs: from the hole's start up to the IOAPIC.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the 32-bit MMIO window.
pub const PCI_MMIO32_END: u64 = 0xFEC0_0000;
/// The PCI 64-bit MMIO window, far above any RAM luvmm lays out.
pub const PCI_MMIO64_START: u64 = 1 << 40;
/// End (exclusive) of the 64-bit MMIO window.
pub const PCI_MMIO64_END: u64 = (1 << 40) + (64 << 30);
/// PCI I/O port window.
pub const PCI_IO_START: u64 = 0x1000;
/// End (exclusive) of the I/O port window.
pub const PCI_IO_END: u64 = 0x1_0000;
/// PCI configuration mechanism #1: address at 0xCF8, data at 0xCFC.
pub const PCI_CONFIG_PORT: u16 = 0xCF8;
/// Width of the configuration port window.
pub const PCI_CONFIG_PORT_SIZE: u16 = 8;
/// First GSI for MSI routes; 0-23 are the IOAPIC pins.
pub const MSI_GSI_START: u32 = 24;

/// COM1, the guest's console.
pub const SERIAL_PORT_BASE: u16 = 0x3F8;
/// COM1 register window.
pub const SERIAL_PORT_SIZE: u16 = 8;
/// COM1 interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// The ACPI tables (RSDP first): in the legacy hole below 1 MiB, which the e820 map leaves out
/// of usable RAM, so the guest reads them in place and never reuses their pages.
pub const ACPI_TABLES_START: u64 = 0xE_0000;
/// End (exclusive) of the ACPI tables' area.
pub const ACPI_TABLES_END: u64 = HIMEM_START;
/// The FADT's sleep control register (hardware-reduced ACPI): the guest writes SLP_TYP and
/// SLP_EN here to power off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// The FADT's reset register, right after the sleep control register.
pub const ACPI_RESET_PORT: u16 = 0x3c1;
/// The i8042 command port: `0xfe` written here pulses the CPU reset line, Linux's fallback
/// reboot when ACPI's reset register is not used.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The luvmm guest-control port: a guest reads it to learn whether the VMM asked for a check,
/// and at offsets 4 and 8 the host's realtime clock.
pub const GUEST_CONTROL_PORT: u16 = 0x0600;
/// Width of the guest-control port window: the request word, the host time's two halves, and
/// room for one more word, so a guest can `ioperm` 16 ports.
pub const GUEST_CONTROL_PORT_SIZE: u16 = 16;

/// One guest RAM region: `size` bytes at guest physical address `gpa`, backed by its own memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegion {
    /// Guest physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
}

impl GuestRegion {
    /// End address (exclusive). Callers validate first, so this cannot overflow.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Whether `[gpa, end)` and `other` share any byte.
    pub fn overlaps(&self, other: &GuestRegion) -> bool {
        self.gpa < other.end() && other.gpa < self.end()
    }
}

/// The RAM layout of a VM, in guest-physical order. Region `i` is backed by memfd `i`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// RAM regions, sorted by `gpa`.
    pub regions: Vec<GuestRegion>,
}

impl MemoryLayout {
    /// Sum of all region sizes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Lays `bytes` of RAM out from GPA 0, skipping the MMIO hole: one region below it, and
    /// the rest from 4 GiB up.
    pub fn contiguous(bytes: u64) -> MemoryLayout {
        let low = bytes.min(MMIO_HOLE_START);
        let mut regions = vec![GuestRegion { gpa: 0, size: low }];
        if bytes > low {
            regions.push(GuestRegion {
                gpa: MMIO_HOLE_END,
                size: bytes - low,
            });
        }
        MemoryLayout { regions }
    }

    /// Usable RAM ranges as the guest should see them in its e820 or PVH memory map: the
    /// legacy hole between the EBDA and 1 MiB is left out of the first region.
    pub fn usable_ranges(&self) -> Vec<GuestRegion> {
        let mut ranges = Vec::with_capacity(self.regions.len() + 1);
        for region in &self.regions {
            if region.gpa == 0 && region.size > HIMEM_START {
                ranges.push(GuestRegion {
                    gpa: 0,
                    size: EBDA_START,
                });
                ranges.push(GuestRegion {
                    gpa: HIMEM_START,
                    size: region.size - HIMEM_START,
                });
            } else {
                ranges.push(*region);
            }
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn contiguous_layout_skips_the_mmio_hole() {
        let small = MemoryLayout::contiguous(64 * MIB);
        assert_eq!(
            small.regions,
            vec![GuestRegion {
                gpa: 0,
                size: 64 * MIB
            }]
        );

        let big = MemoryLayout::contiguous(4 * GIB);
        assert_eq!(
            big.regions,
            vec![
                GuestRegion {
                    gpa: 0,
                    size: 3 * GIB
                },
                GuestRegion {
                    gpa: 4 * GIB,
                    size: GIB
                },
            ]
        );
        assert_eq!(big.total_bytes(), 4 * GIB);
    }

    #[test]
    fn usable_ranges_leave_out_the_legacy_hole() {
        let layout = MemoryLayout::contiguous(64 * MIB);
        assert_eq!(
            layout.usable_ranges(),
            vec![
                GuestRegion {
                    gpa: 0,
                    size: EBDA_START
                },
                GuestRegion {
                    gpa: HIMEM_START,
                    size: 63 * MIB
                },
            ]
        );
    }

    #[test]
    fn layout_round_trips_through_json_and_compares() {
        let layout = MemoryLayout::contiguous(5 * GIB);
        let text = serde_json::to_string(&layout).unwrap();
        let back: MemoryLayout = serde_json::from_str(&text).unwrap();
        assert_eq!(back, layout);
        assert_ne!(back, MemoryLayout::contiguous(4 * GIB));
    }

    #[test]
    fn overlap_is_exclusive_at_the_end() {
        let a = GuestRegion {
            gpa: 0,
            size: 0x1000,
        };
        let b = GuestRegion {
            gpa: 0x1000,
            size: 0x1000,
        };
        let c = GuestRegion {
            gpa: 0xFFF,
            size: 2,
        };
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&c) && b.overlaps(&c));
    }
}
