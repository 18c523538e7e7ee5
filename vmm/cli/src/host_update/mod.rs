//! The host-wide update as an operator runs it: `luvmm update run` puts every VM of the host
//! into its session together and kexecs (`run.rs`, with `barrier.rs`), and after the kexec
//! `luvmm update status` says whether every VM is back (`status.rs`). The per-VM steps are
//! the VMM's own (`luvmm_vmm::update`), asked through each VMM's control API.

pub mod barrier;
mod picture;
pub mod run;
pub mod status;
pub mod status_systemd;
