//! The ACPI tables a Linux guest reads to find its CPUs, its interrupt controllers, its PCI
//! root with each device's INTx line, and how to power off and reset: RSDP, XSDT, FADT, MADT
//! and DSDT, built with the rust-vmm `acpi_tables` crate.
//!
//! ACPI rather than an MP table: an MP table describes CPUs, the IO-APIC and INTx routing, but
//! gives the guest no way to power itself off. The hardware-reduced profile (as Cloud
//! Hypervisor uses) adds that with two I/O registers and no SCI, PM timer or GPE block to
//! emulate. The tables live in the legacy hole below 1 MiB, which the e820 map leaves out of
//! usable RAM, and the boot protocols pass the RSDP's address.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, PackageBuilder, Path,
    ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use luvmm_devices::pci::bus::IntxRoute;
use luvmm_devices::power::{ACPI_RESET_VALUE, S5_SLEEP_TYPE};
use luvmm_resources::layout::{
    ACPI_RESET_PORT, ACPI_SLEEP_CONTROL_PORT, ACPI_TABLES_END, ACPI_TABLES_START, PCI_CONFIG_PORT,
    PCI_IO_END, PCI_IO_START, PCI_MMIO32_END, PCI_MMIO32_START, PCI_MMIO64_END, PCI_MMIO64_START,
    SERIAL_IRQ, SERIAL_PORT_BASE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const OEM_ID: [u8; 6] = *b"LUVMM ";
const OEM_REVISION: u32 = 1;
/// Where the in-kernel LAPIC and IOAPIC decode (KVM's defaults).
const LAPIC_ADDRESS: u32 = 0xfee0_0000;
const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// FADT IA-PC boot flags: no VGA to probe, no CMOS RTC (the guest's wall clock is kvmclock's).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Tables start on 16-byte boundaries.
const TABLE_ALIGN: u64 = 16;

/// The tables could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// They need more room than the area below 1 MiB has.
    #[error("the ACPI tables need {needed} bytes, more than the {room} bytes set aside")]
    TooLarge { needed: u64, room: u64 },
    /// Guest memory refused the write (RAM does not cover the area).
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// More vCPUs than an xAPIC MADT entry can number.
    #[error("{vcpus} vCPUs: a MADT local APIC entry numbers at most 255")]
    TooManyVcpus { vcpus: u32 },
}

/// What the tables describe.
pub struct AcpiSpec<'a> {
    pub vcpus: u32,
    /// Each PCI function's INTx pin and the line it raises.
    pub intx: &'a [IntxRoute],
}

/// Writes the tables into `memory` and returns the RSDP's guest address.
pub fn write_tables(memory: &GuestMemoryMmap, spec: &AcpiSpec<'_>) -> Result<u64, AcpiError> {
    let rsdp_at = ACPI_TABLES_START;
    let xsdt_at = align(rsdp_at + Rsdp::len() as u64);
    // Two entries: the FADT and the MADT (the DSDT hangs off the FADT).
    let xsdt_len = 36 + 2 * 8;
    let fadt_at = align(xsdt_at + xsdt_len);
    let madt_at = align(fadt_at + acpi_tables::fadt::FADT::len() as u64);
    let madt = bytes_of(&madt(spec.vcpus)?);
    let dsdt_at = align(madt_at + madt.len() as u64);
    let dsdt = dsdt(spec.intx);
    let end = dsdt_at + dsdt.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_TABLES_START,
            room: ACPI_TABLES_END - ACPI_TABLES_START,
        });
    }
    let fadt = bytes_of(&fadt(dsdt_at));
    let mut xsdt = XSDT::new(OEM_ID, *b"LUVMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = bytes_of(&xsdt);
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_at));
    for (at, table) in [
        (rsdp_at, &rsdp),
        (xsdt_at, &xsdt),
        (fadt_at, &fadt),
        (madt_at, &madt),
        (dsdt_at, &dsdt),
    ] {
        memory
            .write_slice(table, GuestAddress(at))
            .map_err(AcpiError::Write)?;
    }
    Ok(rsdp_at)
}

