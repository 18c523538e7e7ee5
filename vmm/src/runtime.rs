//! The VMM's event loop on event-manager: the API socket, serial input from stdin, and the
//! guest's exit event.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// How often a prepared VM asks the agent whether its update still goes on.
const UPDATE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

use luvmm_devices::serial::SerialDevice;

use crate::api::server::{ApiServer, ApiSocketError};
use crate::vmm::{VmPhase, Vmm, VmmError};

/// Why the event loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// Shutdown was requested through the API.
    Shutdown,
    /// The guest stopped on its own (shutdown, triple fault, fatal exit).
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
    #[error("cannot clone the VM's eventfds")]
    Events(#[source] std::io::Error),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Watches the eventfd vCPUs write when the guest stops by itself.
struct GuestExitWatcher {
    evt: EventFd,
    vmm: Arc<Mutex<Vmm>>,
}

impl MutEventSubscriber for GuestExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch the guest exit event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.vmm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .guest_stopped();
    }
}

/// Pauses the VM when the guest asks (guest-control port).
struct GuestPauseWatcher {
    evt: EventFd,
    vmm: Arc<Mutex<Vmm>>,
}

impl MutEventSubscriber for GuestPauseWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch the guest's pause requests: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let mut vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
        if vmm.phase() != VmPhase::Running {
            return;
        }
        match vmm.pause() {
            Ok(()) => log::info!("paused: the guest asked to be"),
            Err(e) => log::error!("the guest asked to be paused, but the pause failed: {e}"),
        }
    }
}

/// While a live update is prepared, asks the agent every second whether it still goes on.
struct UpdateWatcher {
    timer: TimerFd,
    vmm: Arc<Mutex<Vmm>>,
}

impl MutEventSubscriber for UpdateWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("cannot watch the live update's progress: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.vmm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .follow_agent();
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

/// Resumes the guest and serves events until a shutdown request or the guest's own stop.
pub fn run(vmm: Vmm, api_socket: Option<&Path>) -> Result<Ending, RuntimeError> {
    let clone = |evt: &EventFd| evt.try_clone().map_err(RuntimeError::Events);
    let exit_evt = clone(&vmm.events().exit)?;
    let pause_evt = clone(&vmm.events().guest_pause)?;
    let serial = vmm.devices().serial.clone();
    let vmm = Arc::new(Mutex::new(vmm));
    let mut events: EventManager<Subscriber> =
        EventManager::new().map_err(RuntimeError::EventManager)?;
    events.add_subscriber(Arc::new(Mutex::new(GuestExitWatcher {
        evt: exit_evt,
        vmm: vmm.clone(),
    })));
    events.add_subscriber(Arc::new(Mutex::new(GuestPauseWatcher {
        evt: pause_evt,
        vmm: vmm.clone(),
    })));
    let mut timer = TimerFd::new().map_err(|e| RuntimeError::Events(e.into()))?;
    timer
        .reset(UPDATE_POLL, Some(UPDATE_POLL))
        .map_err(|e| RuntimeError::Events(e.into()))?;
    events.add_subscriber(Arc::new(Mutex::new(UpdateWatcher {
        timer,
        vmm: vmm.clone(),
    })));
    events.add_subscriber(Arc::new(Mutex::new(SerialInput {
        stdin: std::io::stdin(),
        serial,
    })));
    if let Some(path) = api_socket {
        events.add_subscriber(Arc::new(Mutex::new(ApiServer::bind(path, vmm.clone())?)));
    }
    vmm.lock()
        .unwrap_or_else(|p| p.into_inner())
        .resume()
        .map_err(RuntimeError::Start)?;
    loop {
        events.run().map_err(RuntimeError::EventManager)?;
        match vmm.lock().unwrap_or_else(|p| p.into_inner()).phase() {
            VmPhase::ShuttingDown => return Ok(Ending::Shutdown),
            VmPhase::Stopped => return Ok(Ending::GuestStopped),
            _ => {}
        }
    }
}
