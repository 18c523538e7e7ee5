//! The VMM's event loop on event-manager: the API socket, serial input from stdin, the guest's
//! exit and pause requests, and a prepared live update's check on the agent.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// How often a prepared VM asks the agent whether its update still goes on.
const UPDATE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

use luvmm_devices::power::PowerRequest;
use luvmm_devices::serial::SerialDevice;
use luvmm_resources::errors::error_chain;
use luvmm_resources::sync::lock;

use crate::api::server::{ApiServer, ApiSocket, ApiSocketError};
use crate::seccomp::{SeccompError, ThreadKind};
use crate::vmm::{VmPhase, Vmm, VmmError};

/// Why the event loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// Shutdown was requested through the API.
    Shutdown,
    /// The guest powered itself off (ACPI S5).
    GuestPoweredOff,
    /// The guest reset itself (`reboot`): the VM ends, and whoever started it decides
    /// whether it boots again, as with Firecracker.
    GuestReset,
    /// The guest stopped on its own without asking (triple fault, fatal exit).
    GuestStopped,
}

/// The event loop could not run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Api(#[from] ApiSocketError),
    #[error("event loop failed: {0:?}")]
    EventManager(event_manager::Error),
    #[error("cannot start the guest")]
    Start(#[source] VmmError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot clone the VM's eventfds")]
    Events(#[source] std::io::Error),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// What wakes a `VmWatcher`: an eventfd someone writes, or a periodic timer.
enum Wakeup {
    Event(EventFd),
    Timer(TimerFd),
}

impl Wakeup {
    /// Consumes the wake-up, so the fd is quiet until the next one.
    fn drain(&mut self) {
        match self {
            Wakeup::Event(evt) => {
                let _ = evt.read();
            }
            Wakeup::Timer(timer) => {
                let _ = timer.wait();
            }
        }
    }
}

impl AsRawFd for Wakeup {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Wakeup::Event(evt) => evt.as_raw_fd(),
            Wakeup::Timer(timer) => timer.as_raw_fd(),
        }
    }
}

/// Runs `on_wakeup` on the VM each time `wakeup` fires: the guest stopped by itself (the
/// vCPUs' exit eventfd), the guest asked to be paused (guest-control port), or the second
/// passed after which a prepared live update asks the agent whether it still goes on.
struct VmWatcher {
    wakeup: Wakeup,
    what: &'static str,
    vmm: Arc<Mutex<Vmm>>,
    on_wakeup: VmAction,
}

impl MutEventSubscriber for VmWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wakeup, EventSet::IN)) {
            log::error!("cannot watch {}: {e:?}", self.what);
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.wakeup.drain();
        (self.on_wakeup)(&mut lock(&self.vmm));
    }
}

/// What a `VmWatcher` does to the VM when it wakes.
type VmAction = fn(&mut Vmm);

/// The guest asked to be paused: it is, if it runs.
fn pause_for_the_guest(vmm: &mut Vmm) {
    if vmm.phase() != VmPhase::Running {
        return;
    }
    match vmm.pause() {
        Ok(()) => log::info!("paused: the guest asked to be"),
        Err(e) => log::error!(
            "the guest asked to be paused, but the pause failed: {}",
            error_chain(&e)
        ),
    }
}

/// SIGINT and SIGTERM, which end the VMM cleanly (its API socket removed) instead of killing it.
fn exit_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
}

/// Blocks SIGINT and SIGTERM in this thread and in every thread it starts afterwards, so that
/// they wait for the event loop's signalfd: call it before any vCPU thread exists.
pub fn block_exit_signals() -> nix::Result<()> {
    exit_signals().thread_block()
}

/// Ends the event loop on SIGINT or SIGTERM, as `ctl shutdown` does.
struct ExitSignals {
    fd: SignalFd,
    vmm: Arc<Mutex<Vmm>>,
}

impl MutEventSubscriber for ExitSignals {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch SIGINT and SIGTERM: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Ok(Some(info)) = self.fd.read_signal() {
            log::info!("signal {}: shutting down", info.ssi_signo);
            // A signal is the operator's last word, as `ctl shutdown --force` is.
            if let Err(e) = lock(&self.vmm).request_shutdown(true) {
                log::error!("shutdown failed: {}", error_chain(&e));
            }
        }
    }
}

