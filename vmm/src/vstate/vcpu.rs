//! vCPUs: one thread each, driven by events over a channel.
//!
//! A vCPU thread starts paused. The VMM sends [`VcpuEvent`]s and waits for the matching
//! [`VcpuResponse`]; to reach a thread that sits in `KVM_RUN`, it also sends a real-time
//! signal whose handler sets `immediate_exit`, so the signal cannot be lost between the thread's
//! last look at its channel and its next `KVM_RUN`.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use luvmm_resources::config::CpuTemplate;
use luvmm_resources::state::VcpuState;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::exit::{RunError, RunExit};
use super::vm::KvmVm;
use super::x86_64::msr::{msrs_to_save, MsrError};
use super::x86_64::tsc_carry;
use super::x86_64::xsave::XsaveArea;
use super::x86_64::{regs, state, ArchError};
use crate::boot::BootEntry;
use crate::faults::{self, Fault};
use crate::seccomp::ThreadKind;
use luvmm_resources::errors::error_chain;

/// How long the VMM waits for a vCPU thread to answer an event.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A vCPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM's list of MSRs to save could not be read.
    #[error("cannot read the MSRs KVM saves")]
    MsrList(#[source] MsrError),
    /// The vCPU could not be created.
    #[error("vCPU {id}: KVM_CREATE_VCPU failed")]
    Create {
        id: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A fresh vCPU could not be set up for boot.
    #[error("vCPU {id}: cannot set up for boot")]
    Boot {
        id: u32,
        #[source]
        source: ArchError,
    },
    /// The vCPU's state could not be read.
    #[error("vCPU {id}: cannot save its state")]
    Save {
        id: u32,
        #[source]
        source: ArchError,
    },
    /// A saved state could not be given to the vCPU.
    #[error("vCPU {id}: cannot restore its state")]
    Restore {
        id: u32,
        #[source]
        source: ArchError,
    },
    /// The vCPU thread could not be started.
    #[error("vCPU {id}: cannot start thread")]
    Spawn {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    /// The vCPU thread could not be signalled.
    #[error("vCPU {id}: cannot signal thread")]
    Kick {
        id: u32,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// The vCPU thread did not answer in time.
    #[error("vCPU {id}: no answer within {RESPONSE_TIMEOUT:?}")]
    Timeout { id: u32 },
    /// The vCPU thread is gone.
    #[error("vCPU {id}: thread exited")]
    ThreadGone { id: u32 },
    /// The request does not fit the vCPU's run state.
    #[error("vCPU {id}: cannot {request} while {state:?}")]
    WrongState {
        id: u32,
        request: &'static str,
        state: RunState,
    },
}

/// What a vCPU thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Looping in `KVM_RUN`.
    Running,
    /// Waiting for an event; its state can be saved.
    Paused,
    /// The guest stopped (shutdown, fatal exit); only `Finish` is useful now.
    Stopped,
}

/// Requests from the VMM to a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    Pause,
    Resume,
    SaveState,
    Finish,
}

/// Answers from a vCPU thread.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Saved(Box<VcpuState>),
    Finished,
    Failed(VcpuError),
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(
    _signum: libc::c_int,
    _info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    IMMEDIATE_EXIT.with(|flag| {
        let ptr = flag.get();
        if !ptr.is_null() {
            // SAFETY: the pointer was set by this thread to its own live kvm_run mapping and is
            // cleared before that mapping goes away; a volatile byte store is signal safe.
            unsafe { std::ptr::write_volatile(ptr, 1) };
        }
    });
}

pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler; call once per process before starting vCPU threads.
pub fn register_kick_signal() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), kick_handler)
}

/// A vCPU that has been created and configured but not started.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    io: Arc<IoManager>,
    msrs_to_save: Arc<Vec<u32>>,
    xsave_area: XsaveArea,
    tsc_scaling: bool,
    /// KVM scales this vCPU's TSC (a restore gave it a rate beyond KVM's tolerance).
    tsc_scaled: bool,
    exit_evt: EventFd,
}

/// Everything a vCPU needs besides its id.
pub struct VcpuContext {
    /// The bus the vCPU forwards port and MMIO exits to.
    pub io: Arc<IoManager>,
    /// MSRs to save, from `KVM_GET_MSR_INDEX_LIST`.
    pub msrs_to_save: Arc<Vec<u32>>,
    /// KVM can run a vCPU's TSC at another rate than the host's (`KVM_CAP_TSC_CONTROL`).
    pub tsc_scaling: bool,
    /// Written when the guest stops on its own.
    pub exit_evt: EventFd,
}

impl VcpuContext {
    /// Reads the MSR list and the TSC scaling capability once for all vCPUs.
    pub fn new(kvm: &Kvm, io: Arc<IoManager>, exit_evt: EventFd) -> Result<VcpuContext, VcpuError> {
        let msrs = msrs_to_save(kvm).map_err(VcpuError::MsrList)?;
        Ok(VcpuContext {
            io,
            msrs_to_save: Arc::new(msrs),
            tsc_scaling: kvm.check_extension(Cap::TscControl),
            exit_evt,
        })
    }
}

