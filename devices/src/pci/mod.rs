//! PCI: configuration space emulation and bus 0. No PCI crate exists in rust-vmm, so this part
//! is luvmm's own: small, table-driven and unit-tested.

pub mod bus;
pub mod config;
pub mod msix;
