//! The update flow against fakes: a VM that records what is done to it, and an in-memory LUO
//! host and agent (`luvmm_liveupdate::fake`). The retrieve tests open `/dev/kvm` (the state's
//! vCPU count is checked against this host's KVM).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use luvmm_liveupdate::agent::VmPhase as AgentPhase;
use luvmm_liveupdate::fake::{FakeHost, Faults};
use luvmm_liveupdate::luo::Token;
use luvmm_liveupdate::seams::UpdateAgent;
use luvmm_resources::config::{LaunchRecord, SerialOutput};
use luvmm_resources::state::{
    self, UpdateRecord, VmState, DEVICE_TOKEN_BASE, RAM_TOKEN_BASE, STATE_TOKEN,
};
use nix::sys::memfd::{memfd_create, MFdFlags};

use super::cancel::{cancel, follow_agent};
use super::finish::{finish_session, report_failed};
use super::prepare::{prepare, PrepareOptions};
use super::release::{release, ReleaseError};
use super::retrieve::{retrieve, ClaimError, HostDeviceError, RetrieveError, StateRefused};
use super::stage::stage;
use super::vm::UpdateVm;
use super::UpdateError;
use crate::passthrough::{DeviceFile, QuiesceError};
use crate::vmm::{PreparedUpdate, VmPhase, VmmError};
use crate::vstate::x86_64::compat::{this_host_cpu, CpuMismatch};
use crate::vstate::x86_64::host_kvm::HostKvm;

const SESSION: &str = "luvmm-vm1";
const DEV1: &str = "0000:00:03.0";
const DEV2: &str = "0000:00:04.0";

fn memfd(name: &str, contents: &[u8]) -> File {
    let mut file = File::from(memfd_create(name, MFdFlags::MFD_CLOEXEC).expect("memfd"));
    file.write_all(contents).expect("write memfd");
    file
}

/// A step of a prepare on the VM's side that can be made to fail.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum VmStep {
    Pause,
    Quiesce,
    Save,
}

/// A VM with two RAM memfds and two devices (memfds stand in for their cdevs).
struct FakeVm {
    phase: VmPhase,
    ram: Vec<File>,
    devices: Vec<(String, File)>,
    fails: Option<VmStep>,
    quiesced: bool,
    saved: Option<UpdateRecord>,
    prepared: Option<PreparedUpdate>,
}

impl FakeVm {
    fn running() -> FakeVm {
        FakeVm {
            phase: VmPhase::Running,
            ram: vec![memfd("ram0", b"low"), memfd("ram1", b"high")],
            devices: vec![
                (DEV1.into(), memfd("dev1", b"")),
                (DEV2.into(), memfd("dev2", b"")),
            ],
            fails: None,
            quiesced: false,
            saved: None,
            prepared: None,
        }
    }

    fn injected(&self, step: VmStep) -> bool {
        self.fails == Some(step)
    }
}

impl UpdateVm for FakeVm {
    fn phase(&self) -> VmPhase {
        self.phase
    }

    fn set_phase(&mut self, phase: VmPhase) {
        self.phase = phase;
    }

    fn ram_files(&self) -> Vec<BorrowedFd<'_>> {
        self.ram.iter().map(AsFd::as_fd).collect()
    }

    fn ram_mib(&self) -> u64 {
        2
    }

    fn device_files(&self) -> std::io::Result<Vec<DeviceFile>> {
        self.devices
            .iter()
            .map(|(bdf, file)| {
                Ok(DeviceFile {
                    bdf: bdf.clone(),
                    in_d0: true,
                    fd: Some(file.as_fd().try_clone_to_owned()?),
                })
            })
            .collect()
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        if self.injected(VmStep::Pause) {
            return Err(VmmError::UnexpectedAnswer {
                id: 0,
                request: "pause",
                answer: "injected".into(),
            });
        }
        self.phase = VmPhase::Paused;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        self.phase = VmPhase::Running;
        Ok(())
    }

    fn quiesce_devices(&mut self) -> Result<(), QuiesceError> {
        if self.injected(VmStep::Quiesce) {
            return Err(QuiesceError::NotInD0 { bdf: DEV2.into() });
        }
        self.quiesced = true;
        Ok(())
    }

    fn rearm_devices(&mut self) {
        self.quiesced = false;
    }

    fn save_for_update(&mut self, update: UpdateRecord) -> Result<File, VmmError> {
        if self.injected(VmStep::Save) {
            return Err(VmmError::StateMemfd(std::io::Error::other("injected")));
        }
        self.saved = Some(update);
        Ok(memfd("state", b"state"))
    }

    fn prepared(&mut self) -> &mut Option<PreparedUpdate> {
        &mut self.prepared
    }

    fn launch(&self) -> Option<serde_json::Value> {
        let launch = LaunchRecord::new(
            &SerialOutput::File("/var/log/vm1.log".into()),
            Some(Path::new("/run/luvmm/vm1.sock")),
        );
        serde_json::to_value(launch).ok()
    }
}

