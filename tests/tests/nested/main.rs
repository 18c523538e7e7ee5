//! The nested bed: a QEMU (TCG) L1 with an emulated Intel IOMMU and an `edu` device, booting a
//! LUO kernel built from Debian's linux-source-7.2, where a real kexec happens. The kernel's
//! own LUO selftests must pass before luvmm's results count.
//!
//! The first run builds the kernel (about 11 minutes on 2 cores) and caches it.
//!
//! One module per scenario (`tests/nested/scenarios/<name>.sh`), all in one test binary, so
//! `cargo test --test nested <filter>` runs any of them.

mod scenario;

mod agent;
mod handover;
mod host_check;
mod host_update;
mod kexec_fails;
mod linux;
mod luo;
mod release;
mod update;
mod vfio;
mod vfio_lu;
mod vm;
