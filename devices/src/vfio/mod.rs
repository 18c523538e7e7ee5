//! VFIO: the host's vfio-pci devices, and passing one through to the guest.

pub mod bar_map;
pub mod function;
pub mod host;
pub mod iommu;
pub mod irq;
pub mod open;
pub mod passthrough;
#[cfg(test)]
pub(crate) mod testing;

pub use bar_map::{BarMapError, GuestMapper};
pub use host::{host_vfio_devices, BoundCdev, HostVfioDevice, VfioBindError};
pub use iommu::{BoundDevice, BoundRecord, IommuContext, IommuError};
pub use irq::{HypervisorError, IrqRouter};
pub use open::{adopt_cdev, open_by_bdf, open_into, take_retrieved_cdev, EarlierBind};
pub use passthrough::{
    HostDevice, InterruptError, InterruptFds, PassthroughArgs, PassthroughError, VfioPciDevice,
};
/// The KVM VFIO pseudo-device, as vfio-ioctls holds it.
pub use vfio_ioctls::VfioDeviceFd;