fn options(require_preserved_devices: bool) -> PrepareOptions<'static> {
    PrepareOptions {
        vm_id: "vm1",
        require_preserved_devices,
    }
}

fn faults(edit: impl FnOnce(&mut Faults)) -> Faults {
    let mut faults = Faults::default();
    edit(&mut faults);
    faults
}

/// After a failed or cancelled prepare: the guest runs, its devices' interrupts are on, and
/// nothing stays preserved or known to the agent.
fn assert_called_off(vm: &FakeVm, host: &FakeHost, what: &str) {
    assert_eq!(vm.phase, VmPhase::Running, "{what}: the guest runs again");
    assert!(!vm.quiesced, "{what}: the devices' interrupts are on again");
    assert!(vm.prepared.is_none(), "{what}: no update is held");
    assert!(
        host.preserved(SESSION).is_empty(),
        "{what}: still preserved: {:?}",
        host.preserved(SESSION)
    );
    assert!(
        host.ledger().vms.is_empty(),
        "{what}: the agent still has {:?}",
        host.ledger().vms
    );
}

#[test]
fn a_prepare_preserves_ram_then_devices_then_the_state_and_leaves_the_vm_preserved() {
    let host = FakeHost::new();
    let mut vm = FakeVm::running();
    let report = prepare(&mut vm, Box::new(host.agent()), &options(true)).expect("prepare");
    assert_eq!(vm.phase, VmPhase::Preserved);
    assert!(vm.quiesced && vm.prepared.is_some());
    assert_eq!(report.session, SESSION);
    assert!(report.devices.iter().all(|d| d.preserved));
    let log: Vec<String> = host
        .take_log()
        .into_iter()
        .filter(|l| l.starts_with("preserve"))
        .collect();
    assert_eq!(
        log,
        [
            "preserve luvmm-vm1 0x100",
            "preserve luvmm-vm1 0x101",
            "preserve luvmm-vm1 0x200",
            "preserve luvmm-vm1 0x201",
            "preserve luvmm-vm1 0x5",
        ],
        "RAM first (guest running), the state last"
    );
    let saved = vm.saved.as_ref().expect("state saved");
    assert_eq!(
        saved.device_tokens,
        [Some(DEVICE_TOKEN_BASE), Some(DEVICE_TOKEN_BASE + 1)]
    );
    assert!(saved.times_ms.contains_key("pause"));
    let ledger = host.ledger();
    assert_eq!(ledger.vms[0].phase, AgentPhase::Ready);
    assert_eq!(ledger.vms[0].devices, [DEV1, DEV2]);
    // What the VMM was launched with waits in the ledger for the restore.
    let launch: LaunchRecord =
        serde_json::from_value(ledger.vms[0].launch.clone().expect("a launch record"))
            .expect("the record decodes");
    assert_eq!(
        launch.api_socket.as_deref(),
        Some(Path::new("/run/luvmm/vm1.sock"))
    );
    assert_eq!(launch.serial, SerialOutput::File("/var/log/vm1.log".into()));
}

