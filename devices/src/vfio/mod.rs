//! VFIO: the host's vfio-pci devices, and passing one through to the guest.

pub mod host;
pub mod passthrough;

pub use host::{host_vfio_devices, BoundCdev, HostVfioDevice, VfioBindError};
pub use passthrough::{IrqRouter, PassthroughError, VfioPciDevice};
