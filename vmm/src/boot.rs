//! Loading a guest ELF and preparing the boot vCPU for one of the two standard entries.
//!
//! - 64-bit Linux boot protocol (as Firecracker enters a vmlinux): the VMM writes `boot_params`
//!   with an e820 map, identity page tables for the first 1 GiB and a flat GDT, and starts the
//!   vCPU in long mode at the ELF entry with RSI pointing at `boot_params`.
//! - PVH (as Cloud Hypervisor prefers when the ELF has the note): the VMM writes
//!   `hvm_start_info` and a memory map and starts the vCPU in 32-bit protected mode, paging off,
//!   at the note's entry with EBX pointing at the start info.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use luvmm_resources::config::BootProtocol;
use luvmm_resources::layout::{
    MemoryLayout, ACPI_TABLES_START, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER,
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PAGE_SIZE, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Where a bzImage's setup header keeps the "HdrS" magic.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// The 64-bit entry's offset in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT for the 64-bit entry: null, 64-bit code, data, TSS.
const GDT_LONG_MODE: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// GDT for the PVH entry: null, 32-bit code, data, TSS.
const GDT_PVH: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Why the payload could not be prepared for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The payload file cannot be opened.
    #[error("cannot open payload {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the ELF.
    #[error("cannot load payload {path}")]
    Load {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The ELF's segments reach past guest RAM.
    #[error(
        "payload {path} does not fit in guest RAM: its segments reach {end_mib} MiB, the VM \
         has {ram_mib} MiB (give it more with --memory-mib)"
    )]
    DoesNotFit {
        path: String,
        end_mib: u64,
        ram_mib: u64,
    },
    /// PVH was asked for but the ELF has no PVH entry note.
    #[error("payload {path} has no PVH entry note; use boot \"linux64\" or \"auto\"")]
    NoPvhEntry { path: String },
    /// The initrd cannot be opened.
    #[error("cannot open initrd {path}")]
    InitrdOpen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of the first RAM region.
    #[error("initrd {path} ({size} bytes) does not fit: {room} bytes of RAM between the kernel and the MMIO hole (give the VM more memory)")]
    InitrdDoesNotFit { path: String, size: u64, room: u64 },
    /// The command line is not acceptable to linux-loader.
    #[error("cmdline")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// linux-loader could not copy the command line into guest memory.
    #[error("cannot write command line into guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// linux-loader could not write `boot_params` or `hvm_start_info`.
    #[error("cannot write {what} into guest memory")]
    WriteBootParams {
        what: &'static str,
        #[source]
        source: linux_loader::configurator::Error,
    },
    /// Writing page tables or descriptor tables into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit Linux boot protocol at this address.
    Linux64(u64),
    /// PVH 32-bit entry at this address.
    Pvh(u64),
}

impl std::fmt::Display for BootEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootEntry::Linux64(at) => write!(f, "the 64-bit Linux entry at {at:#x}"),
            BootEntry::Pvh(at) => write!(f, "the PVH entry at {at:#x}"),
        }
    }
}

/// What the guest boots.
#[derive(Clone, Copy, Debug)]
pub struct BootSource<'a> {
    /// An ELF (a `vmlinux`, or luvmm's test payload) or a `bzImage`.
    pub kernel: &'a Path,
    /// An initramfs, loaded high in the first RAM region.
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub protocol: BootProtocol,
}

/// Where the initrd landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InitrdPlace {
    address: u64,
    size: u64,
}

