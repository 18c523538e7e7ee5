//! systemd's fd store as the holder of a VM's LUO session, in place of the agent.
//!
//! systemd 261 and later carry a service's fd store across `systemctl kexec` through LUO
//! (`FileDescriptorStorePreserve=yes`): memfds in its own session, and a LUO session fd that
//! a service pushed as a session of its own, which PID 1 retrieves by name after the kexec
//! and hands back to the service under the same `FDNAME`. So on such a host each VMM, run as
//! `luvmm@ID.service`, opens `/dev/liveupdate` only to create its session (LUO admits one
//! opener at a time, and systemd needs the device at the kexec and at boot), pushes the
//! session into its fd store, and after the kexec gets it back at start. Nobody holds
//! `/dev/liveupdate` for long; no agent runs.
//!
//! [`FdStore`] is the VMM's holder ([`UpdateAgent`]) for that: the session under
//! `luvmm-session-BOOT` (the boot it was created in, so that a session this boot's VMM left
//! behind, exiting before any kexec, is told from one that crossed a kexec), a small record of what the restore checks first under
//! [`RECORD_FDNAME`] (a memfd, which systemd preserves in its own session), and the files a
//! failed restore leaves for the next try under `luvmm-kept-N`.

pub mod notify;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::agent::ledger::{session_of, VmPhase, VmRecord};
use crate::agent::{AgentClientError, KeptFiles, Ledger};
use crate::luo::probe::{self, HandlerStatus};
use crate::luo::{IncomingSession, LiveUpdate, LuoError};
use crate::seams::{PhaseWatch, PreserveSession, RetrieveSession, UpdateAgent};
use notify::NotifySocket;

/// The fd store name of the VM's LUO session, before the id of the boot that created it.
pub const SESSION_FDNAME: &str = "luvmm-session-";
/// The fd store name of the memfd with the VM's [`Record`].
pub const RECORD_FDNAME: &str = "luvmm-record";
/// The fd store name of the note of the files a failed restore kept.
const KEPT_NOTE_FDNAME: &str = "luvmm-kept-note";
/// Prefix of the fd store names of the kept files, in order: `luvmm-kept-0`, ...
const KEPT_FDNAME: &str = "luvmm-kept-";
/// Most files a restore keeps (an iommufd and a few more).
const MAX_KEPT: usize = 8;
/// How long systemd has to confirm a change of the store.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a VMM waits for `/dev/liveupdate` while another opener (a VMM creating its own
/// session, systemd at a kexec) has it.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// This boot's id, which the kernel makes anew at each boot (a kexec too).
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// How long a staged or prepared update may wait for its kexec before the VMM calls it off
/// by itself, unless told otherwise ([`FdStore::with_update_limit`]).
pub const DEFAULT_UPDATE_LIMIT: Duration = Duration::from_secs(300);

/// The first systemd that carries service fd stores across a kexec through LUO.
pub const FIRST_PRESERVING_SYSTEMD: u32 = 261;

/// The version of the systemd this host runs as PID 1, if it does: `systemctl --version`'s
/// first line is `systemd N (...)`.
pub fn host_systemd() -> Option<u32> {
    // Where systemd is PID 1 it made this directory (`sd_booted(3)`).
    if !std::path::Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    let out = std::process::Command::new("systemctl")
        .arg("--version")
        .output()
        .ok()?;
    parse_systemd_version(&String::from_utf8_lossy(&out.stdout))
}

