//! The VM configuration: plain data, read from JSON or built from CLI flags, and validated as a
//! whole before the VMM creates anything.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files;
use crate::layout::{
    GuestRegion, MemoryLayout, CMDLINE_MAX_SIZE, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START,
    PAGE_SIZE,
};

/// Command line given to the guest when the config names none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// How the vCPU enters the guest ELF.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF carries a PVH entry note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    /// 64-bit Linux boot protocol: long mode, `boot_params` in RSI, e820 map.
    Linux64,
    /// PVH: 32-bit protected mode, `hvm_start_info` in EBX.
    Pvh,
}

/// The CPU model the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplate {
    /// Everything this host's KVM supports.
    #[default]
    Host,
    /// An x86-64-v2 guest: no AVX family, no protection keys, XSAVE with x87 and SSE state
    /// only. Such a guest's CPUID is offered by any recent x86-64 host, so its state can be
    /// restored after a kernel or microcode update that takes features away, and by a nested
    /// KVM that does not follow the guest's XCR0 (the bed's L1 under TCG).
    Baseline,
}

/// Where the guest's COM1 output goes. In JSON `"stdout"`, `"none"` or `{"file": PATH}`; on
/// the command line `stdout`, `none` or a path (see `SerialOutput::from_flag`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Appended to a file, created if missing.
    File(PathBuf),
    /// Discarded.
    #[serde(rename = "none")]
    Discard,
}

impl SerialOutput {
    /// Reads `--serial`: the config's words, or a file path. A path must contain a `/`, so a
    /// mistyped word (`sink`, `stdot`) is refused instead of becoming a file of that name.
    /// The error is a `String` because clap's `value_parser` prints it as the whole reason.
    pub fn from_flag(value: &str) -> Result<SerialOutput, String> {
        match value {
            "stdout" => Ok(SerialOutput::Stdout),
            "none" => Ok(SerialOutput::Discard),
            path if path.contains('/') => Ok(SerialOutput::File(PathBuf::from(path))),
            other => Err(format!(
                "{other:?} is not stdout, none or a path (write a file in this directory as ./{other})"
            )),
        }
    }
}

/// What a VM's luvmm was launched with that its restore after a host live update needs again:
/// where the guest's console goes and where the API listens. The VMM gives it to the agent
/// when it subscribes, so that the restore in the next kernel (`luvmm restore --session ID`)
/// needs no flags. Paths are absolute: the restore may run elsewhere (a systemd unit).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchRecord {
    pub serial: SerialOutput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Its vCPUs, for the restore to make before it claims the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
}

impl LaunchRecord {
    /// The record of `serial` and `api_socket`, their paths made absolute against this
    /// process's directory.
    pub fn new(serial: &SerialOutput, api_socket: Option<&std::path::Path>) -> LaunchRecord {
        let absolute = |path: &std::path::Path| {
            std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
        };
        LaunchRecord {
            serial: match serial {
                SerialOutput::File(path) => SerialOutput::File(absolute(path)),
                other => other.clone(),
            },
            api_socket: api_socket.map(absolute),
            vcpus: None,
        }
    }
}

/// One RAM region as the user writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegionConfig {
    /// Guest physical address, page aligned.
    pub gpa: u64,
    /// Size in bytes, page aligned, not zero.
    pub size: u64,
}

/// A complete VM configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM regions; one memfd each.
    pub memory: Vec<MemoryRegionConfig>,
    /// The guest kernel: an ELF (a `vmlinux`, or luvmm's test payload) or a `bzImage`.
    /// `"kernel"` in a config file, like Firecracker's `kernel_image_path`.
    #[serde(alias = "kernel")]
    pub payload: PathBuf,
    /// An initramfs for a Linux guest.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Guest kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Boot protocol.
    #[serde(default)]
    pub boot: BootProtocol,
    /// The CPU model the guest sees.
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    /// COM1 output.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Unix socket for the control API; none means no API.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Host PCI functions to pass through, by BDF (`0000:00:03.0`).
    #[serde(default)]
    pub vfio: Vec<String>,
    /// Whether passthrough BARs are mapped into the guest (no exits) or trapped.
    #[serde(default)]
    pub vfio_bars: BarMode,
    /// The IOMMU path for passthrough devices.
    #[serde(default)]
    pub vfio_backend: VfioBackendChoice,
    /// Ask for transparent huge pages on guest RAM (`MADV_HUGEPAGE`, RAM filled at boot), on
    /// by default: fewer, larger folios for LUO to preserve and retrieve. They come only where
    /// the host's shmem THP allows (`advise`, `always`); with `never` RAM stays in small pages.
    #[serde(default = "thp_by_default")]
    pub memory_thp: bool,
}

