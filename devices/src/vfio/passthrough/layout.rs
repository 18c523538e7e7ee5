//! What the host function's configuration space offers the guest, read once through VFIO:
//! its identity, BARs and interrupt capabilities; and the checks that a saved state, or a
//! function opened anew, is of the same device.

use std::sync::Arc;

use luvmm_resources::state::PassthroughState;
use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_NUM_REGIONS};

use super::{intx, msi, PassthroughError};
use crate::pci::config::{Bar, BarKind, ConfigSpace, NUM_BARS};
use crate::pci::msix::{MsixLayout, MSIX_CAPABILITY_ID, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use crate::vfio::bar_map::{DirectBar, GuestMapper};
use crate::vfio::function::VfioFunction;
use crate::vfio::irq::MsixRouting;

/// Bytes of configuration space VFIO gives the guest a view of.
const CONFIG_LEN: usize = 256;

/// The interrupts the host function offers.
pub(super) struct Capabilities {
    /// Offset of the MSI capability.
    pub(super) msi: Option<usize>,
    /// Offset and layout of the MSI-X capability.
    pub(super) msix: Option<(usize, MsixLayout)>,
    /// An interrupt pin VFIO drives.
    pub(super) intx: bool,
}

/// The host function as read, before the guest or a saved state touches it.
pub(super) struct HostLayout {
    /// The function's own configuration space.
    raw: [u8; CONFIG_LEN],
    /// The guest's view of it: identity and capability chain, BARs declared, MSI and MSI-X
    /// the guest's to program (and MSI-X off).
    pub(super) config: ConfigSpace,
    pub(super) caps: Capabilities,
}

impl HostLayout {
    /// Reads `function`'s configuration space; only reads, nothing changes on the device.
    pub(super) fn read(
        bdf: &str,
        function: &dyn VfioFunction,
    ) -> Result<HostLayout, PassthroughError> {
        let raw = read_config(function);
        let mut config = ConfigSpace::from_device(&raw);
        for index in 0..NUM_BARS {
            if let Some(bar) = bar_shape(function, &raw, index) {
                config
                    .add_bar(index, bar)
                    .map_err(|source| PassthroughError::BarLayout {
                        bdf: bdf.to_string(),
                        source,
                    })?;
            }
        }
        let msi = config.find_capability(msi::MSI_CAPABILITY_ID);
        if let Some(offset) = msi {
            msi::expose(&mut config, offset);
        }
        let msix = config
            .find_capability(MSIX_CAPABILITY_ID)
            .map(|offset| (offset, expose_msix(&mut config, offset)));
        let intx = intx::offered(function, &config);
        Ok(HostLayout {
            raw,
            config,
            caps: Capabilities { msi, msix, intx },
        })
    }

    /// A saved device must be this function, with the same capabilities where the state
    /// says.
    pub(super) fn check_saved(
        &self,
        bdf: &str,
        saved: &PassthroughState,
    ) -> Result<(), PassthroughError> {
        let (saved_id, found) = (vendor_device(&saved.config), vendor_device(&self.raw));
        if saved.config.len() != self.raw.len() || saved_id != found {
            return Err(PassthroughError::NotTheSavedDevice {
                bdf: bdf.to_string(),
                saved: saved_id,
                found,
            });
        }
        let mismatch = |capability| {
            Err(PassthroughError::CapabilityMismatch {
                bdf: bdf.to_string(),
                capability,
            })
        };
        if saved.msi.map(|m| m.offset) != saved.msi.and(self.caps.msi) {
            return mismatch("MSI");
        }
        if let Some(m) = &saved.msix {
            let fits = self.caps.msix.is_some_and(|(offset, layout)| {
                offset == m.offset && m.table.len() == 4 * usize::from(layout.vectors)
            });
            if !fits {
                return mismatch("MSI-X");
            }
        }
        if saved.intx.is_some() && !self.caps.intx {
            return mismatch("INTx");
        }
        Ok(())
    }
}

/// A function opened anew must be the one `config` (the guest's view) was built from: the
/// same vendor:device, and BARs of the same size and type.
pub(super) fn check_same_function(
    bdf: &str,
    config: &ConfigSpace,
    function: &dyn VfioFunction,
) -> Result<(), PassthroughError> {
    let raw = read_config(function);
    let (saved, found) = (vendor_device(config.bytes()), vendor_device(&raw));
    if saved != found {
        return Err(PassthroughError::NotTheSavedDevice {
            bdf: bdf.to_string(),
            saved,
            found,
        });
    }
    for index in 0..NUM_BARS {
        if config.bar(index) != bar_shape(function, &raw, index) {
            return Err(PassthroughError::BarChanged {
                bdf: bdf.to_string(),
                index,
            });
        }
    }
    Ok(())
}

/// The BARs to map into the guest: memory BARs VFIO lets us mmap, except those holding the
/// MSI-X table and pending bits (the guest must never write the real table, and the pending
/// bits are the emulated masks').
pub(super) fn direct_bars(
    bdf: &str,
    function: &dyn VfioFunction,
    config: &ConfigSpace,
    msix: Option<&MsixRouting>,
    mapper: &Arc<dyn GuestMapper>,
) -> Result<Vec<DirectBar>, PassthroughError> {
    let msix_bars = msix.map_or([None, None], |m| {
        [Some(m.layout.table_bar), Some(m.layout.pba_bar)]
    });
    let mut bars = Vec::new();
    for index in 0..NUM_BARS {
        let region = function.region(bar_region(index));
        let mappable = config.bar(index).is_some_and(|b| b.kind != BarKind::Io)
            && !msix_bars.contains(&Some(index))
            && region.mmap;
        let Some(fd) = function.fd().filter(|_| mappable) else {
            continue;
        };
        let bar = DirectBar::new(index, fd, region.offset, region.size, mapper.clone()).map_err(
            |source| PassthroughError::DirectBar {
                bdf: bdf.to_string(),
                source,
            },
        )?;
        bars.push(bar);
    }
    Ok(bars)
}

fn read_config(function: &dyn VfioFunction) -> [u8; CONFIG_LEN] {
    let mut raw = [0u8; CONFIG_LEN];
    function.read(VFIO_PCI_CONFIG_REGION_INDEX, &mut raw, 0);
    raw
}

/// Makes the MSI-X capability at `offset` start disabled, with its enable and function-mask
/// bits the guest's to set; returns where its table and pending bits are.
fn expose_msix(config: &mut ConfigSpace, offset: usize) -> MsixLayout {
    let control = config.u16_at(offset + 2);
    let layout = MsixLayout::decode(
        control,
        config.read_u32(offset + 4),
        config.read_u32(offset + 8),
    );
    config.set_raw(offset + 2, &(control & 0x7ff).to_le_bytes());
    config.make_writable(
        offset + 2,
        &(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes(),
    );
    layout
}

/// VFIO's region index for BAR `bar` (vfio-pci numbers BAR n's region n). A `bar` beyond
/// `u32`, which no device has, becomes an index with no region, whose accesses VFIO refuses.
pub(super) fn bar_region(bar: usize) -> u32 {
    u32::try_from(bar).unwrap_or(u32::MAX)
}

/// Vendor and device ID (config dword 0); 0 from a config too short to hold them.
fn vendor_device(config: &[u8]) -> u32 {
    config
        .get(..4)
        .and_then(|bytes| bytes.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// The shape of BAR `index` from its VFIO region and the device's BAR register.
fn bar_shape(function: &dyn VfioFunction, raw: &[u8; CONFIG_LEN], index: usize) -> Option<Bar> {
    let region = u32::try_from(index)
        .ok()
        .filter(|&region| region < VFIO_PCI_NUM_REGIONS)?;
    let size = function.region(region).size;
    if size == 0 {
        return None;
    }
    let reg = 0x10 + index * 4;
    let low = u32::from_le_bytes([raw[reg], raw[reg + 1], raw[reg + 2], raw[reg + 3]]);
    let kind = if low & 0x1 != 0 {
        BarKind::Io
    } else if (low >> 1) & 0x3 == 0x2 {
        BarKind::Mmio64
    } else {
        BarKind::Mmio32
    };
    Some(Bar {
        kind,
        size: size.next_power_of_two(),
        prefetchable: kind != BarKind::Io && low & 0x8 != 0,
    })
}