fn align(address: u64) -> u64 {
    address.next_multiple_of(TABLE_ALIGN)
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Hardware-reduced: the sleep control and reset registers are all the power management the
/// guest gets.
fn fadt(dsdt_at: u64) -> acpi_tables::fadt::FADT {
    let register = |port: u16| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, *b"LUVMFACP", OEM_REVISION)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    fadt.sleep_control_reg = register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = register(ACPI_SLEEP_CONTROL_PORT);
    fadt.reset_reg = register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.finalize()
}

/// One local APIC per vCPU (APIC id = vCPU id, as the CPUID says) and the IOAPIC with GSIs
/// from 0: KVM routes GSI n to IOAPIC pin n, ISA IRQs included, so no override is needed.
fn madt(vcpus: u32) -> Result<MADT, AcpiError> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"LUVMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDRESS),
    );
    for id in 0..vcpus {
        let id = u8::try_from(id)
            .ok()
            .filter(|&id| id != u8::MAX)
            .ok_or(AcpiError::TooManyVcpus { vcpus })?;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IOAPIC's id follows the CPUs' (ids are one namespace on the APIC bus).
    let ioapic_id = u8::try_from(vcpus)
        .ok()
        .filter(|&id| id != u8::MAX)
        .ok_or(AcpiError::TooManyVcpus { vcpus })?;
    madt.add_structure(IoApic::new(ioapic_id, IOAPIC_ADDRESS, 0));
    Ok(madt)
}