/// The IOMMU path for passthrough devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VfioBackendChoice {
    /// iommufd + VFIO cdev when the kernel has them, the legacy container otherwise.
    #[default]
    Auto,
    /// iommufd + VFIO cdev, or refuse to start.
    Iommufd,
    /// The legacy VFIO group/container path.
    Legacy,
}

/// How passthrough BARs reach the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BarMode {
    /// Mapped as memslots where VFIO allows mmap; trapped otherwise.
    #[default]
    Direct,
    /// Every access exits to the VMM.
    Trapped,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn thp_by_default() -> bool {
    true
}

/// Guest RAM when the user gives no size.
const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;

impl Default for VmConfig {
    /// What `luvmm run` starts from without `--config`: one vCPU, 64 MiB of RAM from address
    /// 0, and every optional field as a JSON config that leaves it out. No payload: validation
    /// asks for one.
    fn default() -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory: vec![MemoryRegionConfig {
                gpa: 0,
                size: DEFAULT_MEMORY_BYTES,
            }],
            payload: PathBuf::new(),
            initrd: None,
            cmdline: default_cmdline(),
            boot: BootProtocol::default(),
            cpu_template: CpuTemplate::default(),
            serial: SerialOutput::default(),
            api_socket: None,
            vfio: Vec::new(),
            vfio_bars: BarMode::default(),
            vfio_backend: VfioBackendChoice::default(),
            memory_thp: true,
        }
    }
}

/// What the host allows, read from KVM and the host once before validation.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: u32,
    /// The host's physical memory (`MemTotal`): more guest RAM than this would only end in
    /// the OOM killer, with no message.
    pub ram_bytes: u64,
    /// The host CPU's physical address width: guest RAM above `1 << bits` cannot be mapped.
    pub phys_addr_bits: u8,
}

/// Bytes in a MiB, for `--memory-mib`.
const MIB: u64 = 1 << 20;

/// The RAM regions for `mib` MiB laid out from GPA 0 around the MMIO hole, as `--memory-mib`
/// asks for them; a size that does not fit in 64 bits is refused, not saturated.
pub fn memory_from_mib(mib: u64) -> Result<Vec<MemoryRegionConfig>, ConfigError> {
    let bytes = mib
        .checked_mul(MIB)
        .ok_or(ConfigError::MemoryMibTooLarge { mib })?;
    Ok(MemoryLayout::contiguous(bytes)
        .regions
        .iter()
        .map(|r| MemoryRegionConfig {
            gpa: r.gpa,
            size: r.size,
        })
        .collect())
}