/// Where an ELF payload's loadable segments lie in guest memory (the lowest `p_paddr` and
/// the highest `p_paddr + p_memsz`), from its program headers; `None` when they cannot be read,
/// for the loader to say why.
fn elf_load_span(file: &mut File) -> Option<(u64, u64)> {
    use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::ByteValued;

    let mut header = Elf64_Ehdr::default();
    file.rewind().ok()?;
    file.read_exact(header.as_mut_slice()).ok()?;
    file.seek(SeekFrom::Start(header.e_phoff)).ok()?;
    let mut span: Option<(u64, u64)> = None;
    for _ in 0..header.e_phnum {
        let mut segment = Elf64_Phdr::default();
        file.read_exact(segment.as_mut_slice()).ok()?;
        if segment.p_type != PT_LOAD || segment.p_filesz == 0 {
            continue;
        }
        let start = segment.p_paddr;
        let end = start.checked_add(segment.p_memsz)?;
        span = Some(span.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
    }
    span
}

/// Loads the kernel and the initrd and writes the boot structures for the chosen protocol,
/// with the ACPI tables' RSDP (written later, once the devices are known) at
/// [`ACPI_TABLES_START`].
pub fn load_payload(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    source: &BootSource<'_>,
) -> Result<BootEntry, BootError> {
    let shown = source.kernel.display().to_string();
    let mut file = File::open(source.kernel).map_err(|source| BootError::Open {
        path: shown.clone(),
        source,
    })?;
    let bzimage = is_bzimage(&mut file).map_err(|source| BootError::Open {
        path: shown.clone(),
        source,
    })?;
    let load_error = |source| BootError::Load {
        path: shown.clone(),
        source,
    };
    let (loaded, entry) = if bzimage {
        let loaded = BzImage::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_error)?;
        if source.protocol == BootProtocol::Pvh {
            return Err(BootError::NoPvhEntry { path: shown });
        }
        // The 64-bit entry sits 0x200 bytes into the protected-mode kernel.
        let entry = BootEntry::Linux64(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY);
        (loaded, entry)
    } else {
        if let Some((start, end)) = elf_load_span(&mut file) {
            let fits = end
                .checked_sub(start)
                .and_then(|len| usize::try_from(len).ok())
                .is_some_and(|len| memory.check_range(GuestAddress(start), len));
            if !fits {
                return Err(BootError::DoesNotFit {
                    path: shown,
                    end_mib: end.div_ceil(1 << 20),
                    ram_mib: layout.total_bytes() >> 20,
                });
            }
        }
        let loaded = Elf::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_error)?;
        let pvh = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
            _ => None,
        };
        let entry = match (source.protocol, pvh) {
            (BootProtocol::Pvh, None) => return Err(BootError::NoPvhEntry { path: shown }),
            (BootProtocol::Pvh | BootProtocol::Auto, Some(addr)) => BootEntry::Pvh(addr),
            (BootProtocol::Linux64 | BootProtocol::Auto, _) => {
                BootEntry::Linux64(loaded.kernel_load.0)
            }
        };
        (loaded, entry)
    };

    let mut line = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !source.cmdline.is_empty() {
        line.insert_str(source.cmdline)
            .map_err(BootError::Cmdline)?;
    }
    load_cmdline(memory, GuestAddress(CMDLINE_START), &line).map_err(BootError::WriteCmdline)?;
    // `line` refused anything longer than CMDLINE_MAX_SIZE, so this always fits.
    let cmdline_size = u32::try_from(source.cmdline.len() + 1).unwrap_or(u32::MAX);

    let initrd = match source.initrd {
        Some(path) => {
            let highest = loaded
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&max| max != 0);
            Some(load_initrd(
                memory,
                layout,
                path,
                loaded.kernel_end,
                highest,
            )?)
        }
        None => None,
    };
    match entry {
        BootEntry::Linux64(_) => {
            write_zero_page(memory, layout, cmdline_size, loaded.setup_header, initrd)?;
            write_long_mode_tables(memory)?;
        }
        BootEntry::Pvh(_) => {
            write_start_info(memory, layout, initrd)?;
            write_gdt(memory, &GDT_PVH)?;
        }
    }
    Ok(entry)
}

/// A bzImage carries the boot protocol's "HdrS" magic at 0x202; an ELF starts with its own.
fn is_bzimage(file: &mut File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    let found = match file.read_exact(&mut magic) {
        Ok(()) => u32::from_le_bytes(magic) == KERNEL_HDR_MAGIC,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(0))?;
    Ok(found)
}

