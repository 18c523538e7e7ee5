//! What a handover's target builds before it has the guest's state: the KVM VM with guest RAM
//! registered on the source's own memfds, its vCPUs' KVM objects, and its passthrough devices
//! adopted (`devices`). Mapping the memfds and registering memslots is most of what a restore
//! costs, and none of it depends on the guest's registers, so a target builds this while the
//! source still runs the guest (`PUT /vm/handover/stage`), and the blackout holds only the
//! state.

mod devices;

pub use self::devices::{AdoptedAhead, SetUpAnew};

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd};
use luvmm_resources::layout::MemoryLayout;
use luvmm_resources::state::{check_layout, StateMismatch, VmState};

use crate::passthrough::{DeviceSetupError, HandedDevices};
use crate::vmm::StagedDevices;
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{host_limits, KvmVm, VmError};

/// A KVM VM and its guest RAM, built ahead of the state that will run in it.
pub struct Shell {
    pub(crate) vm: KvmVm,
    pub(crate) ram: GuestRam,
    /// vCPU `i`'s KVM object, `i` from 0.
    pub(crate) vcpus: Vec<VcpuFd>,
    /// The passthrough devices, adopted as staged.
    pub(crate) devices: Option<AdoptedAhead>,
    /// Each memfd's (device, inode), read once here rather than again in the blackout.
    memfd_ids: Vec<(u64, u64)>,
    /// How long building it took, before the pause.
    pub(crate) built_ms: f64,
}

/// The shell could not be built; the source still runs the guest.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("the memory handed ahead does not fit its layout")]
    Layout(#[from] StateMismatch),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("{count} vCPUs handed ahead: this host's KVM takes 1 to {max}")]
    VcpuCount { count: u32, max: u32 },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot adopt the passthrough devices ahead")]
    Devices(#[from] DeviceSetupError),
}

/// The VM handed over is not the one the shell was built for.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAsBuilt {
    #[error("its memory layout differs from the one handed ahead")]
    Layout,
    #[error("its memory region {index} is another memfd than the one handed ahead")]
    OtherMemfd { index: usize },
    #[error("its huge page choice differs from the one handed ahead")]
    HugePages,
    #[error("it has {saved} vCPUs, {built} were built ahead")]
    VcpuCount { saved: usize, built: usize },
}

