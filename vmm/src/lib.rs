//! The luvmm VMM: builds a microVM from a config or from a saved state, runs its vCPUs, and
//! serves the control API.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod builder;
pub mod faults;
pub mod host_check;
pub mod logger;
pub mod outputs;
pub mod passthrough;
pub mod restore;
pub mod runtime;
pub mod seccomp;
pub mod shell;
pub mod takeover;
pub mod update;
pub mod vmm;
pub mod vstate;
