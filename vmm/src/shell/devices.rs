//! Passthrough devices a handover's target adopts before the pause, from the fds and setup the
//! source staged. Adopting them maps their BARs into memslots and routes their interrupts on
//! the target's VM; none of that touches the device, and no irqfd is attached, so the source
//! runs the guest on as before. The guest may still set a device up anew before the pause, so
//! what was adopted is kept only if the state handed over says the same; otherwise it is given
//! up and the devices are adopted again from that state, inside the blackout.

use std::sync::Arc;

use luvmm_devices::pci::bus::PciBus;
use luvmm_devices::vfio::VfioDeviceFd;
use luvmm_resources::config::BarMode;
use luvmm_resources::layout::MemoryLayout;
use luvmm_resources::state::{DevicesState, IommuState, PassthroughState};

use super::ShellError;
use crate::passthrough::{DeviceArgs, DeviceSetupError, HandedDevices, Passthrough};
use crate::vmm::StagedDevices;
use crate::vstate::interrupts::device_routes;
use crate::vstate::vm::KvmVm;

/// The devices adopted ahead, and the setup they were adopted from.
pub struct AdoptedAhead {
    at_stage: Vec<PassthroughState>,
    iommu: IommuState,
    /// On the bus their saved slots.
    pub(crate) passthrough: Passthrough,
    pub(crate) pci: PciBus,
}

/// The guest set its devices up anew between the stage and the pause.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SetUpAnew {
    #[error("{bdf} was set up anew")]
    Device { bdf: String },
    #[error("the devices are not those staged")]
    Devices,
    #[error("the IOMMU context changed")]
    Iommu,
}

impl AdoptedAhead {
    /// Adopts the staged devices on `vm`, whose RAM is laid out as `layout`.
    pub fn adopt(
        vm: &KvmVm,
        layout: &MemoryLayout,
        staged: StagedDevices,
        handed: HandedDevices,
    ) -> Result<AdoptedAhead, ShellError> {
        Passthrough::check_handed(&staged.passthrough, &staged.handed, Some(&handed))?;
        let (router, mapper) = device_routes(vm, layout);
        let kvm_vfio = vm.create_vfio_device()?;
        let args = DeviceArgs {
            router: &router,
            mapper: &mapper,
            bar_access: BarMode::Direct,
            kvm_vfio,
        };
        let mut pci = PciBus::new();
        let passthrough = Passthrough::adopt(
            &staged.passthrough,
            Some(&staged.iommu),
            handed,
            &args,
            &mut pci,
        )?;
        Ok(AdoptedAhead {
            at_stage: staged.passthrough,
            iommu: staged.iommu,
            passthrough,
            pci,
        })
    }

    /// Whether `saved`, the devices as the source paused them, are as they were staged.
    pub fn check(&self, saved: &DevicesState) -> Result<(), SetUpAnew> {
        if saved.passthrough.len() != self.at_stage.len() {
            return Err(SetUpAnew::Devices);
        }
        for (now, staged) in saved.passthrough.iter().zip(&self.at_stage) {
            if now.bdf != staged.bdf {
                return Err(SetUpAnew::Devices);
            }
            if now != staged {
                return Err(SetUpAnew::Device {
                    bdf: now.bdf.clone(),
                });
            }
        }
        if saved.iommu.as_ref() != Some(&self.iommu) {
            return Err(SetUpAnew::Iommu);
        }
        Ok(())
    }

    /// Gives the devices up, for the same files to be adopted again on the same VM; returns
    /// its KVM VFIO device (a VM has one).
    pub fn give_up(self) -> Result<Option<Arc<VfioDeviceFd>>, DeviceSetupError> {
        self.passthrough.forget()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luvmm_resources::state::{MsixState, SerialRegisters, VfioBackend};

    fn device(bdf: &str, slot: u8) -> PassthroughState {
        PassthroughState {
            bdf: bdf.into(),
            guest_slot: slot,
            backend: VfioBackend::IommufdCdev,
            mappings: Vec::new(),
            config: vec![0; 256],
            msi: None,
            msix: Some(MsixState {
                offset: 0x50,
                enabled: true,
                table: vec![0; 8],
                gsis: vec![25, 26],
            }),
            intx: None,
            hwpt_id: Some(2),
            bar_access: BarMode::Direct,
        }
    }

    fn iommu() -> IommuState {
        IommuState {
            ioas_id: 1,
            hwpts: vec![2],
            mappings: Vec::new(),
        }
    }

    fn ahead(devices: &[PassthroughState]) -> AdoptedAhead {
        AdoptedAhead {
            at_stage: devices.to_vec(),
            iommu: iommu(),
            passthrough: Passthrough::default(),
            pci: PciBus::new(),
        }
    }

    fn paused_with(devices: &[PassthroughState], iommu: Option<IommuState>) -> DevicesState {
        DevicesState {
            serial: SerialRegisters::default(),
            guest_control: Default::default(),
            passthrough: devices.to_vec(),
            iommu,
        }
    }

    #[test]
    fn devices_adopted_ahead_are_kept_only_as_staged() {
        let staged = [device("0000:00:02.0", 1), device("0000:00:03.0", 2)];
        let ahead = ahead(&staged);
        assert_eq!(ahead.check(&paused_with(&staged, Some(iommu()))), Ok(()));

        // The guest masked a vector of the second device after the stage.
        let mut masked = staged.clone();
        if let Some(msix) = masked[1].msix.as_mut() {
            msix.table[3] = 1;
        }
        assert_eq!(
            ahead.check(&paused_with(&masked, Some(iommu()))),
            Err(SetUpAnew::Device {
                bdf: "0000:00:03.0".into()
            })
        );
        // It moved a BAR.
        let mut moved = staged.clone();
        moved[0].config[0x10] = 0x40;
        assert_eq!(
            ahead.check(&paused_with(&moved, Some(iommu()))),
            Err(SetUpAnew::Device {
                bdf: "0000:00:02.0".into()
            })
        );
        let swapped = [staged[1].clone(), staged[0].clone()];
        assert_eq!(
            ahead.check(&paused_with(&swapped, Some(iommu()))),
            Err(SetUpAnew::Devices)
        );
        assert_eq!(
            ahead.check(&paused_with(&staged[..1], Some(iommu()))),
            Err(SetUpAnew::Devices)
        );
        let mut remapped = iommu();
        remapped.hwpts.push(3);
        assert_eq!(
            ahead.check(&paused_with(&staged, Some(remapped))),
            Err(SetUpAnew::Iommu)
        );
        assert_eq!(
            ahead.check(&paused_with(&staged, None)),
            Err(SetUpAnew::Iommu)
        );
    }
}
