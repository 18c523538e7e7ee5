//! The builder's restore recipe and the VMM's phase machine, on `/dev/kvm`, from the golden
//! 1.2 state (two vCPUs, 4 MiB of RAM). The vCPUs are never resumed: the RAM is blank.

use std::fs::File;

use luvmm_liveupdate::fake::FakeHost;
use luvmm_resources::config::BarMode;
use luvmm_resources::state::{self, IommuState, PassthroughState, VfioBackend, VmState};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::builder::{build_from_saved, BuildError, Origin, RestoreArgs};
use crate::passthrough::DeviceSetupError;
use crate::update::retry::AgentKeeper;
use crate::vmm::{HandoverTicket, TicketState, VmPhase, VmmError};
use crate::vstate::vcpu::register_kick_signal;
use crate::vstate::vm::open_kvm;

/// KVM, with the signal that kicks vCPUs out of `KVM_RUN` handled (its default kills).
fn kvm() -> kvm_ioctls::Kvm {
    register_kick_signal().expect("the kick signal");
    open_kvm().expect("this test needs /dev/kvm")
}

fn golden() -> VmState {
    let mut saved: VmState =
        state::decode(include_bytes!("../../../tests/golden/1.2/state.bin")).expect("golden");
    for vcpu in &mut saved.vcpus {
        // The TSC rate of the machine the golden state was taken on is not this one's.
        vcpu.tsc_khz = None;
    }
    saved
}

fn ram(bytes: u64) -> File {
    let file = File::from(memfd_create("ram0", MFdFlags::MFD_CLOEXEC).expect("memfd"));
    file.set_len(bytes).expect("size the memfd");
    file
}

fn args(state: VmState, ram_bytes: u64, origin: Origin) -> RestoreArgs {
    RestoreArgs {
        state,
        state_bytes: 0,
        state_memfd: None,
        memfds: vec![ram(ram_bytes)],
        origin,
        serial: Box::new(std::io::sink()),
        gather_ms: 0.0,
        ahead: None,
    }
}

fn device(bdf: &str) -> PassthroughState {
    PassthroughState {
        bdf: bdf.into(),
        guest_slot: 1,
        backend: VfioBackend::IommufdCdev,
        mappings: Vec::new(),
        config: vec![0; 256],
        msi: None,
        msix: None,
        intx: None,
        hwpt_id: Some(2),
        bar_access: BarMode::Direct,
    }
}

#[test]
fn a_restored_vm_comes_back_paused_and_each_phase_refuses_what_it_must() {
    let kvm = kvm();
    let mut vmm = build_from_saved(&kvm, args(golden(), 4 << 20, Origin::Saved)).expect("rebuild");
    assert_eq!(vmm.phase(), VmPhase::Paused);
    assert!(vmm.status().restore_timings.is_some());
    assert!(matches!(
        vmm.complete_handover(""),
        Err(VmmError::WrongPhase {
            phase: VmPhase::Paused,
            ..
        })
    ));
    assert!(
        matches!(vmm.handover(), Err(VmmError::NoCurrentState)),
        "a handover needs a state saved since the last resume"
    );
    vmm.save(None).expect("save the paused VM");
    assert!(vmm.status().state_current);
    let (manifest, mut fds) = vmm.handover().expect("hand over");
    assert_eq!(manifest.memory.regions.len(), 1);
    assert_eq!(
        fds.len(),
        3,
        "the state memfd, one RAM memfd and the ticket"
    );
    assert_eq!(vmm.phase(), VmPhase::HandingOver);
    let ticket = HandoverTicket::from_fd(fds.pop().expect("the ticket"));
    assert_eq!(ticket.read().expect("read the ticket"), TicketState::Open);
    assert!(matches!(
        vmm.request_shutdown(false),
        Err(VmmError::HandoverPending)
    ));
    assert!(matches!(
        vmm.complete_handover("not the token"),
        Err(VmmError::WrongToken)
    ));
    assert_eq!(
        vmm.phase(),
        VmPhase::HandingOver,
        "a wrong token changes nothing"
    );
    assert_eq!(ticket.read().expect("read the ticket"), TicketState::Open);
    vmm.complete_handover(&manifest.token)
        .expect("the target took it");
    assert_eq!(
        ticket.read().expect("read the ticket"),
        TicketState::Completed
    );
    assert!(matches!(
        vmm.resume(),
        Err(VmmError::WrongPhase {
            phase: VmPhase::HandedOver,
            ..
        })
    ));
    assert!(
        vmm.save(None).is_err(),
        "a VM handed over is not this process's"
    );
}

