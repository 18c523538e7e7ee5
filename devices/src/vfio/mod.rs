//! VFIO: the host's vfio-pci devices, and passing one through to the guest.

pub mod bar_map;
pub mod host;
pub mod irq;
pub mod passthrough;

pub use bar_map::GuestMapper;
pub use host::{host_vfio_devices, BoundCdev, HostVfioDevice, VfioBindError};
pub use irq::{HypervisorError, IrqRouter};
pub use passthrough::{PassthroughArgs, PassthroughError, VfioPciDevice};
