//! One module per KVM object: guest memory, the VM, the vCPUs.

pub mod interrupts;
pub mod memory;
pub mod vcpu;
pub mod vm;