/// N from `systemd N (...)`.
fn parse_systemd_version(text: &str) -> Option<u32> {
    text.lines()
        .next()?
        .strip_prefix("systemd ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether a systemd of `version` keeps the sessions of its services' fd stores across a
/// kexec.
pub fn preserves_fd_stores(version: Option<u32>) -> bool {
    version.is_some_and(|v| v >= FIRST_PRESERVING_SYSTEMD)
}

/// What the fd store could not do.
#[derive(Debug, thiserror::Error)]
pub enum FdStoreError {
    #[error(
        "this process has no fd store: run it as a systemd service with \
         FileDescriptorStoreMax= above 0 (NOTIFY_SOCKET and FDSTORE are unset)"
    )]
    NoStore,
    #[error("telling systemd {what}")]
    Notify {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("/dev/liveupdate stayed busy for {waited_ms} ms (another opener holds it)")]
    DeviceBusy { waited_ms: u128 },
    #[error("the VM's LUO session")]
    Luo(#[from] LuoError),
    #[error("systemd handed back no session for VM {vm} (no {SESSION_FDNAME}* in LISTEN_FDNAMES)")]
    NoSession { vm: String },
    #[error("the record {RECORD_FDNAME} systemd handed back")]
    Record(#[source] std::io::Error),
    #[error("cannot read this boot's id ({BOOT_ID})")]
    BootId(#[source] std::io::Error),
    #[error("more than {MAX_KEPT} files to keep for the next restore")]
    TooManyKept,
}

impl From<FdStoreError> for AgentClientError {
    fn from(e: FdStoreError) -> AgentClientError {
        AgentClientError::FdStore(Box::new(e))
    }
}

/// What the restore needs before it takes anything from the session, as the agent's ledger
/// has it: the devices the VM needs after the kexec, and what its VMM was launched with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub vm: String,
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<serde_json::Value>,
}

/// The VMM's holder on a host whose systemd preserves fd stores. Clones share the fds systemd
/// passed at start.
#[derive(Clone)]
pub struct FdStore {
    notify: NotifySocket,
    state: Arc<Mutex<State>>,
    /// No agent calls an update off where systemd holds the session: a staged or prepared
    /// update still waiting for its kexec this long after its stage (the command that drove
    /// it died, say) is called off by the VMM itself, its guest resumed in place.
    update_limit: Duration,
    /// The id of this boot, in the name the session is stored under.
    boot_id: String,
}

struct State {
    /// What systemd passed at start, by name; the session and the kept files stay here (a
    /// copy is handed out) until the VM is finished.
    passed: BTreeMap<String, Vec<OwnedFd>>,
    /// This VM's record of the update in progress, as a ledger's.
    record: Option<VmRecord>,
    /// Kept files pushed by this process.
    kept_pushed: usize,
}

impl FdStore {
    /// The holder of a process systemd runs with an fd store (`$NOTIFY_SOCKET` and a non-zero
    /// `$FDSTORE`), with the fds systemd passed it at start.
    pub fn from_env() -> Result<FdStore, FdStoreError> {
        let notify = store_socket(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            std::env::var("FDSTORE").ok().as_deref(),
        )?;
        let boot_id = std::fs::read_to_string(BOOT_ID).map_err(FdStoreError::BootId)?;
        let store = FdStore::new(notify, notify::take_listen_fds(), boot_id.trim());
        store.drop_left_behind()?;
        Ok(store)
    }

    /// The holder that tells `notify`, in boot `boot_id`, and starts with `passed`. A session
    /// passed with its record stands in the ledger as `incoming`, as the agent's would after
    /// the kexec. One this boot created was left by a VMM that exited before any kexec (see
    /// [`FdStore::drop_left_behind`]).
    pub fn new(notify: NotifySocket, passed: Vec<(String, OwnedFd)>, boot_id: &str) -> FdStore {
        let mut by_name: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
        for (name, fd) in passed {
            by_name.entry(name).or_default().push(fd);
        }
        let crossed = by_name
            .keys()
            .any(|n| n.starts_with(SESSION_FDNAME) && *n != session_fdname(boot_id));
        let record = match by_name.get(RECORD_FDNAME).and_then(|fds| fds.first()) {
            Some(fd) if crossed => match read_record(fd.as_fd()) {
                Ok(record) => Some(incoming(record)),
                Err(e) => {
                    log::warn!("the record systemd handed back is unreadable: {e}");
                    None
                }
            },
            _ => None,
        };
        FdStore {
            notify,
            state: Arc::new(Mutex::new(State {
                passed: by_name,
                record,
                kept_pushed: 0,
            })),
            update_limit: DEFAULT_UPDATE_LIMIT,
            boot_id: boot_id.to_string(),
        }
    }

    /// Drops a session this boot created, and what was stored beside it, if systemd passed
    /// one: its VMM exited (a crash, `systemctl restart`) before any kexec, the guest with
    /// it. LUO retrieves nothing from a session before a kexec, so no restore could use it;
    /// kept, it would make every start try one, and carry a stale VM across the next kexec.
    /// The VM boots afresh from its config.
    pub fn drop_left_behind(&self) -> Result<(), FdStoreError> {
        let ours = session_fdname(&self.boot_id);
        if !self.state().passed.contains_key(&ours) {
            return Ok(());
        }
        log::warn!(
            "the VM's session of this boot was left in the fd store by a VMM that exited before \
             the kexec (its guest went with it): dropped; the VM boots afresh"
        );
        self.drop_update()?;
        self.state().passed.clear();
        Ok(())
    }

    /// The name and fd of a session systemd passed that crossed a kexec.
    fn passed_session<'a>(&self, state: &'a State) -> Option<(&'a String, &'a OwnedFd)> {
        let ours = session_fdname(&self.boot_id);
        state
            .passed
            .iter()
            .filter(|(name, _)| name.starts_with(SESSION_FDNAME) && **name != ours)
            .find_map(|(name, fds)| Some((name, fds.first()?)))
    }

    /// The same holder, calling an update off by itself after `limit` (see `update_limit`).
    pub fn with_update_limit(self, limit: Duration) -> FdStore {
        FdStore {
            update_limit: limit,
            ..self
        }
    }

    /// Whether systemd handed a session back at start: a restore waits.
    pub fn session_waits(&self) -> bool {
        self.passed_session(&self.state()).is_some()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pushes `fd` under `name`, replacing what the store had under it.
    fn push(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), FdStoreError> {
        self.remove(name)?;
        let state = format!("FDSTORE=1\nFDNAME={name}");
        self.notify
            .send(&state, &[fd])
            .map_err(|source| FdStoreError::Notify {
                what: "to store an fd",
                source,
            })
    }

    /// Drops what the store has under `name`.
    fn remove(&self, name: &str) -> Result<(), FdStoreError> {
        let state = format!("FDSTOREREMOVE=1\nFDNAME={name}");
        self.notify
            .send(&state, &[])
            .map_err(|source| FdStoreError::Notify {
                what: "to drop an fd",
                source,
            })
    }

    /// Waits until systemd handled every change sent so far: a VMM that exits right after
    /// must not take a session with it that systemd has not taken yet.
    fn settle(&self) -> Result<(), FdStoreError> {
        self.notify
            .barrier(BARRIER_TIMEOUT)
            .map_err(|source| FdStoreError::Notify {
                what: "to confirm the fd store's changes",
                source,
            })
    }

    /// Moves the VM's record to `phase`, made anew for a VM this process had none for.
    fn record_phase(&self, vm: &str, phase: VmPhase) -> VmRecord {
        let mut state = self.state();
        let record = match &mut state.record {
            Some(record) if record.vm == vm => record,
            other => other.insert(incoming(Record {
                vm: vm.to_string(),
                ..Record::default()
            })),
        };
        record.phase = phase;
        record
            .times_ms
            .insert(phase_key(phase).to_string(), now_ms());
        record.clone()
    }

    fn drop_update(&self) -> Result<(), FdStoreError> {
        let passed: Vec<String> = self
            .state()
            .passed
            .keys()
            .filter(|n| n.starts_with(SESSION_FDNAME))
            .cloned()
            .collect();
        for name in passed {
            self.remove(&name)?;
        }
        self.remove(&session_fdname(&self.boot_id))?;
        self.remove(RECORD_FDNAME)?;
        self.drop_kept()?;
        self.settle()
    }

    fn drop_kept(&self) -> Result<(), FdStoreError> {
        let passed = {
            let state = self.state();
            (0..MAX_KEPT)
                .filter(|i| state.passed.contains_key(&format!("{KEPT_FDNAME}{i}")))
                .count()
                .max(state.kept_pushed)
        };
        self.remove(KEPT_NOTE_FDNAME)?;
        for i in 0..passed {
            self.remove(&format!("{KEPT_FDNAME}{i}"))?;
        }
        self.state().kept_pushed = 0;
        Ok(())
    }
}

/// Where to tell systemd of the store's changes, given `$NOTIFY_SOCKET` and `$FDSTORE` (the
/// unit's `FileDescriptorStoreMax=`, which systemd 254 and later export).
fn store_socket(
    notify_socket: Option<&std::ffi::OsStr>,
    fdstore: Option<&str>,
) -> Result<NotifySocket, FdStoreError> {
    use std::os::unix::ffi::OsStrExt;
    let store = fdstore.and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
    notify_socket
        .and_then(|s| NotifySocket::parse(s.as_bytes()))
        .filter(|_| store > 0)
        .ok_or(FdStoreError::NoStore)
}

/// The fd store name of a session created in boot `boot_id`.
fn session_fdname(boot_id: &str) -> String {
    format!("{SESSION_FDNAME}{}", boot_id.replace('-', ""))
}

/// `/dev/liveupdate`, waited for while another opener has it.
fn open_device() -> Result<LiveUpdate, FdStoreError> {
    let started = Instant::now();
    loop {
        match LiveUpdate::open() {
            Err(LuoError::Busy) if started.elapsed() < DEVICE_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(LuoError::Busy) => {
                return Err(FdStoreError::DeviceBusy {
                    waited_ms: started.elapsed().as_millis(),
                })
            }
            other => return other.map_err(FdStoreError::from),
        }
    }
}

/// A ledger's record of a VM whose session came back after the kexec.
fn incoming(record: Record) -> VmRecord {
    let session = session_of(&record.vm)
        .map(|s| s.as_str().to_string())
        .unwrap_or_default();
    VmRecord {
        vm: record.vm,
        session,
        phase: VmPhase::Incoming,
        times_ms: BTreeMap::new(),
        devices: record.devices,
        claimant: None,
        failure: None,
        claims: 0,
        launch: record.launch,
    }
}

/// The [`Record`] in a memfd.
fn read_record(fd: BorrowedFd<'_>) -> std::io::Result<Record> {
    serde_json::from_str(&read_memfd(fd)?).map_err(std::io::Error::other)
}

/// A memfd holding `text`, for systemd to keep.
fn text_memfd(name: &str, text: &str) -> std::io::Result<File> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let mut file = File::from(memfd_create(name, MFdFlags::MFD_CLOEXEC)?);
    file.write_all(text.as_bytes())?;
    Ok(file)
}

/// What a memfd holds, read from its start.
fn read_memfd(fd: BorrowedFd<'_>) -> std::io::Result<String> {
    let mut file = File::from(fd.try_clone_to_owned()?);
    file.rewind()?;
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text)?;
    Ok(text)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The ledger's key for the time a phase began.
fn phase_key(phase: VmPhase) -> &'static str {
    match phase {
        VmPhase::Subscribed => "subscribed",
        VmPhase::Ready => "ready",
        VmPhase::Incoming => "incoming",
        VmPhase::Claimed => "claimed",
        VmPhase::Failed => "failed",
        VmPhase::Finished => "finished",
        VmPhase::Cancelled => "cancelled",
    }
}

