//! One module per KVM object: guest memory, the VM, the vCPUs; what a vCPU's exits mean; and
//! the x86 architectural state a vCPU carries; and what the host can give a VM.

pub mod exit;
pub mod host;
pub mod interrupts;
pub mod memory;
pub mod vcpu;
pub mod vm;
pub mod x86_64;