#[test]
fn a_device_the_kernel_cannot_preserve_is_marked_or_refused_with_require() {
    let enoent = || {
        faults(|f| {
            f.not_preservable.insert(DEVICE_TOKEN_BASE + 1);
        })
    };
    let host = FakeHost::new();
    host.set_faults(enoent());
    let mut vm = FakeVm::running();
    let report = prepare(&mut vm, Box::new(host.agent()), &options(false)).expect("prepare");
    assert_eq!(
        report
            .devices
            .iter()
            .map(|d| (d.bdf.as_str(), d.preserved))
            .collect::<Vec<_>>(),
        [(DEV1, true), (DEV2, false)]
    );
    let tokens = &vm.saved.as_ref().expect("state saved").device_tokens;
    assert_eq!(tokens, &[Some(DEVICE_TOKEN_BASE), None]);

    let host = FakeHost::new();
    host.set_faults(enoent());
    let mut vm = FakeVm::running();
    match prepare(&mut vm, Box::new(host.agent()), &options(true)) {
        Err(UpdateError::DeviceNotPreserved { bdf }) => assert_eq!(bdf, DEV2),
        other => panic!("{other:?}"),
    }
    assert_called_off(&vm, &host, "refused with --require-preserved-devices");
}

#[test]
fn a_prepare_refused_by_the_preflight_touches_nothing() {
    let host = FakeHost::new();
    host.set_faults(faults(|f| {
        f.device_handler = Some(luvmm_liveupdate::luo::probe::HandlerStatus::Absent);
    }));
    let mut vm = FakeVm::running();
    let refused = prepare(&mut vm, Box::new(host.agent()), &options(true));
    assert!(matches!(
        refused,
        Err(UpdateError::DeviceNotPreserved { .. })
    ));
    assert!(
        !host.take_log().iter().any(|l| l.contains("subscribe")),
        "no session was asked for"
    );
    assert_called_off(&vm, &host, "pre-flight refusal");
}

#[test]
fn a_failure_at_any_step_of_a_prepare_leaves_the_guest_running_with_nothing_preserved() {
    let token_fails = |token: Token| {
        faults(move |f| {
            f.preserve_fails.insert(token);
        })
    };
    let agent_refuses = |op: &'static str| {
        faults(move |f| {
            f.agent_refuses = BTreeSet::from([op]);
        })
    };
    let cases: Vec<(&str, Faults, Option<VmStep>)> = vec![
        ("subscribe", agent_refuses("subscribe"), None),
        ("preserve RAM", token_fails(RAM_TOKEN_BASE + 1), None),
        ("pause", Faults::default(), Some(VmStep::Pause)),
        ("quiesce devices", Faults::default(), Some(VmStep::Quiesce)),
        ("preserve a device", token_fails(DEVICE_TOKEN_BASE), None),
        ("save the state", Faults::default(), Some(VmStep::Save)),
        ("preserve the state", token_fails(STATE_TOKEN), None),
        ("ready", agent_refuses("ready"), None),
    ];
    for (step, host_faults, vm_fails) in cases {
        let host = FakeHost::new();
        host.set_faults(host_faults);
        let mut vm = FakeVm::running();
        vm.fails = vm_fails;
        let result = prepare(&mut vm, Box::new(host.agent()), &options(false));
        assert!(result.is_err(), "{step}: the prepare must fail");
        assert_called_off(&vm, &host, step);
    }
}

#[test]
fn a_cancel_is_refused_unless_preserved_and_then_resumes_the_guest() {
    let host = FakeHost::new();
    let mut vm = FakeVm::running();
    assert!(matches!(
        cancel(&mut vm),
        Err(VmmError::WrongPhase {
            phase: VmPhase::Running,
            ..
        })
    ));
    vm.phase = VmPhase::Paused;
    assert!(
        cancel(&mut vm).is_err(),
        "a paused VM has nothing to cancel"
    );
    vm.phase = VmPhase::Running;
    prepare(&mut vm, Box::new(host.agent()), &options(false)).expect("prepare");
    cancel(&mut vm).expect("cancel");
    assert_called_off(&vm, &host, "cancel");
    assert!(
        cancel(&mut vm).is_err(),
        "a second cancel has nothing to cancel"
    );
}