/// A configuration that cannot be used; each variant names the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The JSON text does not parse into a config.
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// The config file cannot be read.
    #[error("config file {path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    /// `vcpus` is 0.
    #[error("vcpus: must be at least 1")]
    NoVcpus,
    /// `vcpus` exceeds what KVM allows.
    #[error("vcpus: {count} exceeds this host's KVM limit of {max}")]
    TooManyVcpus { count: u32, max: u32 },
    /// `memory` is empty.
    #[error("memory: at least one region is needed")]
    NoMemory,
    /// A region's size is 0.
    #[error("memory[{index}].size: must not be 0")]
    ZeroSize { index: usize },
    /// A region's address or size is not page aligned.
    #[error("memory[{index}].{field}: {value:#x} is not a multiple of {PAGE_SIZE:#x}")]
    NotPageAligned {
        index: usize,
        field: &'static str,
        value: u64,
    },
    /// `--memory-mib` times 1 MiB does not fit in 64 bits.
    #[error("memory: {mib} MiB is too large (more than 2^64 bytes)")]
    MemoryMibTooLarge { mib: u64 },
    /// More RAM than the host has.
    #[error(
        "memory: {} MiB in all is more than this host's {} MiB of RAM",
        requested >> 20,
        host >> 20
    )]
    MoreThanHostRam { requested: u64, host: u64 },
    /// A region ends above what the host CPU can address.
    #[error(
        "memory[{index}]: ends at {end:#x}, beyond this host CPU's {bits}-bit physical address space"
    )]
    BeyondPhysAddr { index: usize, end: u64, bits: u8 },
    /// `gpa + size` does not fit in 64 bits.
    #[error("memory[{index}]: gpa {gpa:#x} + size {size:#x} overflows")]
    RegionOverflow { index: usize, gpa: u64, size: u64 },
    /// Two regions share addresses.
    #[error("memory[{first}] and memory[{second}] overlap")]
    Overlap { first: usize, second: usize },
    /// A region reaches into the 32-bit MMIO hole.
    #[error(
        "memory[{index}]: [{gpa:#x}, {end:#x}) overlaps the MMIO hole [{MMIO_HOLE_START:#x}, {MMIO_HOLE_END:#x})"
    )]
    InMmioHole { index: usize, gpa: u64, end: u64 },
    /// No region starts at GPA 0 with room for the boot structures and a kernel at 1 MiB.
    #[error("memory: a region must start at gpa 0 and extend past {HIMEM_START:#x} (boot structures and the payload live there)")]
    NoLowMemory,
    /// No payload was named.
    #[error("payload: no guest kernel given (--kernel FILE, or \"kernel\" in the config file)")]
    NoPayload,
    /// The payload file is missing or not a regular file.
    #[error("payload: {path}: {reason}")]
    Payload { path: PathBuf, reason: String },
    /// The command line is too long for the boot protocol area.
    #[error("cmdline: {len} bytes, at most {} allowed", CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong { len: usize },
    /// A passthrough device's BDF is not `DDDD:BB:DD.F`.
    #[error("vfio[{index}]: {bdf:?} is not a PCI address like 0000:00:03.0")]
    BadBdf { index: usize, bdf: String },
    /// The same device is listed twice.
    #[error("vfio[{index}]: {bdf} is listed twice")]
    DuplicateBdf { index: usize, bdf: String },
    /// The API socket's directory does not exist.
    #[error("api_socket: directory of {path} does not exist")]
    ApiSocketDir { path: PathBuf },
}

impl VmConfig {
    /// Reads a JSON config file. Unknown fields are refused so that typos do not pass silently.
    /// Only a regular file is read, so a FIFO cannot hang the VMM.
    pub fn from_json_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let mut text = String::new();
        files::open_regular(path)
            .and_then(|mut file| file.read_to_string(&mut text))
            .map_err(|e| ConfigError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        VmConfig::from_json(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses a JSON config; an error names the field that is wrong, in words rather than
    /// Rust's types (`vcpus: expected a number, found string "two"`).
    fn from_json(text: &str) -> Result<VmConfig, String> {
        match serde_json::from_str(text).map_err(|e| e.to_string())? {
            serde_json::Value::Object(fields) => crate::json::decode_object(fields),
            other => Err(format!(
                "a config is a JSON object ({{\"vcpus\": 1, ...}}), not {}",
                crate::json::kind(&other)
            )),
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > limits.max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                count: self.vcpus,
                max: limits.max_vcpus,
            });
        }
        self.validate_memory()?;
        self.validate_host_memory(limits)?;
        self.validate_payload()?;
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
            });
        }
        for (index, bdf) in self.vfio.iter().enumerate() {
            if !is_bdf(bdf) {
                return Err(ConfigError::BadBdf {
                    index,
                    bdf: bdf.clone(),
                });
            }
            if self.vfio[..index].contains(bdf) {
                return Err(ConfigError::DuplicateBdf {
                    index,
                    bdf: bdf.clone(),
                });
            }
        }
        if let Some(path) = &self.api_socket {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(ConfigError::ApiSocketDir { path: path.clone() });
            }
        }
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), ConfigError> {
        if self.memory.is_empty() {
            return Err(ConfigError::NoMemory);
        }
        for (index, region) in self.memory.iter().enumerate() {
            if region.size == 0 {
                return Err(ConfigError::ZeroSize { index });
            }
            for (field, value) in [("gpa", region.gpa), ("size", region.size)] {
                if value % PAGE_SIZE != 0 {
                    return Err(ConfigError::NotPageAligned {
                        index,
                        field,
                        value,
                    });
                }
            }
            let end = region
                .gpa
                .checked_add(region.size)
                .ok_or(ConfigError::RegionOverflow {
                    index,
                    gpa: region.gpa,
                    size: region.size,
                })?;
            if region.gpa < MMIO_HOLE_END && end > MMIO_HOLE_START {
                return Err(ConfigError::InMmioHole {
                    index,
                    gpa: region.gpa,
                    end,
                });
            }
        }
        for (first, a) in self.memory.iter().enumerate() {
            for (offset, b) in self.memory[first + 1..].iter().enumerate() {
                if to_region(a).overlaps(&to_region(b)) {
                    return Err(ConfigError::Overlap {
                        first,
                        second: first + 1 + offset,
                    });
                }
            }
        }
        if !self
            .memory
            .iter()
            .any(|r| r.gpa == 0 && r.size > HIMEM_START)
        {
            return Err(ConfigError::NoLowMemory);
        }
        Ok(())
    }

    /// Checks the RAM against the host: in total against its memory, each region's end
    /// against its CPU's address width. Runs after `validate_memory`, so ends do not overflow.
    fn validate_host_memory(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        let limit = 1u64.checked_shl(u32::from(limits.phys_addr_bits));
        for (index, region) in self.memory.iter().enumerate() {
            let end = to_region(region).end();
            if limit.is_some_and(|limit| end > limit) {
                return Err(ConfigError::BeyondPhysAddr {
                    index,
                    end,
                    bits: limits.phys_addr_bits,
                });
            }
        }
        let requested = self
            .memory
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.size))
            .unwrap_or(u64::MAX);
        if requested > limits.ram_bytes {
            return Err(ConfigError::MoreThanHostRam {
                requested,
                host: limits.ram_bytes,
            });
        }
        Ok(())
    }

    fn validate_payload(&self) -> Result<(), ConfigError> {
        if self.payload.as_os_str().is_empty() {
            return Err(ConfigError::NoPayload);
        }
        let unreadable = |path: &PathBuf| {
            let reason = match std::fs::metadata(path) {
                Ok(meta) => files::require_regular(&meta).err()?.to_string(),
                Err(e) => e.to_string(),
            };
            Some(ConfigError::Payload {
                path: path.clone(),
                reason,
            })
        };
        match std::iter::once(&self.payload)
            .chain(&self.initrd)
            .find_map(unreadable)
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The RAM layout of a validated config, sorted by address.
    pub fn memory_layout(&self) -> MemoryLayout {
        let mut regions: Vec<GuestRegion> = self.memory.iter().map(to_region).collect();
        regions.sort_by_key(|r| r.gpa);
        MemoryLayout { regions }
    }
}