impl Vcpu {
    /// Creates vCPU `id` on `vm`.
    pub fn new(vm: &KvmVm, id: u32, ctx: &VcpuContext) -> Result<Vcpu, VcpuError> {
        Vcpu::from_fd(vm, Vcpu::create_fd(vm, id)?, id, ctx)
    }

    /// Creates vCPU `id`'s KVM object on `vm`, which needs nothing but the VM: a handover's
    /// target makes it before the guest is paused.
    pub fn create_fd(vm: &KvmVm, id: u32) -> Result<VcpuFd, VcpuError> {
        vm.fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })
    }

    /// The vCPU `id` whose KVM object `fd` was created on `vm`.
    pub fn from_fd(vm: &KvmVm, fd: VcpuFd, id: u32, ctx: &VcpuContext) -> Result<Vcpu, VcpuError> {
        let exit_evt = ctx
            .exit_evt
            .try_clone()
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(Vcpu {
            id,
            fd,
            io: ctx.io.clone(),
            msrs_to_save: ctx.msrs_to_save.clone(),
            xsave_area: vm.xsave_area(),
            tsc_scaling: ctx.tsc_scaling,
            tsc_scaled: false,
            exit_evt,
        })
    }

    /// Sets up a fresh vCPU, one of `vcpus`, with `template`'s CPUID; `entry` for the boot
    /// vCPU only (see [`regs::configure_for_boot`]).
    pub fn configure_for_boot(
        &self,
        kvm: &Kvm,
        vcpus: u32,
        template: CpuTemplate,
        entry: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        regs::configure_for_boot(&self.fd, self.id, vcpus, template, kvm, entry).map_err(|source| {
            VcpuError::Boot {
                id: self.id,
                source,
            }
        })
    }

    /// Reads the whole architectural state (see [`state::save_state`]).
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        state::save_state(
            &self.fd,
            self.id,
            &self.msrs_to_save,
            self.xsave_area,
            self.tsc_scaled,
        )
        .map_err(|source| VcpuError::Save {
            id: self.id,
            source,
        })
    }

    /// Whether KVM scales this vCPU's TSC.
    pub fn tsc_scaled(&self) -> bool {
        self.tsc_scaled
    }

    /// Gives the vCPU's TSC `offset` from the host's (see [`tsc_carry`]).
    pub fn set_tsc_offset(&self, offset: u64) -> Result<(), VcpuError> {
        tsc_carry::write_tsc_offset(&self.fd, offset).map_err(|source| VcpuError::Restore {
            id: self.id,
            source: source.into(),
        })
    }

    /// Writes back a saved state, its TSC as `tsc` where given (see [`state::restore_state`]).
    pub fn restore_state(&mut self, saved: &VcpuState, tsc: Option<u64>) -> Result<(), VcpuError> {
        let restored =
            state::restore_state(&self.fd, saved, self.xsave_area, self.tsc_scaling, tsc);
        self.tsc_scaled = restored.map_err(|source| VcpuError::Restore {
            id: self.id,
            source,
        })?;
        Ok(())
    }

    /// Starts the vCPU thread, paused.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let (event_tx, event_rx) = channel();
        let (response_tx, response_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // Before any guest code: a vCPU that cannot be filtered never runs, and the
                // VMM's next request finds its thread gone.
                if let Err(e) = crate::seccomp::apply(ThreadKind::Vcpu, &format!("vcpu{id}")) {
                    log::error!("vCPU {id}: {}", error_chain(&e));
                    return;
                }
                self.run_loop(event_rx, response_tx)
            })
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            events: event_tx,
            responses: response_rx,
            thread: Some(thread),
        })
    }

    fn run_loop(mut self, events: Receiver<VcpuEvent>, responses: Sender<VcpuResponse>) {
        let flag = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        IMMEDIATE_EXIT.with(|cell| cell.set(flag));
        let mut state = RunState::Paused;
        loop {
            let event = if state == RunState::Running {
                match self.run_once() {
                    Ok(RunExit::Io | RunExit::Halt | RunExit::Kicked) => {}
                    Ok(stop) => {
                        log::error!("vCPU {}: guest stopped: {stop}", self.id);
                        state = self.stopped();
                        continue;
                    }
                    Err(RunError::KvmRun(e)) => {
                        log::error!(
                            "vCPU {}: guest stopped: KVM_RUN failed: {}",
                            self.id,
                            error_chain(&e)
                        );
                        state = self.stopped();
                        continue;
                    }
                }
                match events.try_recv() {
                    Ok(event) => event,
                    Err(TryRecvError::Empty) => continue,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match events.recv() {
                    Ok(event) => event,
                    Err(_) => break,
                }
            };
            let (next, response) = self.handle(event, state);
            state = next;
            let finished = matches!(response, VcpuResponse::Finished);
            if responses.send(response).is_err() || finished {
                break;
            }
        }
        IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
    }

    fn handle(&mut self, event: VcpuEvent, state: RunState) -> (RunState, VcpuResponse) {
        let wrong = |request| VcpuError::WrongState {
            id: self.id,
            request,
            state,
        };
        match (event, state) {
            (VcpuEvent::Pause, RunState::Running) => {
                self.complete_pending_io();
                (RunState::Paused, VcpuResponse::Paused)
            }
            (VcpuEvent::Pause, RunState::Paused) => (state, VcpuResponse::Paused),
            (VcpuEvent::Resume, RunState::Paused) => {
                self.tell_guest_it_was_paused();
                (RunState::Running, VcpuResponse::Resumed)
            }
            (VcpuEvent::Resume, RunState::Running) => (state, VcpuResponse::Resumed),
            (VcpuEvent::SaveState, RunState::Paused) => match self.save_state() {
                Ok(saved) => (state, VcpuResponse::Saved(Box::new(saved))),
                Err(e) => (state, VcpuResponse::Failed(e)),
            },
            (VcpuEvent::Finish, _) => (state, VcpuResponse::Finished),
            (VcpuEvent::Pause, _) => (state, VcpuResponse::Failed(wrong("pause"))),
            (VcpuEvent::Resume, _) => (state, VcpuResponse::Failed(wrong("resume"))),
            (VcpuEvent::SaveState, _) => (state, VcpuResponse::Failed(wrong("save state"))),
        }
    }

    /// Sets the "stopped" flag in the guest's kvmclock page (`KVM_KVMCLOCK_CTRL`), as QEMU
    /// does on every resume: a Linux guest's soft-lockup and RCU-stall detectors then take
    /// the pause for what it was, not for a CPU stuck for the length of the blackout. A guest
    /// that never set up kvmclock (luvmm's test payload) makes KVM answer EINVAL: nothing
    /// to tell it.
    fn tell_guest_it_was_paused(&self) {
        if faults::armed(Fault::NoKvmclockCtrl) {
            return;
        }
        match self.fd.kvmclock_ctrl() {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINVAL => {}
            Err(e) => log::warn!("vCPU {}: KVM_KVMCLOCK_CTRL failed: {e}", self.id),
        }
    }

    /// A port-in exit is only complete once KVM_RUN is entered again; with immediate_exit set
    /// KVM finishes the instruction and returns at once, so the saved RIP is past it.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Tells the VMM the guest stopped on its own; the thread now only waits for `Finish`.
    fn stopped(&self) -> RunState {
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("vCPU {}: cannot signal exit: {}", self.id, error_chain(&e));
        }
        RunState::Stopped
    }

    /// One `KVM_RUN`, its port or MMIO access served on the bus. A guest access no device
    /// claims reads as all ones and writes nowhere, as on a PC bus.
    fn run_once(&mut self) -> Result<RunExit, RunError> {
        let io = &self.io;
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if io.pio_read(PioAddress(port), data).is_err() {
                    data.fill(0xff);
                }
                RunExit::Io
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let _ = io.pio_write(PioAddress(port), data);
                RunExit::Io
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if io.mmio_read(MmioAddress(addr), data).is_err() {
                    data.fill(0xff);
                }
                RunExit::Io
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let _ = io.mmio_write(MmioAddress(addr), data);
                RunExit::Io
            }
            Ok(VcpuExit::Hlt) => RunExit::Halt,
            Ok(VcpuExit::Shutdown) => RunExit::Shutdown,
            Ok(VcpuExit::SystemEvent(kind, _)) => RunExit::SystemEvent { kind },
            Ok(VcpuExit::FailEntry(reason, cpu)) => RunExit::FailEntry { reason, cpu },
            Ok(VcpuExit::InternalError) => RunExit::internal_error(self.fd.get_kvm_run()),
            Ok(_) => RunExit::Unhandled {
                exit_reason: self.fd.get_kvm_run().exit_reason,
            },
            // A kick: the signal handler set immediate_exit, which stays set until cleared.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                RunExit::Kicked
            }
            Err(e) => return Err(RunError::KvmRun(e)),
        };
        Ok(exit)
    }
}

/// The VMM's side of a running vCPU thread.
pub struct VcpuHandle {
    id: u32,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `event`, kicks the thread out of `KVM_RUN`, and waits for the answer.
    pub fn request(&self, event: VcpuEvent) -> Result<VcpuResponse, VcpuError> {
        let id = self.id;
        self.events
            .send(event)
            .map_err(|_| VcpuError::ThreadGone { id })?;
        if let Some(thread) = &self.thread {
            thread
                .kill(kick_signal())
                .map_err(|source| VcpuError::Kick { id, source })?;
        }
        match self.responses.recv_timeout(RESPONSE_TIMEOUT) {
            Ok(VcpuResponse::Failed(e)) => Err(e),
            Ok(response) => Ok(response),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout { id }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::ThreadGone { id }),
        }
    }

    /// This vCPU's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Ends the thread and joins it.
    pub fn finish(mut self) {
        if let Err(e) = self.request(VcpuEvent::Finish) {
            log::warn!("vCPU {}: finish: {}", self.id, error_chain(&e));
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("vCPU {}: thread panicked", self.id);
            }
        }
    }
}
