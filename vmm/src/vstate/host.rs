//! What this host can give a VM: its physical memory and its CPU's physical address width,
//! read once before a config is validated (`resources::config` checks against them).

use std::path::Path;

/// Where the kernel reports the host's memory.
const MEMINFO: &str = "/proc/meminfo";

/// The address width assumed when the CPU does not report one (CPUID leaf 0x80000008 is
/// missing): the architectural minimum of 36 bits.
const DEFAULT_PHYS_ADDR_BITS: u8 = 36;

/// The host's physical memory in bytes (`MemTotal`), or `None` when it cannot be read: then
/// the check is skipped rather than every VM refused.
pub fn ram_bytes() -> Option<u64> {
    let text = match std::fs::read_to_string(Path::new(MEMINFO)) {
        Ok(text) => text,
        Err(e) => {
            log::warn!("cannot read {MEMINFO} ({e}); guest RAM is not checked against the host's");
            return None;
        }
    };
    let total = mem_total(&text);
    if total.is_none() {
        log::warn!("no MemTotal in {MEMINFO}; guest RAM is not checked against the host's");
    }
    total
}

/// `MemTotal:  N kB` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?;
    let kib = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

/// The host CPU's physical address width (CPUID leaf 0x80000008, EAX bits 7:0).
#[cfg(target_arch = "x86_64")]
pub fn phys_addr_bits() -> u8 {
    use std::arch::x86_64::__cpuid;
    const ADDRESS_SIZES: u32 = 0x8000_0008;
    if __cpuid(0x8000_0000).eax < ADDRESS_SIZES {
        return DEFAULT_PHYS_ADDR_BITS;
    }
    match __cpuid(ADDRESS_SIZES).eax.to_le_bytes()[0] {
        0 => DEFAULT_PHYS_ADDR_BITS,
        bits => bits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:       16314208 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(text), Some(16_314_208 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots\n"), None);
        assert!(ram_bytes().is_some_and(|bytes| bytes > 0));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_cpu_reports_a_plausible_address_width() {
        assert!((36..=64).contains(&phys_addr_bits()));
    }
}