#[test]
fn a_preserved_vm_follows_the_agent_call_off_and_waits_while_it_does_not_answer() {
    let host = FakeHost::new();
    let mut vm = FakeVm::running();
    prepare(&mut vm, Box::new(host.agent()), &options(false)).expect("prepare");
    host.set_faults(faults(|f| {
        f.agent_refuses = BTreeSet::from(["status"]);
    }));
    follow_agent(&mut vm);
    assert_eq!(
        vm.phase,
        VmPhase::Preserved,
        "an agent that does not answer"
    );
    host.set_faults(Faults::default());
    follow_agent(&mut vm);
    assert_eq!(vm.phase, VmPhase::Preserved, "the update still goes on");
    host.call_off_all();
    follow_agent(&mut vm);
    assert_eq!(vm.phase, VmPhase::Running);
    assert!(!vm.quiesced && vm.prepared.is_none());
    assert!(host.preserved(SESSION).is_empty());
}

#[test]
fn a_staged_vm_runs_on_with_only_its_ram_preserved_and_its_prepare_does_the_rest() {
    let host = FakeHost::new();
    let mut vm = FakeVm::running();
    let staged = stage(&mut vm, Box::new(host.agent()), &options(false)).expect("stage");
    assert_eq!(vm.phase, VmPhase::Running, "the guest runs on");
    assert!(!vm.quiesced && vm.saved.is_none());
    assert!(staged.phases_ms.contains_key("preserve_ram"));
    assert_eq!(host.ledger().vms[0].phase, AgentPhase::Subscribed);
    assert_eq!(
        host.preserved(SESSION).len(),
        2,
        "the two RAM memfds and nothing else"
    );
    // A second stage, or a prepare under another id, is refused and changes nothing.
    assert!(matches!(
        stage(&mut vm, Box::new(host.agent()), &options(false)),
        Err(UpdateError::AlreadyStaged { .. })
    ));
    let other = PrepareOptions {
        vm_id: "vm2",
        require_preserved_devices: false,
    };
    assert!(matches!(
        prepare(&mut vm, Box::new(host.agent()), &other),
        Err(UpdateError::StagedAs { .. })
    ));
    assert_eq!(vm.phase, VmPhase::Running);
    host.take_log();

    let report = prepare(&mut vm, Box::new(host.agent()), &options(false)).expect("prepare");
    assert_eq!(vm.phase, VmPhase::Preserved);
    let log: Vec<String> = host
        .take_log()
        .into_iter()
        .filter(|l| l.starts_with("preserve") || l.contains("subscribe"))
        .collect();
    assert_eq!(
        log,
        [
            "preserve luvmm-vm1 0x200",
            "preserve luvmm-vm1 0x201",
            "preserve luvmm-vm1 0x5",
        ],
        "no second subscription or RAM preserve: the devices and the state only"
    );
    assert_eq!(
        report.phases_ms.get("preserve_ram"),
        staged.phases_ms.get("preserve_ram"),
        "the stage's RAM preserve is reported as the prepare's first phase"
    );
    assert_eq!(host.ledger().vms[0].phase, AgentPhase::Ready);
}

#[test]
fn a_staged_update_called_off_leaves_the_guest_as_it_was() {
    // By the operator: a running guest runs on, a paused one stays paused.
    for paused in [false, true] {
        let host = FakeHost::new();
        let mut vm = FakeVm::running();
        if paused {
            vm.phase = VmPhase::Paused;
        }
        stage(&mut vm, Box::new(host.agent()), &options(false)).expect("stage");
        cancel(&mut vm).expect("cancel a staged update");
        let expected = if paused {
            VmPhase::Paused
        } else {
            VmPhase::Running
        };
        assert_eq!(vm.phase, expected);
        vm.phase = VmPhase::Running;
        assert_called_off(&vm, &host, "a staged update cancelled");
    }
    // By the agent (a deadline passed).
    let host = FakeHost::new();
    let mut vm = FakeVm::running();
    stage(&mut vm, Box::new(host.agent()), &options(false)).expect("stage");
    follow_agent(&mut vm);
    assert!(vm.prepared.is_some(), "the update still goes on");
    host.call_off_all();
    follow_agent(&mut vm);
    assert_called_off(&vm, &host, "a staged update the agent called off");
    // By a failed RAM preserve.
    let host = FakeHost::new();
    host.set_faults(faults(|f| {
        f.preserve_fails.insert(RAM_TOKEN_BASE + 1);
    }));
    let mut vm = FakeVm::running();
    assert!(stage(&mut vm, Box::new(host.agent()), &options(false)).is_err());
    assert_called_off(&vm, &host, "a failed stage");
}

