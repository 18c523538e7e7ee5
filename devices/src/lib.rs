//! Emulated devices of a luvmm microVM. Each device sits on a vm-device bus, saves its state as
//! plain data from `luvmm-resources`, and is rebuilt from that state by a separate constructor.

pub mod guest_control;
pub mod pci;
pub mod power;
pub mod serial;
pub mod vfio;