/// Where systemd holds the session no agent calls a VM's update off: the VMM's own API does,
/// or this, once the update's limit has passed without a kexec. It then tells of a ledger
/// without the VM, which is how a VMM learns its update is off.
struct UpdateLimit {
    until: Instant,
    told: bool,
}

impl PhaseWatch for UpdateLimit {
    fn told(&mut self) -> std::io::Result<Option<Ledger>> {
        if self.told || Instant::now() < self.until {
            return Ok(None);
        }
        self.told = true;
        log::warn!("the update did not kexec within its limit; calling it off");
        Ok(Some(Ledger::default()))
    }
}

impl UpdateAgent for FdStore {
    fn subscribe(
        &self,
        vm: &str,
        launch: Option<&serde_json::Value>,
    ) -> Result<Box<dyn PreserveSession>, AgentClientError> {
        let name = session_of(vm).map_err(|e| AgentClientError::Refused {
            op: "subscribe",
            message: e.to_string(),
        })?;
        // Created and the device closed at once: systemd needs it at the kexec.
        let session = open_device()?
            .create_session(&name)
            .map_err(FdStoreError::from)?;
        self.push(&session_fdname(&self.boot_id), session.as_fd())?;
        self.settle()?;
        self.state().record = None;
        self.record_phase(vm, VmPhase::Subscribed);
        if let Some(record) = &mut self.state().record {
            record.launch = launch.cloned();
        }
        Ok(Box::new(session))
    }