/// The PCI root (config ports, the I/O and memory windows, the INTx routing) and `_S5_`.
fn dsdt(intx: &[IntxRoute]) -> Vec<u8> {
    let mut routes = PackageBuilder::new();
    for route in intx {
        let mut entry = PackageBuilder::new();
        // Any function of the slot; the pin as 0 = INTA#; no link device, the GSI itself.
        entry.add_element(&((u32::from(route.slot) << 16) | 0xffff));
        entry.add_element(&(route.pin - 1));
        entry.add_element(&0u8);
        entry.add_element(&u32::from(route.line));
        routes.add_element(&entry);
    }
    let io_window = AddressSpace::<u16>::new_io(
        u16::try_from(PCI_IO_START).unwrap_or(u16::MAX),
        u16::try_from(PCI_IO_END - 1).unwrap_or(u16::MAX),
        None,
    );
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(PCI_MMIO32_START).unwrap_or(u32::MAX),
        u32::try_from(PCI_MMIO32_END - 1).unwrap_or(u32::MAX),
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO64_START,
        PCI_MMIO64_END - 1,
        None,
    );
    let bus_numbers = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8);
    let resources = ResourceTemplate::new(vec![
        &bus_numbers,
        &config_ports,
        &io_window,
        &mmio32,
        &mmio64,
    ]);
    let pci = bytes_of(&Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_SEG".into(), &0u8),
            &Name::new("_BBN".into(), &0u8),
            &Name::new("_CRS".into(), &resources),
            &Name::new("_PRT".into(), &routes),
        ],
    ));
    // COM1 as an ACPI device: in the hardware-reduced profile Linux sets up no legacy PIC and
    // so no ISA interrupt of its own; the console's IRQ 4 reaches the IO-APIC only as
    // declared here (edge, active high, as ISA interrupts are).
    let com1_ports = aml::IO::new(SERIAL_PORT_BASE, SERIAL_PORT_BASE, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_resources = ResourceTemplate::new(vec![&com1_ports, &com1_irq]);
    let com1 = bytes_of(&Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_CRS".into(), &com1_resources),
        ],
    ));
    let mut s5 = PackageBuilder::new();
    for value in [S5_SLEEP_TYPE, 0, 0, 0] {
        s5.add_element(&value);
    }
    let mut body = Scope::raw(Path::new("\\_SB_"), [pci, com1].concat());
    Name::new(Path::new("_S5_"), &s5).to_aml_bytes(&mut body);
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"LUVMDSDT", OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(memory: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        memory.read_slice(&mut bytes, GuestAddress(at)).unwrap();
        bytes
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    /// Follows the RSDP to each table, checking signatures and checksums, and returns them
    /// by signature.
    fn tables(memory: &GuestMemoryMmap, rsdp_at: u64) -> Vec<([u8; 4], Vec<u8>)> {
        let rsdp = read(memory, rsdp_at, Rsdp::len());
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let table = |at: u64| {
            let header = read(memory, at, 36);
            let bytes = read(memory, at, u32_at(&header, 4) as usize);
            assert!(checksum_ok(&bytes), "checksum of {:?}", &bytes[..4]);
            (bytes[..4].try_into().unwrap(), bytes)
        };
        let (_, xsdt) = table(u64_at(&rsdp, 24));
        let mut found: Vec<([u8; 4], Vec<u8>)> = (36..xsdt.len())
            .step_by(8)
            .map(|at| table(u64_at(&xsdt, at)))
            .collect();
        let fadt = found.iter().find(|(s, _)| s == b"FACP").unwrap().1.clone();
        found.push(table(u64_at(&fadt, 140)));
        found
    }

    #[test]
    fn the_tables_chain_from_the_rsdp_with_valid_checksums() {
        let memory = memory();
        let intx = [IntxRoute {
            slot: 3,
            pin: 1,
            line: 10,
        }];
        let rsdp = write_tables(
            &memory,
            &AcpiSpec {
                vcpus: 2,
                intx: &intx,
            },
        )
        .unwrap();
        assert_eq!(rsdp, ACPI_TABLES_START);
        let tables = tables(&memory, rsdp);
        let names: Vec<&[u8; 4]> = tables.iter().map(|(s, _)| s).collect();
        assert_eq!(names, [b"FACP", b"APIC", b"DSDT"]);
        assert!(tables
            .iter()
            .all(|(_, t)| u64::try_from(t.len()).unwrap() < 4096));
    }

    #[test]
    fn the_madt_lists_each_vcpu_and_the_ioapic() {
        let bytes = bytes_of(&madt(3).unwrap());
        assert_eq!(u32_at(&bytes, 36), LAPIC_ADDRESS);
        // Three 8-byte local APIC entries, then a 12-byte IOAPIC entry with id 3.
        let entries = &bytes[44..];
        for id in 0..3u8 {
            let e = &entries[usize::from(id) * 8..][..8];
            assert_eq!((e[0], e[1], e[2], e[3], e[4]), (0, 8, id, id, 1));
        }
        let ioapic = &entries[24..36];
        assert_eq!((ioapic[0], ioapic[1], ioapic[2]), (1, 12, 3));
        assert_eq!(u32_at(ioapic, 4), IOAPIC_ADDRESS);
        assert!(matches!(
            madt(255),
            Err(AcpiError::TooManyVcpus { vcpus: 255 })
        ));
    }

    #[test]
    fn the_fadt_is_hardware_reduced_with_luvmms_power_registers() {
        let bytes = bytes_of(&fadt(0xe1000));
        let flags = u32_at(&bytes, 112);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        // Reset register (GAS at 116: I/O space, address at +4) and value (128).
        assert_eq!(bytes[116], 1);
        assert_eq!(u64_at(&bytes, 120), u64::from(ACPI_RESET_PORT));
        assert_eq!(bytes[128], ACPI_RESET_VALUE);
        // Sleep control register (GAS at 244).
        assert_eq!(u64_at(&bytes, 248), u64::from(ACPI_SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(&bytes, 140), 0xe1000);
    }

    #[test]
    fn the_dsdt_routes_each_intx_pin_and_names_s5() {
        let intx = [
            IntxRoute {
                slot: 3,
                pin: 1,
                line: 10,
            },
            IntxRoute {
                slot: 4,
                pin: 2,
                line: 11,
            },
        ];
        let bytes = dsdt(&intx);
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_PRT") && has(b"_S5_") && has(b"PCI0") && has(b"_CRS"));
        // COM1 with its ports and an extended IRQ descriptor for line 4.
        assert!(has(b"COM1"));
        assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]));
        // Slot 3's address 0x0003ffff as a DWord constant, and slot 4's pin B (1).
        assert!(has(&[0x0c, 0xff, 0xff, 0x03, 0x00]));
        assert!(has(&[0x0c, 0xff, 0xff, 0x04, 0x00, 0x01]));
        // No route, no entry.
        assert!(!dsdt(&[]).windows(3).any(|w| w == [0x0c, 0xff, 0xff]));
    }

    #[test]
    fn the_tables_need_ram_below_1_mib() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        let spec = AcpiSpec {
            vcpus: 1,
            intx: &[],
        };
        assert!(matches!(
            write_tables(&memory, &spec),
            Err(AcpiError::Write(_))
        ));
    }
}