/// Copies the initrd to the top of the first RAM region (below `highest`, the kernel's
/// `initrd_addr_max`, when it states one), page aligned and above the kernel's end.
fn load_initrd(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    kernel_end: u64,
    highest: Option<u64>,
) -> Result<InitrdPlace, BootError> {
    let shown = path.display().to_string();
    let open_error = |source| BootError::InitrdOpen {
        path: shown.clone(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    let size = file.metadata().map_err(open_error)?.len();
    let top = layout
        .regions
        .first()
        .map_or(0, |r| r.end())
        .min(highest.map_or(u64::MAX, |h| h.saturating_add(1)));
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    let address = top.saturating_sub(size) & !(PAGE_SIZE - 1);
    let fits = size != 0 && top >= size && address >= floor;
    let count =
        usize::try_from(size)
            .ok()
            .filter(|_| fits)
            .ok_or_else(|| BootError::InitrdDoesNotFit {
                path: shown.clone(),
                size,
                room: top.saturating_sub(floor),
            })?;
    memory
        .read_exact_volatile_from(GuestAddress(address), &mut file, count)
        .map_err(|source| BootError::Write {
            what: "initrd",
            source,
        })?;
    Ok(InitrdPlace { address, size })
}

/// The command line's guest address as `boot_params` holds it.
#[allow(clippy::cast_possible_truncation)] // Exact: the assert checks it at compile time.
const CMDLINE_PTR: u32 = {
    assert!(CMDLINE_START <= u32::MAX as u64);
    CMDLINE_START as u32
};

/// The IDT's limit: one (empty) 8-byte gate.
const IDT_LIMIT: u16 = 7;

fn write_zero_page(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    cmdline_size: u32,
    header: Option<setup_header>,
    initrd: Option<InitrdPlace>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    // A bzImage's own header says what it supports; the loader fills in the rest.
    if let Some(header) = header {
        params.hdr = header;
    }
    if let Some(initrd) = initrd {
        // Below 4 GiB by construction (the first region ends at the MMIO hole).
        params.hdr.ramdisk_image = u32::try_from(initrd.address).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
    }
    params.acpi_rsdp_addr = ACPI_TABLES_START;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_PTR;
    params.hdr.cmdline_size = cmdline_size;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    let ranges = layout.usable_ranges();
    for (slot, range) in params.e820_table.iter_mut().zip(&ranges) {
        *slot = boot_e820_entry {
            addr: range.gpa,
            size: range.size,
            r#type: E820_RAM,
        };
    }
    // The table has 128 slots, so the count always fits its byte.
    params.e820_entries =
        u8::try_from(ranges.len().min(params.e820_table.len())).unwrap_or(u8::MAX);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        memory,
    )
    .map_err(|source| BootError::WriteBootParams {
        what: "boot_params",
        source,
    })
}

fn write_start_info(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    initrd: Option<InitrdPlace>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .usable_ranges()
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.gpa,
            size: r.size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(u32::MAX),
        rsdp_paddr: ACPI_TABLES_START,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.address,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, memory).map_err(|source| {
        BootError::WriteBootParams {
            what: "hvm_start_info",
            source,
        }
    })
}

/// Identity-maps the first 1 GiB with 2 MiB pages and writes the long-mode GDT.
fn write_long_mode_tables(memory: &GuestMemoryMmap) -> Result<(), BootError> {
    let write = |value: u64, addr: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(|source| BootError::Write {
                what: "page tables",
                source,
            })
    };
    write(PDPTE_START | 0x03, PML4_START)?;
    write(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        write((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    write_gdt(memory, &GDT_LONG_MODE)
}

fn write_gdt(memory: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), BootError> {
    for (i, entry) in gdt.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(BOOT_GDT_START + (i as u64) * 8))
            .map_err(|source| BootError::Write {
                what: "GDT",
                source,
            })?;
    }
    memory
        .write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| BootError::Write {
            what: "IDT",
            source,
        })
}