    fn ready(&self, vm: &str, devices: &[String]) -> Result<(), AgentClientError> {
        let launch = self.state().record.as_ref().and_then(|r| r.launch.clone());
        let record = Record {
            vm: vm.to_string(),
            devices: devices.to_vec(),
            launch,
        };
        let text = serde_json::to_string(&record).map_err(|e| AgentClientError::BadReply {
            op: "ready",
            reason: e.to_string(),
        })?;
        let memfd = text_memfd(RECORD_FDNAME, &text).map_err(|source| FdStoreError::Notify {
            what: "the VM's record (memfd)",
            source,
        })?;
        self.push(RECORD_FDNAME, memfd.as_fd())?;
        self.settle()?;
        self.record_phase(vm, VmPhase::Ready);
        if let Some(record) = &mut self.state().record {
            record.devices = devices.to_vec();
        }
        Ok(())
    }

    fn release(&self, _vm: &str) -> Result<(), AgentClientError> {
        self.drop_update()?;
        self.state().record = None;
        Ok(())
    }

    fn finished(&self, vm: &str) -> Result<(), AgentClientError> {
        self.drop_update()?;
        self.state().passed.clear();
        self.record_phase(vm, VmPhase::Finished);
        Ok(())
    }

    fn failed(&self, vm: &str, reason: &str) -> Result<(), AgentClientError> {
        // systemd keeps the session (and what was kept) for the unit's next start.
        log::warn!("VM {vm}: restore failed ({reason}); systemd keeps its session for the next");
        Ok(())
    }