impl Shell {
    /// Builds the KVM VM, registers `memfds`, laid out as `layout`, as its guest RAM,
    /// creates `vcpus` vCPUs on it, and adopts the staged passthrough devices, if any, from
    /// their fds.
    pub fn build(
        kvm: &Kvm,
        layout: &MemoryLayout,
        memfds: Vec<File>,
        thp: bool,
        vcpus: u32,
        devices: Option<(StagedDevices, HandedDevices)>,
    ) -> Result<Shell, ShellError> {
        let started = Instant::now();
        let mut sizes = Vec::with_capacity(memfds.len());
        let mut memfd_ids = Vec::with_capacity(memfds.len());
        for (index, file) in memfds.iter().enumerate() {
            let meta = file
                .metadata()
                .map_err(|source| MemoryError::Stat { index, source })?;
            sizes.push(meta.len());
            memfd_ids.push((meta.dev(), meta.ino()));
        }
        check_layout(layout, &sizes)?;
        let max = host_limits(kvm).max_vcpus;
        if vcpus == 0 || vcpus > max {
            return Err(ShellError::VcpuCount { count: vcpus, max });
        }
        let vm = KvmVm::new(kvm)?;
        let ram = GuestRam::adopt(layout, memfds, thp)?;
        vm.register_memory(&ram)?;
        let vcpus = (0..vcpus)
            .map(|id| Vcpu::create_fd(&vm, id))
            .collect::<Result<Vec<_>, _>>()?;
        let devices = devices
            .map(|(staged, handed)| AdoptedAhead::adopt(&vm, layout, staged, handed))
            .transpose()?;
        Ok(Shell {
            vm,
            ram,
            vcpus,
            devices,
            memfd_ids,
            built_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Checks that `state`, restored onto `memfds`, is the VM this shell was built for: the
    /// same layout, the same files (not copies of them), the same huge page choice and as
    /// many vCPUs.
    pub fn check(&self, state: &VmState, memfds: &[File]) -> Result<(), NotAsBuilt> {
        if state.memory != *self.ram.layout() {
            return Err(NotAsBuilt::Layout);
        }
        if state.vcpus.len() != self.vcpus.len() {
            return Err(NotAsBuilt::VcpuCount {
                saved: state.vcpus.len(),
                built: self.vcpus.len(),
            });
        }
        if state.memory_thp != self.ram.thp() {
            return Err(NotAsBuilt::HugePages);
        }
        // The same inode, not a copy: memfds have one inode each.
        for (index, (handed, built)) in memfds.iter().zip(&self.memfd_ids).enumerate() {
            let same = handed
                .metadata()
                .is_ok_and(|meta| (meta.dev(), meta.ino()) == *built);
            if !same {
                return Err(NotAsBuilt::OtherMemfd { index });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn memfd(size: u64) -> File {
        let fd = nix::sys::memfd::memfd_create("shell-test", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let file = File::from(fd);
        file.set_len(size).expect("size");
        file
    }

    fn golden() -> VmState {
        let blob = include_bytes!("../../../tests/golden/1.2/state.bin");
        luvmm_resources::state::decode(blob).expect("the golden state")
    }

    #[test]
    fn a_shell_takes_only_the_vm_it_was_built_for() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let mut state = golden();
        let sizes: Vec<u64> = state.memory.regions.iter().map(|r| r.size).collect();
        let memfds: Vec<File> = sizes.iter().map(|&size| memfd(size)).collect();
        let handed: Vec<File> = memfds.iter().map(|f| f.try_clone().unwrap()).collect();
        let vcpus = u32::try_from(state.vcpus.len()).unwrap();
        let shell = Shell::build(&kvm, &state.memory, memfds, state.memory_thp, vcpus, None)
            .expect("shell");
        assert_eq!(shell.check(&state, &handed), Ok(()));

        let copies: Vec<File> = sizes.iter().map(|&size| memfd(size)).collect();
        assert_eq!(
            shell.check(&state, &copies),
            Err(NotAsBuilt::OtherMemfd { index: 0 })
        );
        state.memory_thp = !state.memory_thp;
        assert_eq!(shell.check(&state, &handed), Err(NotAsBuilt::HugePages));
        state.memory_thp = !state.memory_thp;
        let second = state.vcpus.pop().expect("two vCPUs");
        assert_eq!(
            shell.check(&state, &handed),
            Err(NotAsBuilt::VcpuCount { saved: 1, built: 2 })
        );
        state.vcpus.push(second);
        state.memory = MemoryLayout::contiguous(state.memory.total_bytes() + 2 * MIB);
        assert_eq!(shell.check(&state, &handed), Err(NotAsBuilt::Layout));
    }

    #[test]
    fn memfds_that_do_not_fit_the_layout_build_nothing() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let layout = MemoryLayout::contiguous(4 * MIB);
        let refused = Shell::build(&kvm, &layout, vec![memfd(2 * MIB)], false, 1, None);
        assert!(
            matches!(
                refused,
                Err(ShellError::Layout(StateMismatch::RegionSize {
                    index: 0,
                    ..
                }))
            ),
            "{:?}",
            refused.err()
        );
        let refused = Shell::build(&kvm, &layout, Vec::new(), false, 1, None);
        assert!(matches!(
            refused,
            Err(ShellError::Layout(StateMismatch::RegionCount { .. }))
        ));
        let refused = Shell::build(&kvm, &layout, vec![memfd(4 * MIB)], false, 0, None);
        assert!(matches!(
            refused,
            Err(ShellError::VcpuCount { count: 0, .. })
        ));
    }
}