/// Feeds the VMM's standard input to the guest's COM1.
struct SerialInput {
    stdin: std::io::Stdin,
    serial: Arc<SerialDevice>,
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null; then the guest simply gets no input.
        if ops.add(Events::new(&self.stdin, EventSet::IN)).is_err() {
            log::debug!("standard input cannot be polled; the guest's COM1 gets no input");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut chunk = [0u8; 64];
        match self.stdin.lock().read(&mut chunk) {
            Ok(n) if n > 0 => {
                self.serial.enqueue_input(&chunk[..n]);
            }
            _ => {
                let _ = ops.remove(events);
            }
        }
    }
}

/// Resumes the guest, then runs `once_running` (work that must not lengthen the guest's
/// blackout), and serves events (the API on `api_socket`, bound by the caller) until a
/// shutdown request or the guest's own stop.
pub fn run(
    vmm: Vmm,
    api_socket: Option<ApiSocket>,
    once_running: impl FnOnce(),
) -> Result<Ending, RuntimeError> {
    let clone = |evt: &EventFd| evt.try_clone().map_err(RuntimeError::Events);
    let exit_evt = clone(&vmm.events().exit)?;
    let pause_evt = clone(&vmm.events().guest_pause)?;
    let serial = vmm.devices().serial.clone();
    let vmm = Arc::new(Mutex::new(vmm));
    let mut events: EventManager<Subscriber> =
        EventManager::new().map_err(RuntimeError::EventManager)?;
    let mut timer = TimerFd::new().map_err(|e| RuntimeError::Events(e.into()))?;
    timer
        .reset(UPDATE_POLL, Some(UPDATE_POLL))
        .map_err(|e| RuntimeError::Events(e.into()))?;
    let watchers: [(Wakeup, &'static str, VmAction); 3] = [
        (
            Wakeup::Event(exit_evt),
            "the guest exit event",
            Vmm::guest_stopped,
        ),
        (
            Wakeup::Event(pause_evt),
            "the guest's pause requests",
            pause_for_the_guest,
        ),
        (Wakeup::Timer(timer), "the live update's progress", |vmm| {
            crate::update::cancel::follow_agent(vmm)
        }),
    ];
    for (wakeup, what, on_wakeup) in watchers {
        events.add_subscriber(Arc::new(Mutex::new(VmWatcher {
            wakeup,
            what,
            vmm: vmm.clone(),
            on_wakeup,
        })));
    }
    let signals = SignalFd::with_flags(
        &exit_signals(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )
    .map_err(|e| RuntimeError::Events(e.into()))?;
    events.add_subscriber(Arc::new(Mutex::new(ExitSignals {
        fd: signals,
        vmm: vmm.clone(),
    })));
    events.add_subscriber(Arc::new(Mutex::new(SerialInput {
        stdin: std::io::stdin(),
        serial,
    })));
    if let Some(socket) = api_socket {
        events.add_subscriber(Arc::new(Mutex::new(ApiServer::new(socket, vmm.clone())?)));
    }
    // Every fd the loop serves exists: from here on this thread only serves them.
    crate::seccomp::apply(ThreadKind::EventLoop, "luvmm")?;
    lock(&vmm).resume().map_err(RuntimeError::Start)?;
    once_running();
    loop {
        events.run().map_err(RuntimeError::EventManager)?;
        // One lock for both questions: a guard held by a `match` scrutinee lives through the
        // arms, so a second `lock` in an arm would wait for ever.
        let (phase, asked) = {
            let vmm = lock(&vmm);
            (vmm.phase(), vmm.devices().power.requested())
        };
        match (phase, asked) {
            (VmPhase::ShuttingDown, _) => return Ok(Ending::Shutdown),
            (VmPhase::Stopped, Some(PowerRequest::Off)) => return Ok(Ending::GuestPoweredOff),
            (VmPhase::Stopped, Some(PowerRequest::Reset)) => return Ok(Ending::GuestReset),
            (VmPhase::Stopped, None) => return Ok(Ending::GuestStopped),
            _ => {}
        }
    }
}