#[test]
fn a_vm_is_told_of_a_call_off_and_asks_the_agent_only_once_the_telling_ended() {
    let asked = |host: &FakeHost| {
        host.take_log()
            .iter()
            .filter(|l| l.as_str() == "agent status vm1")
            .count()
    };
    // Told: ticks with nothing new ask the agent nothing; the call-off is acted on.
    let host = FakeHost::new();
    let mut vm = FakeVm::running();
    prepare(&mut vm, Box::new(host.agent()), &options(false)).expect("prepare");
    host.take_log();
    for _ in 0..3 {
        follow_agent(&mut vm);
    }
    assert_eq!(asked(&host), 0, "nothing asked while the agent tells");
    assert_eq!(vm.phase, VmPhase::Preserved);
    host.call_off_all();
    follow_agent(&mut vm);
    assert_eq!(vm.phase, VmPhase::Running, "told of the call-off");
    assert!(vm.prepared.is_none());

    // The telling ended (the agent went away): the VM asks from then on, and still follows.
    let host = FakeHost::new();
    let mut vm = FakeVm::running();
    stage(&mut vm, Box::new(host.agent()), &options(false)).expect("stage");
    host.set_faults(faults(|f| {
        f.agent_refuses = BTreeSet::from(["watching"]);
    }));
    host.take_log();
    follow_agent(&mut vm);
    follow_agent(&mut vm);
    assert_eq!(
        asked(&host),
        2,
        "asked once per tick after the telling ended"
    );
    assert!(vm.prepared.as_ref().is_some_and(|p| p.watch.is_none()));
    host.call_off_all();
    follow_agent(&mut vm);
    assert_called_off(&vm, &host, "a call-off asked for");
}

/// A host after a kexec whose agent holds VM vm1's session: the golden 1.2 state (two vCPUs,
/// 4 MiB of RAM) saved for a live update, edited by `edit`, and a RAM memfd of its size.
fn after_kexec(edit: impl FnOnce(&mut VmState), devices: &[&str]) -> FakeHost {
    let mut saved: VmState =
        state::decode(include_bytes!("../../../tests/golden/1.2/state.bin")).expect("golden");
    // The golden state was taken on another machine: give it this host's TSC policy, CPUID
    // and MSRs, as a state saved here would have.
    let (cpuid, msrs) = this_host_cpu(&kvm());
    for vcpu in &mut saved.vcpus {
        vcpu.tsc_khz = None;
        vcpu.cpuid = cpuid.clone();
        vcpu.msrs = msrs.clone();
    }
    saved.update = Some(UpdateRecord {
        vm_id: "vm1".into(),
        device_tokens: Vec::new(),
        times_ms: [("pause".to_string(), 1_000)].into(),
    });
    edit(&mut saved);
    let blob = state::encode(&saved).expect("encode");
    after_kexec_with(&blob, devices)
}

/// This host's KVM, which the retrieve checks the state against.
fn kvm() -> kvm_ioctls::Kvm {
    kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm")
}

fn host_kvm() -> HostKvm {
    HostKvm::probe(&kvm()).expect("probe this host's KVM")
}

fn after_kexec_with(blob: &[u8], devices: &[&str]) -> FakeHost {
    let host = FakeHost::new();
    let agent = host.agent();
    let session = agent.subscribe("vm1", None).expect("subscribe");
    let ram = memfd("ram0", &vec![0x5a; 4 << 20]);
    session.preserve(ram.as_fd(), RAM_TOKEN_BASE).expect("ram");
    let state = memfd("state", blob);
    session.preserve(state.as_fd(), STATE_TOKEN).expect("state");
    let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    agent.ready("vm1", &devices).expect("ready");
    drop(session);
    host.kexec();
    host.take_log();
    host
}

