//! The `luvmm` binary's own code: the command line, and the operator tools that drive the VMM
//! from outside it (the host's pre-flight, the host-wide update, the drill and the benchmarks). The VMM itself is `luvmm_vmm`, which knows
//! nothing of this crate.

pub mod bench;
pub mod cli;
pub mod drill;
pub mod host_update;
pub mod preflight;
pub mod timeline;