    fn status(&self) -> Result<Ledger, AgentClientError> {
        let mut ledger = Ledger::default();
        if let Some(record) = self.state().record.clone() {
            ledger.vms.push(record);
        }
        Ok(ledger)
    }

    fn status_of(&self, _vm: &str) -> Result<Ledger, AgentClientError> {
        self.status()
    }

    fn watch(&self, _vm: &str) -> Result<Box<dyn PhaseWatch>, AgentClientError> {
        Ok(Box::new(UpdateLimit {
            until: Instant::now() + self.update_limit,
            told: false,
        }))
    }

    fn probe(&self, fds: &[&OwnedFd]) -> Result<Vec<HandlerStatus>, AgentClientError> {
        let device = open_device()?;
        let memfd = match probe::scratch_memfd() {
            Ok(file) => probe::try_preserve(&device, file.as_fd()),
            Err(e) => HandlerStatus::Unknown(format!("memfd_create: {e}")),
        };
        let mut handlers = vec![memfd];
        handlers.extend(
            fds.iter()
                .map(|fd| probe::try_preserve(&device, fd.as_fd())),
        );
        Ok(handlers)
    }

    fn claim(&self, vm: &str) -> Result<Box<dyn RetrieveSession>, AgentClientError> {
        let name = session_of(vm).map_err(|e| AgentClientError::Refused {
            op: "claim",
            message: e.to_string(),
        })?;
        let copy = {
            let state = self.state();
            let (_, fd) = self
                .passed_session(&state)
                .ok_or_else(|| FdStoreError::NoSession { vm: vm.to_string() })?;
            fd.try_clone().map_err(|source| FdStoreError::Notify {
                what: "a copy of the session",
                source,
            })?
        };
        let mut record = self.record_phase(vm, VmPhase::Claimed);
        record.claims += 1;
        self.state().record = Some(record);
        Ok(Box::new(IncomingSession::from_fd(copy, name)))
    }

    fn keep(&self, _vm: &str, note: &str, fds: &[&OwnedFd]) -> Result<(), AgentClientError> {
        if fds.len() > MAX_KEPT {
            return Err(FdStoreError::TooManyKept.into());
        }
        self.drop_kept()?;
        let memfd = text_memfd(KEPT_NOTE_FDNAME, note).map_err(|source| FdStoreError::Notify {
            what: "the kept files' note (memfd)",
            source,
        })?;
        self.push(KEPT_NOTE_FDNAME, memfd.as_fd())?;
        for (i, fd) in fds.iter().enumerate() {
            self.push(&format!("{KEPT_FDNAME}{i}"), fd.as_fd())?;
        }
        self.state().kept_pushed = fds.len();
        self.settle()?;
        Ok(())
    }

    fn kept(&self, _vm: &str) -> Result<Option<KeptFiles>, AgentClientError> {
        let state = self.state();
        let Some(note) = state.passed.get(KEPT_NOTE_FDNAME).and_then(|f| f.first()) else {
            return Ok(None);
        };
        let copy_error = |source| FdStoreError::Notify {
            what: "a copy of a kept file",
            source,
        };
        let note = read_memfd(note.as_fd()).map_err(FdStoreError::Record)?;
        let mut fds = Vec::new();
        for i in 0..MAX_KEPT {
            let Some(fd) = state
                .passed
                .get(&format!("{KEPT_FDNAME}{i}"))
                .and_then(|f| f.first())
            else {
                break;
            };
            fds.push(fd.try_clone().map_err(copy_error)?);
        }
        Ok(Some(KeptFiles { note, fds }))
    }
}

#[cfg(test)]
mod tests;