#[test]
fn a_retrieve_takes_the_state_first_then_ram() {
    let host = after_kexec(|_| {}, &[]);
    let retrieved = retrieve("vm1", &host.agent(), &host_kvm()).expect("retrieve");
    assert_eq!(
        host.take_log(),
        [
            "agent status",
            "agent claim vm1",
            "retrieve luvmm-vm1 0x5",
            "retrieve luvmm-vm1 0x100",
            "agent kept vm1"
        ]
    );
    assert_eq!(retrieved.memfds.len(), 1);
    assert_eq!(retrieved.memfds[0].metadata().expect("size").len(), 4 << 20);
    assert!(retrieved.devices.is_empty());
    assert_eq!(
        retrieved.source_paused_at,
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
    );
    finish_session(retrieved.session.as_ref()).expect("finish");
    assert!(host.finished(SESSION));
}

#[test]
fn a_corrupt_state_is_refused_before_any_ram_is_retrieved() {
    let good = after_kexec(|_| {}, &[]);
    let retrieved = retrieve("vm1", &good.agent(), &host_kvm()).expect("the good state");
    let mut blob = state::encode(&retrieved.state).expect("encode");
    let last = blob.len() - 2;
    blob[last] ^= 0x01;
    let host = after_kexec_with(&blob, &[]);
    match retrieve("vm1", &host.agent(), &host_kvm()) {
        Err(RetrieveError::State {
            source: StateRefused::Decode(_),
            ..
        }) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(host.not_retrieved(SESSION), [RAM_TOKEN_BASE]);
}

#[test]
fn a_state_of_another_vm_is_refused() {
    let host = after_kexec(
        |s| {
            if let Some(update) = &mut s.update {
                update.vm_id = "vm2".into();
            }
        },
        &[],
    );
    assert!(matches!(
        retrieve("vm1", &host.agent(), &host_kvm()),
        Err(RetrieveError::State {
            source: StateRefused::OtherVm { .. },
            ..
        })
    ));
}

#[test]
fn nothing_lost_a_cpu_feature_this_host_lacks_is_refused_before_any_ram_is_retrieved() {
    let host = after_kexec(
        |s| {
            let leaf1 = s.vcpus[0]
                .cpuid
                .iter_mut()
                .find(|e| e.function == 1)
                .expect("leaf 1");
            // The lowest ECX feature bit this host does not offer (OSXSAVE and the hypervisor
            // bit aside).
            let lacking = (0..31)
                .map(|bit| 1u32 << bit)
                .find(|&bit| leaf1.ecx & bit == 0 && bit != 1 << 27)
                .expect("a feature this host lacks");
            leaf1.ecx |= lacking;
        },
        &[],
    );
    match retrieve("vm1", &host.agent(), &host_kvm()) {
        Err(RetrieveError::State {
            source:
                StateRefused::Cpu(CpuMismatch::Features {
                    leaf: 1, register, ..
                }),
            ..
        }) => assert_eq!(register, "ECX"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(host.not_retrieved(SESSION), [RAM_TOKEN_BASE]);
}

#[test]
fn a_missing_device_refuses_the_restore_before_the_claim() {
    let missing = "0000:7e:1f.7";
    let host = after_kexec(|_| {}, &[missing]);
    match retrieve("vm1", &host.agent(), &host_kvm()) {
        Err(RetrieveError::Claim(ClaimError::DevicesBeforeClaim {
            source: HostDeviceError::Missing { bdf },
            ..
        })) => assert_eq!(bdf, missing),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(host.take_log(), ["agent status"], "nothing was claimed");
    assert_eq!(host.ledger().vms[0].phase, AgentPhase::Incoming);
}

#[test]
fn a_failed_ram_retrieve_or_finish_is_reported() {
    let host = after_kexec(|_| {}, &[]);
    host.set_faults(faults(|f| {
        f.retrieve_fails.insert(RAM_TOKEN_BASE);
    }));
    match retrieve("vm1", &host.agent(), &host_kvm()) {
        Err(RetrieveError::Luo { what, .. }) => assert_eq!(what, "cannot retrieve a RAM memfd"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let host = after_kexec(|_| {}, &[]);
    let retrieved = retrieve("vm1", &host.agent(), &host_kvm()).expect("retrieve");
    host.set_faults(faults(|f| f.finish_busy = true));
    let refused = finish_session(retrieved.session.as_ref()).expect_err("FINISH is busy");
    assert!(refused.to_string().contains(SESSION));
    assert!(!host.finished(SESSION));
}

#[test]
fn each_blocker_has_a_stable_kind_in_json() {
    let blocker = super::check::Blocker::NotInD0 { bdf: DEV1.into() };
    let json = serde_json::to_value(&blocker).expect("json");
    assert_eq!(json["kind"], "not_in_d0");
    assert_eq!(json["bdf"], DEV1);
    let back: super::check::Blocker = serde_json::from_value(json).expect("back");
    assert_eq!(back, blocker);
}

#[test]
fn a_release_finishes_the_session_without_taking_the_ram() {
    let host = after_kexec(|_| {}, &[]);
    let report = release("vm1", &host.agent()).expect("release");
    assert_eq!(report.session, SESSION);
    assert!(report.devices.is_empty() && report.not_preserved.is_empty());
    assert!(host.finished(SESSION));
    assert!(
        !host.take_log().iter().any(|l| l.contains("0x100")),
        "guest RAM is never retrieved"
    );
    assert_eq!(host.ledger().vms[0].phase, AgentPhase::Finished);
}

#[test]
fn a_release_refuses_a_state_not_saved_for_an_update() {
    let host = after_kexec(|s| s.update = None, &[]);
    match release("vm1", &host.agent()) {
        Err(ReleaseError::State {
            source: StateRefused::NotForUpdate,
            ..
        }) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(!host.finished(SESSION));
}

#[test]
fn nothing_lost_a_release_whose_device_is_missing_is_refused_before_the_claim() {
    let missing = "0000:7e:1f.7";
    let host = after_kexec(|_| {}, &[missing]);
    match release("vm1", &host.agent()) {
        Err(ReleaseError::Claim(ClaimError::DevicesBeforeClaim {
            source: HostDeviceError::Missing { bdf },
            ..
        })) => assert_eq!(bdf, missing),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(host.take_log(), ["agent status"], "nothing was claimed");
    assert_eq!(host.ledger().vms[0].phase, AgentPhase::Incoming);
}

#[test]
fn nothing_lost_a_restore_that_fails_after_its_claim_can_be_run_again() {
    let host = after_kexec(|_| {}, &[]);
    let agent = host.agent();
    // The first restore gets everything, writes to guest RAM, then fails (its build, say).
    let first = retrieve("vm1", &agent, &host_kvm()).expect("retrieve");
    first.memfds[0]
        .write_all_at(b"written by the first restore", 0)
        .expect("write");
    let failure = std::io::Error::other("the build failed");
    report_failed(&agent, "vm1", &failure);
    assert_eq!(host.ledger().vms[0].phase, AgentPhase::Failed);
    assert_eq!(
        host.ledger().vms[0].failure.as_deref(),
        Some("the build failed")
    );
    drop(first);
    // The next restore gets the same session and the same RAM: nothing was lost.
    let second = retrieve("vm1", &agent, &host_kvm()).expect("retrieve again");
    let mut back = [0u8; 28];
    second.memfds[0].read_exact_at(&mut back, 0).expect("read");
    assert_eq!(&back, b"written by the first restore");
    finish_session(second.session.as_ref()).expect("finish");
    agent.finished("vm1").expect("finished");
    assert_eq!(host.ledger().vms[0].claims, 2);

    // A restore whose state is refused after the claim says so to the agent, which keeps the
    // session claimable.
    let host = after_kexec(
        |s| {
            if let Some(update) = &mut s.update {
                update.vm_id = "vm2".into();
            }
        },
        &[],
    );
    assert!(retrieve("vm1", &host.agent(), &host_kvm()).is_err());
    let record = &host.ledger().vms[0];
    assert_eq!(record.phase, AgentPhase::Failed);
    assert!(
        record
            .failure
            .as_deref()
            .is_some_and(|f| f.contains("VM \"vm2\"'s")),
        "{record:?}"
    );
}