/// General purpose registers at the entry.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootEntry::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Adjusts the vCPU's special registers (as read from KVM) for the entry.
pub fn set_boot_sregs(sregs: &mut kvm_sregs, entry: BootEntry) {
    let gdt: &[u64] = match entry {
        BootEntry::Linux64(_) => &GDT_LONG_MODE,
        BootEntry::Pvh(_) => &GDT_PVH,
    };
    sregs.gdt.base = BOOT_GDT_START;
    // Four descriptors: the limit is 31.
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(gdt) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = IDT_LIMIT;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    match entry {
        BootEntry::Linux64(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// Packs a GDT descriptor from flags (access byte in bits 0..8, G/DB/L/AVL in 12..16), base and
/// limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// Unpacks a GDT descriptor into the form KVM takes.
fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let limit = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // A descriptor's limit has 20 bits; scaled by 4 KiB it still fits 32.
        limit: u32::try_from(if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        })
        .unwrap_or(u32::MAX),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from((entry >> 47) & 1 == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luvmm_resources::errors::error_chain;

    fn small_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x400)]).unwrap()
    }

    #[test]
    fn a_payload_that_is_not_elf_keeps_the_loader_error_as_its_source() {
        let path = std::env::temp_dir().join(format!("luvmm-not-elf-{}", std::process::id()));
        std::fs::write(&path, b"not an ELF").unwrap();
        let layout = MemoryLayout::contiguous(0x400);
        let source = BootSource {
            kernel: &path,
            initrd: None,
            cmdline: "",
            protocol: BootProtocol::Auto,
        };
        let err = load_payload(&small_memory(), &layout, &source);
        std::fs::remove_file(&path).unwrap();
        let err = err.unwrap_err();
        assert!(matches!(err, BootError::Load { .. }));
        let shown = format!("cannot load payload {}", path.display());
        assert_eq!(err.to_string(), shown);
        assert!(error_chain(&err).starts_with(&format!("{shown}: Kernel Loader: ")));
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("luvmm-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn the_initrd_goes_page_aligned_to_the_top_of_the_first_region_above_the_kernel() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let layout = MemoryLayout::contiguous(4 << 20);
        let path = temp_file("initrd", &[0x5a; 5000]);
        let placed = load_initrd(&memory, &layout, &path, 0x20_0000, None).unwrap();
        assert_eq!(
            placed,
            InitrdPlace {
                address: (4 << 20) - 0x2000,
                size: 5000
            }
        );
        let mut back = [0u8; 5000];
        memory
            .read_slice(&mut back, GuestAddress(placed.address))
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        // The kernel's initrd_addr_max is honoured.
        let capped = load_initrd(&memory, &layout, &path, 0x20_0000, Some(0x2f_ffff)).unwrap();
        assert_eq!(capped.address, 0x30_0000 - 0x2000);
        // No room above the kernel: refused, saying how much there was.
        let err = load_initrd(&memory, &layout, &path, (4 << 20) - 0x1000, None).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            err,
            BootError::InitrdDoesNotFit {
                size: 5000,
                room: 0x1000,
                ..
            }
        ));
        assert!(matches!(
            load_initrd(&memory, &layout, &path, 0, None),
            Err(BootError::InitrdOpen { .. })
        ));
    }

    #[test]
    fn a_bzimage_is_told_from_an_elf_by_its_header_magic() {
        let mut image = vec![0u8; 0x300];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = temp_file("bz", &image);
        let elf = temp_file("elf", b"\x7fELF and not much more");
        let tiny = temp_file("tiny", b"");
        let probe = |p: &std::path::Path| is_bzimage(&mut File::open(p).unwrap()).unwrap();
        let found = (probe(&bz), probe(&elf), probe(&tiny));
        for p in [bz, elf, tiny] {
            std::fs::remove_file(p).unwrap();
        }
        assert_eq!(found, (true, false, false));
    }

    #[test]
    fn the_boot_structures_carry_the_initrd_and_the_rsdp() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let layout = MemoryLayout::contiguous(1 << 20);
        let initrd = Some(InitrdPlace {
            address: 0x8_0000,
            size: 0x1234,
        });
        write_zero_page(&memory, &layout, 1, None, initrd).unwrap();
        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
        assert_eq!((image, size), (0x8_0000, 0x1234));
        let rsdp = params.acpi_rsdp_addr;
        assert_eq!(rsdp, ACPI_TABLES_START);

        write_start_info(&memory, &layout, initrd).unwrap();
        let info: hvm_start_info = memory.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(
            (info.nr_modules, info.modlist_paddr),
            (1, PVH_MODLIST_START)
        );
        assert_eq!(info.rsdp_paddr, ACPI_TABLES_START);
        let module: hvm_modlist_entry = memory.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x8_0000, 0x1234));
    }

    #[test]
    fn a_failed_guest_write_keeps_the_memory_error_as_its_source() {
        let err = write_gdt(&small_memory(), &GDT_PVH).unwrap_err();
        assert!(matches!(err, BootError::Write { what: "GDT", .. }));
        assert!(
            error_chain(&err).starts_with("cannot write GDT into guest memory: Guest memory error")
        );
    }

    #[test]
    fn long_mode_code_segment_decodes() {
        let cs = segment_from_gdt(GDT_LONG_MODE[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.present),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT_LONG_MODE[2], 2);
        assert_eq!((ds.type_, ds.db, ds.s), (0x3, 1, 1));
    }

    #[test]
    fn pvh_segments_are_flat_32_bit() {
        let cs = segment_from_gdt(GDT_PVH[1], 1);
        assert_eq!(
            (cs.base, cs.limit, cs.db, cs.l, cs.g),
            (0, 0xffff_ffff, 1, 0, 1)
        );
        let tr = segment_from_gdt(GDT_PVH[3], 3);
        assert_eq!((tr.type_, tr.limit, tr.s), (0xb, 0x67, 0));
    }

    #[test]
    fn boot_registers_follow_the_protocol() {
        let linux = boot_regs(BootEntry::Linux64(0x10_0000));
        assert_eq!((linux.rip, linux.rsi), (0x10_0000, ZERO_PAGE_START));
        let pvh = boot_regs(BootEntry::Pvh(0x10_0040));
        assert_eq!((pvh.rip, pvh.rbx), (0x10_0040, PVH_INFO_START));

        let mut sregs = kvm_sregs::default();
        set_boot_sregs(&mut sregs, BootEntry::Pvh(0));
        assert_eq!((sregs.cr0 & X86_CR0_PG, sregs.efer), (0, 0));
        set_boot_sregs(&mut sregs, BootEntry::Linux64(0));
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
    }
}