/// `DDDD:BB:DD.F` in lowercase hex, device < 32, function < 8.
fn is_bdf(bdf: &str) -> bool {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let Some((domain, rest)) = bdf.split_once(':') else {
        return false;
    };
    let Some((bus, rest)) = rest.split_once(':') else {
        return false;
    };
    let Some((device, function)) = rest.split_once('.') else {
        return false;
    };
    hex(domain, 4)
        && hex(bus, 2)
        && hex(device, 2)
        && u8::from_str_radix(device, 16).is_ok_and(|d| d < 32)
        && function.len() == 1
        && function.as_bytes()[0].is_ascii_digit()
        && function.as_bytes()[0] < b'8'
}

fn to_region(r: &MemoryRegionConfig) -> GuestRegion {
    GuestRegion {
        gpa: r.gpa,
        size: r.size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 8,
        ram_bytes: 16 << 30,
        phys_addr_bits: 46,
    };

    fn payload_file() -> PathBuf {
        // The test binary itself is a regular file that always exists.
        std::env::current_exe().unwrap()
    }

    fn config() -> VmConfig {
        VmConfig {
            payload: payload_file(),
            ..VmConfig::default()
        }
    }

    fn with_memory(regions: &[(u64, u64)]) -> VmConfig {
        VmConfig {
            memory: regions
                .iter()
                .map(|&(gpa, size)| MemoryRegionConfig { gpa, size })
                .collect(),
            ..config()
        }
    }

    #[test]
    fn a_sane_config_validates() {
        assert_eq!(config().validate(&LIMITS), Ok(()));
        let two = with_memory(&[(MMIO_HOLE_END, 64 * MIB), (0, 64 * MIB)]);
        assert_eq!(two.validate(&LIMITS), Ok(()));
        assert_eq!(two.memory_layout().regions[0].gpa, 0);
    }

    #[test]
    fn vcpu_count_is_bounded() {
        let zero = VmConfig {
            vcpus: 0,
            ..config()
        };
        assert_eq!(zero.validate(&LIMITS), Err(ConfigError::NoVcpus));
        let many = VmConfig {
            vcpus: 9,
            ..config()
        };
        assert_eq!(
            many.validate(&LIMITS),
            Err(ConfigError::TooManyVcpus { count: 9, max: 8 })
        );
    }

    #[test]
    fn memory_errors_name_the_region_and_field() {
        assert_eq!(
            with_memory(&[]).validate(&LIMITS),
            Err(ConfigError::NoMemory)
        );
        assert_eq!(
            with_memory(&[(0, 64 * MIB), (MMIO_HOLE_END, 0)]).validate(&LIMITS),
            Err(ConfigError::ZeroSize { index: 1 })
        );
        assert_eq!(
            with_memory(&[(0, 64 * MIB + 1)]).validate(&LIMITS),
            Err(ConfigError::NotPageAligned {
                index: 0,
                field: "size",
                value: 64 * MIB + 1
            })
        );
        assert_eq!(
            with_memory(&[(0, 64 * MIB), (0x1_0000_0800, 4096)]).validate(&LIMITS),
            Err(ConfigError::NotPageAligned {
                index: 1,
                field: "gpa",
                value: 0x1_0000_0800
            })
        );
        assert_eq!(
            with_memory(&[(0, 64 * MIB), (32 * MIB, 64 * MIB)]).validate(&LIMITS),
            Err(ConfigError::Overlap {
                first: 0,
                second: 1
            })
        );
        assert_eq!(
            with_memory(&[(0, 4096 * MIB)]).validate(&LIMITS),
            Err(ConfigError::InMmioHole {
                index: 0,
                gpa: 0,
                end: 4096 * MIB
            })
        );
        assert_eq!(
            with_memory(&[(0, 64 * MIB), (u64::MAX - 4095, 8192)]).validate(&LIMITS),
            Err(ConfigError::RegionOverflow {
                index: 1,
                gpa: u64::MAX - 4095,
                size: 8192
            })
        );
        assert_eq!(
            with_memory(&[(2 * MIB, 64 * MIB)]).validate(&LIMITS),
            Err(ConfigError::NoLowMemory)
        );
    }

    #[test]
    fn missing_payload_is_refused() {
        let missing = VmConfig {
            payload: PathBuf::from("/nonexistent/payload.elf"),
            ..config()
        };
        assert!(matches!(
            missing.validate(&LIMITS),
            Err(ConfigError::Payload { .. })
        ));
        let dir = VmConfig {
            payload: PathBuf::from("/"),
            ..config()
        };
        assert!(matches!(
            dir.validate(&LIMITS),
            Err(ConfigError::Payload { .. })
        ));
        let none = VmConfig {
            payload: PathBuf::new(),
            ..config()
        };
        assert_eq!(none.validate(&LIMITS), Err(ConfigError::NoPayload));
        assert!(ConfigError::NoPayload.to_string().contains("--kernel"));
    }

    #[test]
    fn serial_words_mean_the_same_in_json_and_on_the_command_line() {
        for (word, output) in [
            ("stdout", SerialOutput::Stdout),
            ("none", SerialOutput::Discard),
        ] {
            assert_eq!(SerialOutput::from_flag(word), Ok(output.clone()));
            let json = format!("\"{word}\"");
            assert_eq!(serde_json::from_str::<SerialOutput>(&json).unwrap(), output);
            assert_eq!(serde_json::to_string(&output).unwrap(), json);
        }
        assert_eq!(
            SerialOutput::from_flag("/tmp/s.log"),
            Ok(SerialOutput::File("/tmp/s.log".into()))
        );
        assert_eq!(
            SerialOutput::from_flag("./sink"),
            Ok(SerialOutput::File("./sink".into()))
        );
        let typo = SerialOutput::from_flag("sink").unwrap_err();
        assert!(typo.contains("./sink"), "{typo}");
        assert!(serde_json::from_str::<SerialOutput>("\"sink\"").is_err());
    }

    #[test]
    fn long_cmdline_and_bad_socket_dir_are_refused() {
        let long = VmConfig {
            cmdline: "x".repeat(CMDLINE_MAX_SIZE),
            ..config()
        };
        assert!(matches!(
            long.validate(&LIMITS),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
        let socket = VmConfig {
            api_socket: Some(PathBuf::from("/nonexistent/dir/api.sock")),
            ..config()
        };
        assert!(matches!(
            socket.validate(&LIMITS),
            Err(ConfigError::ApiSocketDir { .. })
        ));
    }

    #[test]
    fn passthrough_addresses_are_checked() {
        let ok = VmConfig {
            vfio: vec!["0000:00:03.0".into(), "0000:00:04.0".into()],
            ..config()
        };
        assert_eq!(ok.validate(&LIMITS), Ok(()));
        for bad in [
            "00:03.0",
            "0000:00:03",
            "0000:00:20.0",
            "0000:00:03.8",
            "0000:0g:03.0",
        ] {
            let cfg = VmConfig {
                vfio: vec![bad.into()],
                ..config()
            };
            assert!(
                matches!(
                    cfg.validate(&LIMITS),
                    Err(ConfigError::BadBdf { index: 0, .. })
                ),
                "{bad}"
            );
        }
        let twice = VmConfig {
            vfio: vec!["0000:00:03.0".into(), "0000:00:03.0".into()],
            ..config()
        };
        assert!(matches!(
            twice.validate(&LIMITS),
            Err(ConfigError::DuplicateBdf { index: 1, .. })
        ));
    }

    #[test]
    fn json_config_parses_with_defaults_and_refuses_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("luvmm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.json");
        std::fs::write(
            &path,
            r#"{"vcpus": 2, "memory": [{"gpa": 0, "size": 67108864}], "payload": "/bin/sh",
                "serial": {"file": "/tmp/serial.log"}}"#,
        )
        .unwrap();
        let parsed = VmConfig::from_json_file(&path).unwrap();
        assert_eq!(parsed.vcpus, 2);
        // What the file leaves out is what `VmConfig::default` says.
        assert_eq!(
            parsed,
            VmConfig {
                vcpus: 2,
                payload: "/bin/sh".into(),
                serial: SerialOutput::File("/tmp/serial.log".into()),
                ..VmConfig::default()
            }
        );
        assert_eq!(parsed.cmdline, DEFAULT_CMDLINE);
        assert_eq!(parsed.boot, BootProtocol::Auto);
        assert!(
            parsed.memory_thp,
            "huge pages are asked for unless the config says no"
        );
        assert_eq!(parsed.serial, SerialOutput::File("/tmp/serial.log".into()));

        std::fs::write(&path, r#"{"vcpus": 1, "memroy": [], "payload": "x"}"#).unwrap();
        let err = VmConfig::from_json_file(&path).unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
        let wrong = |text: &str| VmConfig::from_json(text).unwrap_err();
        assert_eq!(
            wrong(r#"{"vcpus": "two", "payload": "x"}"#),
            "vcpus: expected a number, found string \"two\""
        );
        assert_eq!(
            wrong(r#"{"payload": "x", "memory": {"gpa": 0}}"#),
            "memory: expected a list, found an object"
        );
        assert_eq!(
            wrong("[1]"),
            "a config is a JSON object ({\"vcpus\": 1, ...}), not an array"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_lost_memory_mib_overflow_is_too_large_not_misaligned() {
        assert_eq!(memory_from_mib(64).unwrap(), VmConfig::default().memory);
        let err = memory_from_mib(99_999_999_999_999).unwrap_err();
        assert_eq!(
            err,
            ConfigError::MemoryMibTooLarge {
                mib: 99_999_999_999_999
            }
        );
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn nothing_lost_ram_beyond_the_host_is_refused() {
        let at_host = with_memory(&[(0, 3 << 30), (MMIO_HOLE_END, 13 << 30)]);
        assert_eq!(at_host.validate(&LIMITS), Ok(()));
        let tib = VmConfig {
            memory: memory_from_mib(1 << 20).unwrap(),
            ..config()
        };
        assert_eq!(
            tib.validate(&LIMITS),
            Err(ConfigError::MoreThanHostRam {
                requested: 1 << 40,
                host: 16 << 30
            })
        );
        // A small region far up: within the host's RAM, beyond its CPU's addresses.
        let high = with_memory(&[(0, 64 * MIB), (1 << 50, 64 * MIB)]);
        let err = high.validate(&LIMITS).unwrap_err();
        assert_eq!(
            err,
            ConfigError::BeyondPhysAddr {
                index: 1,
                end: (1 << 50) + 64 * MIB,
                bits: 46
            }
        );
        assert!(err.to_string().contains("46-bit"), "{err}");
        let top = with_memory(&[(0, 64 * MIB), ((1 << 46) - 64 * MIB, 64 * MIB)]);
        assert_eq!(top.validate(&LIMITS), Ok(()));
    }

    #[test]
    fn nothing_lost_a_device_as_config_or_payload_is_refused() {
        let device = PathBuf::from("/dev/null");
        let err = VmConfig::from_json_file(&device).unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        let payload = VmConfig {
            payload: device,
            ..config()
        };
        assert!(matches!(
            payload.validate(&LIMITS),
            Err(ConfigError::Payload { reason, .. }) if reason.contains("character device")
        ));
    }
}