#[test]
fn memfds_that_do_not_fit_the_saved_layout_are_refused_before_kvm() {
    let kvm = kvm();
    let refused = build_from_saved(&kvm, args(golden(), 2 << 20, Origin::Saved));
    assert!(matches!(refused, Err(BuildError::Mismatch(_))));
}

/// The golden state with one passthrough device on iommufd.
fn with_device() -> VmState {
    let mut saved = golden();
    saved.devices.passthrough.push(device("0000:00:03.0"));
    saved.devices.iommu = Some(IommuState {
        ioas_id: 1,
        hwpts: vec![2],
        mappings: Vec::new(),
    });
    saved
}

#[test]
fn a_state_with_devices_is_refused_without_what_brings_them() {
    let kvm = kvm();
    match build_from_saved(&kvm, args(with_device(), 4 << 20, Origin::Saved)) {
        Err(BuildError::Devices(DeviceSetupError::NoDeviceFds { bdfs })) => {
            assert_eq!(bdfs, ["0000:00:03.0"])
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let keeper = AgentKeeper::new(Box::new(FakeHost::new().agent()), "vm1");
    let live_update = Origin::LiveUpdate {
        devices: Vec::new(),
        earlier_iommu: None,
        keeper: Box::new(keeper),
        paused_at: None,
        retrieve_ram_ms: 0.0,
    };
    assert!(matches!(
        build_from_saved(&kvm, args(with_device(), 4 << 20, live_update)),
        Err(BuildError::NoDevices)
    ));
}

#[test]
fn nothing_lost_a_second_handover_withdraws_the_first_targets_claim() {
    let kvm = kvm();
    let mut vmm = build_from_saved(&kvm, args(golden(), 4 << 20, Origin::Saved)).expect("rebuild");
    vmm.save(None).expect("save the paused VM");
    let (first, mut first_fds) = vmm.handover().expect("hand over");
    let first_ticket = HandoverTicket::from_fd(first_fds.pop().expect("the ticket"));
    let (second, mut second_fds) = vmm.handover().expect("hand over again");
    let second_ticket = HandoverTicket::from_fd(second_fds.pop().expect("the ticket"));
    assert_ne!(first.token, second.token);
    assert_eq!(first_ticket.read().unwrap(), TicketState::Withdrawn);
    assert_eq!(second_ticket.read().unwrap(), TicketState::Open);
    assert!(matches!(
        vmm.complete_handover(&first.token),
        Err(VmmError::WrongToken)
    ));
    vmm.complete_handover(&second.token)
        .expect("the later target took it");
    assert_eq!(second_ticket.read().unwrap(), TicketState::Completed);
    vmm.request_shutdown(false)
        .expect("a VM handed over may shut down");
}

#[test]
fn a_target_built_ahead_gets_the_ram_first_and_the_state_when_it_asks() {
    let kvm = kvm();
    let mut vmm = build_from_saved(&kvm, args(golden(), 4 << 20, Origin::Saved)).expect("rebuild");
    let (staged, fds) = vmm.stage_handover().expect("stage");
    assert_eq!(staged.memory, vmm.status().memory);
    assert_eq!(fds.len(), 1, "one RAM memfd");
    assert_eq!(vmm.phase(), VmPhase::Paused, "staging changes nothing");
    // Paused without a current state: the handover saves one first, and says how long it took.
    let (manifest, _fds) = vmm.pause_and_hand_over().expect("hand over");
    assert!(manifest.pause_to_saved_us.is_some());
    assert_eq!(vmm.phase(), VmPhase::HandingOver);
    // A later target may stage while the first one holds the handover.
    vmm.stage_handover().expect("stage while handing over");
    vmm.complete_handover(&manifest.token).expect("taken");
    assert!(matches!(
        vmm.stage_handover(),
        Err(VmmError::WrongPhase {
            phase: VmPhase::HandedOver,
            ..
        })
    ));
}

#[test]
fn a_phase_reads_as_the_api_spells_it() {
    for phase in [
        VmPhase::Running,
        VmPhase::Paused,
        VmPhase::HandingOver,
        VmPhase::HandedOver,
        VmPhase::Preserved,
        VmPhase::Stopped,
        VmPhase::ShuttingDown,
    ] {
        let json = serde_json::to_string(&phase).expect("a phase serializes");
        assert_eq!(json, format!("\"{phase}\""));
    }
    let refused = VmmError::WrongPhase {
        request: "resume",
        phase: VmPhase::HandedOver,
    };
    assert_eq!(
        refused.to_string(),
        "cannot resume while the VM is handed_over"
    );
}
