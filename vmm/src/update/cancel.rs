//! Calling a staged or prepared update off: asked by the operator (`luvmm ctl update cancel`), decided
//! by the agent (a VM was not ready by the deadline, or the kexec failed), or after a prepare
//! step failed. The agent releases its copy of the session and this process closes its own
//! (the kernel unpreserves everything once both are gone), the devices' interrupts come back
//! and the guest resumes where it was. When the failure is the kexec itself, after the kernel
//! froze (and in its reset mode, reset) some devices, each of those gives EIO from then on: it
//! is closed and opened again under the guest's view of it before the guest resumes.

use luvmm_liveupdate::agent::VmPhase as AgentPhase;
use luvmm_resources::errors::error_chain;

use crate::update::vm::UpdateVm;
use crate::vmm::{PreparedUpdate, VmPhase, VmmError};

/// Calls a staged or prepared update off on the operator's word. A prepared (paused) guest
/// resumes; a staged one runs on as it was.
pub fn cancel(vm: &mut impl UpdateVm) -> Result<(), VmmError> {
    let refused = VmmError::WrongPhase {
        request: "cancel an update",
        phase: vm.phase(),
    };
    if !holds_update(vm) {
        return Err(refused);
    }
    let resume = vm.phase() == VmPhase::Preserved;
    match vm.prepared().take() {
        Some(prepared) => {
            call_off(vm, prepared, resume);
            Ok(())
        }
        None => Err(refused),
    }
}

/// Whether the VM holds an update: prepared (`Preserved`), or staged (running or paused with
/// its session).
fn holds_update(vm: &mut impl UpdateVm) -> bool {
    match vm.phase() {
        VmPhase::Preserved => true,
        VmPhase::Running | VmPhase::Paused => vm.prepared().is_some(),
        _ => false,
    }
}

/// While staged or prepared: if the agent called this VM's update off, or no longer knows it,
/// the update is called off here too (a prepared guest resumes in place). The agent tells of
/// that on the VM's watch; without one (or once it ended) the agent is asked, and an agent
/// that does not answer is asked again next time.
pub fn follow_agent(vm: &mut impl UpdateVm) {
    if !holds_update(vm) {
        return;
    }
    let Some(mut prepared) = vm.prepared().take() else {
        return;
    };
    // What the agent told since the last look; asked only without a watch, or once the
    // watch ended (the agent went away and may be back).
    let told = match prepared.watch.as_mut().map(|watch| watch.told()) {
        Some(Ok(None)) => {
            *vm.prepared() = Some(prepared);
            return;
        }
        Some(Ok(Some(ledger))) => Ok(ledger),
        Some(Err(e)) => {
            log::info!("update: the agent's telling ended ({e}); asking it from now on");
            prepared.watch = None;
            prepared.agent.status_of(&prepared.vm_id)
        }
        None => prepared.agent.status_of(&prepared.vm_id),
    };
    let called_off = match told {
        Ok(ledger) => !ledger
            .vms
            .iter()
            .any(|r| r.vm == prepared.vm_id && r.phase != AgentPhase::Cancelled),
        Err(e) => {
            log::debug!("update: the agent does not answer yet: {}", error_chain(&e));
            false
        }
    };
    if called_off {
        log::warn!("the agent called the update off; the guest runs on in place");
        let resume = vm.phase() == VmPhase::Preserved;
        call_off(vm, prepared, resume);
    } else {
        *vm.prepared() = Some(prepared);
    }
}

/// Undoes a prepare, as far as it went, and resumes if `resume` and the guest is paused.
pub(crate) fn call_off(vm: &mut impl UpdateVm, prepared: PreparedUpdate, resume: bool) {
    if let Err(e) = prepared.agent.release(&prepared.vm_id) {
        log::error!(
            "cancel: the agent did not release the session: {}",
            error_chain(&e)
        );
    }
    prepared.session.cancel();
    vm.rearm_devices();
    if vm.phase() == VmPhase::Preserved {
        vm.set_phase(VmPhase::Paused);
    }
    if resume && vm.phase() == VmPhase::Paused {
        if let Err(e) = vm.resume() {
            log::error!("cancel: cannot resume the guest: {}", error_chain(&e));
        }
    }
    log::info!("update called off; the guest runs on in place");
}
