//! The agent process: the one opener of `/dev/liveupdate`. It creates one session per VM and
//! keeps its own copy of each until the kexec (an outgoing session dies with its last fd, and
//! a VMM may die), loads the next kernel and kexecs once every VM is ready, and after the kexec
//! hands each VM's incoming session to the VMM that restores it, once. Clients are served one
//! at a time; each request is short.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::agent::clients::Clients;
use crate::agent::holder::{holder_socket, Holder};
use crate::agent::keep::{self, Kept, Previous, TakeOverError};
use crate::agent::ledger::{
    now_ms, Claimant, Ledger, LedgerError, VmPhase, AGENT_SESSION, LEDGER_TOKEN,
};
use crate::agent::watchers::{Watchers, MAX_WATCHERS};
use crate::agent::wire::{send_line, KeptFiles, Reply, Request, MAX_REPLY};
use crate::luo::kexec::{self, KexecError};
use crate::luo::probe::{self, HandlerStatus};
use crate::luo::{IncomingSession, LiveUpdate, LuoError, OutgoingSession, SessionName};
use crate::unix::{self, BindError};

/// The agent could not start or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Luo(#[from] LuoError),
    #[error("agent socket {path} already exists (another agent, or a stale file to remove)")]
    SocketExists { path: PathBuf },
    #[error("cannot create the agent socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    TakeOver(#[from] TakeOverError),
    #[error("cannot keep the ledger in a memfd")]
    LedgerWrite(#[source] std::io::Error),
    #[error("cannot hand a copy of {what} out")]
    Dup {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot tell who is asking")]
    Peer(#[source] nix::Error),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Kexec(#[from] KexecError),
    #[error("the agent is busy: {what}")]
    Busy { what: String },
}

/// What a request leads to after its reply is sent.
enum After {
    Nothing,
    /// The connection is kept, and told of each change of this VM (`Request::Watch`).
    Watch(String),
    /// The next kernel is loaded and the ledger preserved: jump.
    Kexec(OutgoingSession),
}

/// An update waiting for every VM to be ready.
struct PendingUpdate {
    deadline: Instant,
    /// The VMs taking part when it was asked: if one of them leaves (its update released or
    /// cancelled, its guest resumed), a kexec would take the host from under that running
    /// guest, so the update is off for everyone.
    vms: BTreeSet<String>,
}

impl PendingUpdate {
    fn new(deadline: Instant, ledger: &Ledger) -> PendingUpdate {
        PendingUpdate {
            deadline,
            vms: ledger
                .vms
                .iter()
                .filter(|r| matches!(r.phase, VmPhase::Subscribed | VmPhase::Ready))
                .map(|r| r.vm.clone())
                .collect(),
        }
    }

    /// A VM that took part when the update was asked and no longer does.
    fn left<'a>(&'a self, ledger: &Ledger) -> Option<&'a str> {
        self.vms
            .iter()
            .find(|vm| {
                !ledger.vms.iter().any(|r| {
                    &r.vm == *vm && matches!(r.phase, VmPhase::Subscribed | VmPhase::Ready)
                })
            })
            .map(String::as_str)
    }
}

/// The agent's state: LUO, the ledger, and its copy of every VM's session.
pub struct Agent {
    luo: LiveUpdate,
    ledger: Ledger,
    /// Where the ledger is kept on the host, for an agent started again in this boot.
    ledger_file: PathBuf,
    socket: PathBuf,
    outgoing: BTreeMap<String, OutgoingSession>,
    /// After the kexec, each claimed VM's session: the agent's copy outlives a failed (or
    /// killed) restore, so the next one gets the same session and the same files.
    incoming: BTreeMap<String, IncomingSession>,
    /// What a claimed VM's restores left for the next one (`Request::Keep`), until the VM
    /// is finished or released.
    kept: BTreeMap<String, KeptFiles>,
    /// A copy of `incoming` and `kept` in a second process, for an agent started again.
    holder: Option<Holder>,
    /// The previous kernel's agent session, kept until every VM in its ledger is finished
    /// or released.
    agent_session: Option<IncomingSession>,
    pending: Option<PendingUpdate>,
    /// Connections told of their VM's changes.
    watchers: Watchers,
}

impl Agent {
    /// Opens `/dev/liveupdate` and takes the ledger over: the one the previous kernel's agent
    /// preserved, or, for an agent started again in this boot, the copy the last one kept in
    /// the ledger file beside `socket`. A ledger that cannot be read is never replaced by an
    /// empty one: the agent refuses to start unless the operator names the VMs whose sessions
    /// wait (`rebuild`), as LUO offers no list of incoming sessions. After a kexec the agent
    /// keeps a copy of what it retrieves with its holder (on the socket beside its own, started
    /// with `holder` when none answers there), and takes back what the holder has.
    pub fn start(socket: &Path, rebuild: &[String], holder: Command) -> Result<Agent, AgentError> {
        // One fd per VM's session: the usual soft limit would stop the agent short of 1000 VMs.
        match unix::raise_fd_limit() {
            Ok(limit) => log::info!("agent: up to {limit} open fds"),
            Err(e) => log::warn!("agent: cannot raise the open-fd limit: {e}"),
        }
        let luo = LiveUpdate::open()?;
        let ledger_file = keep::ledger_file(socket);
        let name = SessionName::new(AGENT_SESSION)?;
        let mut agent_session = None;
        let previous = match luo.retrieve_session(&name) {
            Ok(session) => {
                let read = session
                    .retrieve(LEDGER_TOKEN)
                    .map_err(std::io::Error::other)
                    .and_then(|fd| read_ledger(&File::from(fd)));
                agent_session = Some(session);
                Previous::Preserved(read)
            }
            Err(LuoError::SessionNotFound { .. }) => Previous::None,
            Err(LuoError::SessionAlreadyRetrieved { .. }) => Previous::AlreadyTaken,
            Err(e) => return Err(e.into()),
        };
        if let Previous::Preserved(Err(e)) = &previous {
            // The session goes with this process: the file must remember the ledger was bad.
            let kept = Kept::Unreadable {
                reason: e.to_string(),
            };
            if let Err(e) = keep::save(&ledger_file, &kept) {
                log::error!("agent: cannot write {}: {e}", ledger_file.display());
            }
        }
        let saved = keep::load(&ledger_file);
        let (ledger, how) = keep::take_over(previous, saved, rebuild, &ledger_file, now_ms())?;
        log::info!(
            "agent: {how}: {} VM session(s) to hand out",
            ledger
                .vms
                .iter()
                .filter(|r| r.phase == VmPhase::Incoming)
                .count()
        );
        let mut agent = Agent {
            luo,
            ledger,
            ledger_file,
            socket: socket.to_path_buf(),
            outgoing: BTreeMap::new(),
            incoming: BTreeMap::new(),
            kept: BTreeMap::new(),
            holder: None,
            agent_session,
            pending: None,
            watchers: Watchers::default(),
        };
        if agent.ledger.has_incoming() {
            match Holder::ensure(&holder_socket(socket), holder) {
                Ok(holder) => agent.take_back(holder),
                Err(e) => log::warn!(
                    "agent: no fd holder ({e}): should this agent die, a VM whose restore \
                     failed would be lost"
                ),
            }
        }
        agent.keep_ledger();
        Ok(agent)
    }

    /// Takes back from `holder` the sessions an earlier agent of this boot retrieved, and what
    /// failed restores left with it: those of every VM claimed or failed in the ledger.
    fn take_back(&mut self, holder: Holder) {
        for record in &self.ledger.vms {
            if !matches!(record.phase, VmPhase::Claimed | VmPhase::Failed) {
                continue;
            }
            let vm = &record.vm;
            let session = holder.take(&held_session(vm)).map(|kept| {
                let fd = kept.and_then(|k| <[OwnedFd; 1]>::try_from(k.fds).ok());
                let name = SessionName::new(&record.session).ok();
                fd.zip(name)
                    .map(|([fd], name)| IncomingSession::from_fd(fd, name))
            });
            match session {
                Ok(Some(session)) => {
                    self.incoming.insert(vm.clone(), session);
                    log::info!("agent: took VM {vm}'s session back from the holder");
                }
                Ok(None) => log::error!(
                    "agent: VM {vm}'s session was retrieved in this boot and the holder has no \
                     copy of it: it is lost"
                ),
                Err(e) => log::error!("agent: cannot ask the holder for VM {vm}: {e}"),
            }
            match holder.take(&held_kept(vm)) {
                Ok(Some(kept)) => {
                    self.kept.insert(vm.clone(), kept);
                }
                Ok(None) => {}
                Err(e) => log::error!("agent: cannot ask the holder for VM {vm}'s files: {e}"),
            }
        }
        self.holder = Some(holder);
    }

    /// Leaves a copy of `fds` with the holder under `name`.
    fn hold(&self, name: &str, note: &str, fds: &[&OwnedFd]) {
        if let Some(holder) = &self.holder {
            if let Err(e) = holder.put(name, note, fds) {
                log::warn!(
                    "agent: the holder did not take {name} ({e}); should this agent die, it \
                     would be lost"
                );
            }
        }
    }

    /// Writes the ledger file, and lets go of the previous kernel's agent session once no VM
    /// needs it any more.
    fn keep_ledger(&mut self) {
        if let Err(e) = keep::save(&self.ledger_file, &Kept::Ledger(self.ledger.clone())) {
            log::warn!(
                "agent: cannot keep the ledger in {}: {e}; an agent started again in this \
                 boot would not know this one's VMs",
                self.ledger_file.display()
            );
        }
        if !self.ledger.has_incoming() {
            if let Some(holder) = self.holder.take() {
                if let Err(e) = holder.done() {
                    log::warn!("agent: cannot end the holder: {e}");
                }
            }
            if let Some(session) = self.agent_session.take() {
                match session.finish() {
                    Ok(()) => log::info!("agent: every VM is restored or released"),
                    Err(e) => log::warn!("agent: cannot finish the agent's session: {e}"),
                }
            }
        }
        // The sessions of VMs that are done (finished or released) are let go of, here and
        // in the holder.
        let ledger = &self.ledger;
        let wanted = |vm: &String| {
            ledger
                .vms
                .iter()
                .any(|r| &r.vm == vm && matches!(r.phase, VmPhase::Claimed | VmPhase::Failed))
        };
        let done: BTreeSet<String> = (self.incoming.keys())
            .chain(self.kept.keys())
            .filter(|vm| !wanted(vm))
            .cloned()
            .collect();
        self.incoming.retain(|vm, _| wanted(vm));
        self.kept.retain(|vm, _| wanted(vm));
        if let Some(holder) = &self.holder {
            for vm in done {
                for name in [held_session(&vm), held_kept(&vm)] {
                    if let Err(e) = holder.release(&name) {
                        log::warn!("agent: the holder did not let go of {name}: {e}");
                    }
                }
            }
        }
    }

    /// Serves clients on its socket (created 0600) until the kexec, on one thread
    /// (`clients.rs`): it sleeps until some client's request is whole, one times out, or a
    /// pending update's deadline comes.
    pub fn serve(mut self) -> Result<(), AgentError> {
        let socket = self.socket.clone();
        let socket = socket.as_path();
        let listener = bind_socket(socket)?;
        let mut clients = Clients::new(listener).map_err(|source| AgentError::Socket {
            path: socket.to_path_buf(),
            source,
        })?;
        log::info!("agent: serving {}", socket.display());
        loop {
            self.watch_pending();
            // Once per turn: after the requests just handled and any call-off, each watcher
            // hears its VM's latest phase before the loop sleeps again.
            self.watchers.tell(&self.ledger);
            for asked in clients.wait(self.until_deadline()) {
                let (reply, fds, after) = match asked.request {
                    Ok((line, fds)) => self.serve_one(&asked.stream, &line, fds),
                    Err(why) => (Reply::error(why), Vec::new(), After::Nothing),
                };
                let fds: Vec<&OwnedFd> = fds.iter().collect();
                if let Err(e) = send_line(&asked.stream, &reply, &fds) {
                    log::warn!("agent: cannot send the reply: {e}");
                }
                self.keep_ledger();
                match after {
                    After::Nothing => {}
                    After::Watch(vm) => self.watchers.add(&vm, asked.stream, &self.ledger),
                    After::Kexec(agent_session) => self.kexec(agent_session),
                }
            }
        }
    }

    /// How long until a pending update's deadline; `None` without one.
    fn until_deadline(&self) -> Option<Duration> {
        self.pending
            .as_ref()
            .map(|p| p.deadline.saturating_duration_since(Instant::now()))
    }

    /// A pending update goes once every VM is ready, or is called off for everyone at its
    /// deadline.
    fn watch_pending(&mut self) {
        let Some(pending) = &self.pending else {
            return;
        };
        if let Some(vm) = pending.left(&self.ledger) {
            log::warn!("agent: VM {vm} left the pending update: the update is off for everyone");
            self.pending = None;
            self.call_everyone_off();
        } else if self.ledger.check_update().is_ok() {
            self.pending = None;
            match self.preserve_ledger() {
                Ok(agent_session) => self.kexec(agent_session),
                Err(e) => {
                    log::error!("agent: cannot preserve the ledger: {e}; the update is off");
                    self.call_everyone_off();
                }
            }
        } else if Instant::now() >= pending.deadline {
            log::warn!(
                "agent: VMs {:?} were not ready by the deadline: the update is off for everyone",
                self.ledger.not_ready()
            );
            self.pending = None;
            self.call_everyone_off();
        }
    }

    /// Drops the agent's copy of every session not past the kexec and unloads the next
    /// kernel; each VMM sees its VM `cancelled` and resumes it in place.
    fn call_everyone_off(&mut self) {
        for vm in self.ledger.cancel_all(now_ms()) {
            self.outgoing.remove(&vm);
        }
        if let Err(e) = kexec::unload() {
            log::warn!("agent: cannot unload the next kernel: {e}");
        }
    }

    /// The ledger, in a memfd of the agent's own session, for the next kernel's agent.
    fn preserve_ledger(&mut self) -> Result<OutgoingSession, AgentError> {
        self.ledger.times_ms.insert("kexec".into(), now_ms());
        let memfd = write_ledger(&self.ledger).map_err(AgentError::LedgerWrite)?;
        let session = self.luo.create_session(&SessionName::new(AGENT_SESSION)?)?;
        session.preserve(memfd.as_fd(), LEDGER_TOKEN)?;
        Ok(session)
    }

    /// Jumps into the loaded kernel. If that fails the update is off for everyone (each VMM
    /// resumes its guest in place) and the agent goes on serving.
    fn kexec(&mut self, agent_session: OutgoingSession) {
        log::info!("agent: {} VM(s) ready: kexec", self.ledger.vms.len());
        match kexec::reboot_into_loaded() {
            Ok(never) => match never {},
            Err(e) => {
                log::error!("agent: the kexec failed: {e}; the update is off for everyone");
                agent_session.cancel();
                self.ledger.times_ms.insert("kexec_failed".into(), now_ms());
                self.call_everyone_off();
            }
        }
    }

    fn serve_one(
        &mut self,
        stream: &UnixStream,
        line: &[u8],
        fds: Vec<OwnedFd>,
    ) -> (Reply, Vec<OwnedFd>, After) {
        let request = match serde_json::from_slice::<Request>(line) {
            Ok(request) => request,
            Err(e) => {
                return (
                    Reply::error(format!("bad request: {e}")),
                    Vec::new(),
                    After::Nothing,
                )
            }
        };
        let peer = match peer_of(stream) {
            Ok(peer) => peer,
            Err(e) => return (Reply::error(chain(&e)), Vec::new(), After::Nothing),
        };
        match self.handle(request, fds, peer) {
            Ok((reply, fds, after)) => (reply, fds, after),
            Err(e) => (Reply::error(chain(&e)), Vec::new(), After::Nothing),
        }
    }

    fn handle(
        &mut self,
        request: Request,
        fds: Vec<OwnedFd>,
        peer: Claimant,
    ) -> Result<(Reply, Vec<OwnedFd>, After), AgentError> {
        let now = now_ms();
        let none = Vec::new;
        match request {
            Request::Probe {} => Ok((self.probe(&fds), none(), After::Nothing)),
            Request::Subscribe { vm, launch } => {
                let name = self.ledger.subscribe(&vm, now)?;
                if let Some(launch) = launch {
                    self.ledger.record_launch(&vm, launch)?;
                }
                let session = match self.luo.create_session(&name) {
                    Ok(session) => session,
                    Err(e) => {
                        let _ = self.ledger.release(&vm);
                        return Err(e.into());
                    }
                };
                let fd = session
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(AgentError::LedgerWrite)?;
                log::info!("agent: VM {vm} subscribed: session {name}");
                self.outgoing.insert(vm, session);
                Ok((with_session(&name), vec![fd], After::Nothing))
            }
            Request::Ready { vm, devices } => {
                self.ledger.ready(&vm, now, &devices)?;
                log::info!("agent: VM {vm} is ready");
                Ok((Reply::ok(), none(), After::Nothing))
            }
            Request::Release { vm } => {
                self.ledger.release(&vm)?;
                // The kernel unpreserves once the VMM's copy is closed too. An incoming
                // session goes once the ledger is kept (`keep_ledger`).
                self.outgoing.remove(&vm);
                log::info!("agent: VM {vm} released its session");
                Ok((Reply::ok(), none(), After::Nothing))
            }
            Request::Finished { vm } => {
                self.ledger.finished(&vm, now)?;
                log::info!("agent: VM {vm} is restored and its session finished");
                Ok((Reply::ok(), none(), After::Nothing))
            }
            Request::Keep { vm, note } => {
                self.ledger.check_claimant(&vm, peer)?;
                log::info!(
                    "agent: VM {vm}'s restore leaves {} fds for a retry: {note}",
                    fds.len()
                );
                let refs: Vec<&OwnedFd> = fds.iter().collect();
                self.hold(&held_kept(&vm), &note, &refs);
                self.kept.insert(vm, KeptFiles { note, fds });
                Ok((Reply::ok(), none(), After::Nothing))
            }
            Request::Watch { vm } => {
                let record = self.ledger.of(Some(&vm));
                if record.vms.is_empty() {
                    return Err(LedgerError::UnknownVm { vm }.into());
                }
                if self.watchers.full() {
                    return Err(AgentError::Busy {
                        what: format!("{MAX_WATCHERS} connections are told of their VMs"),
                    });
                }
                let reply = Reply {
                    ledger: Some(record),
                    ..Reply::ok()
                };
                Ok((reply, none(), After::Watch(vm)))
            }
            Request::Kept { vm } => {
                self.ledger.check_claimant(&vm, peer)?;
                let Some(kept) = self.kept.get(&vm) else {
                    return Ok((Reply::ok(), none(), After::Nothing));
                };
                let copy = kept.try_clone().map_err(|source| AgentError::Dup {
                    what: format!("VM {vm}'s kept files"),
                    source,
                })?;
                let (reply, fds) = copy.into_reply();
                Ok((reply, fds, After::Nothing))
            }
            Request::Failed { vm, reason } => {
                self.ledger.failed(&vm, &reason, now, peer)?;
                log::warn!("agent: VM {vm}'s restore failed ({reason}); its session is kept");
                Ok((Reply::ok(), none(), After::Nothing))
            }
            Request::Status { vm } => {
                self.ledger.reap("*", now, &keep::alive);
                Ok((
                    Reply {
                        ledger: Some(self.ledger.of(vm.as_deref())),
                        ..Reply::ok()
                    },
                    none(),
                    After::Nothing,
                ))
            }
            Request::Update {
                kernel,
                initrd,
                cmdline,
                deadline_s,
            } => {
                match deadline_s {
                    None => self.ledger.check_update()?,
                    Some(_) if self.ledger.not_ready().is_empty() => self.ledger.check_update()?,
                    Some(_) => {}
                }
                let cmdline = match cmdline {
                    Some(cmdline) => cmdline,
                    None => kexec::current_cmdline()?,
                };
                if let Err(e) = kexec::load(&kernel, initrd.as_deref(), Some(&cmdline)) {
                    // The update cannot happen: every prepared VM resumes in place.
                    log::error!("agent: {e}; the update is off for everyone");
                    self.call_everyone_off();
                    return Err(e.into());
                }
                log::info!("agent: {} loaded", kernel.display());
                match deadline_s {
                    None => {
                        let session = self.preserve_ledger()?;
                        Ok((Reply::ok(), none(), After::Kexec(session)))
                    }
                    Some(seconds) => {
                        log::info!(
                            "agent: waiting up to {seconds} s for VMs {:?}",
                            self.ledger.not_ready()
                        );
                        self.pending = Some(PendingUpdate::new(
                            Instant::now() + Duration::from_secs(seconds),
                            &self.ledger,
                        ));
                        Ok((Reply::ok(), none(), After::Nothing))
                    }
                }
            }
            Request::Claim { vm } => {
                let name = self.ledger.claim(&vm, now, peer, &keep::alive)?;
                let session = match self.incoming.get(&vm) {
                    Some(session) => session,
                    None => match self.luo.retrieve_session(&name) {
                        Ok(session) => {
                            match session.as_fd().try_clone_to_owned() {
                                Ok(copy) => self.hold(&held_session(&vm), "", &[&copy]),
                                Err(e) => log::warn!(
                                    "agent: cannot copy VM {vm}'s session for the holder: {e}"
                                ),
                            }
                            self.incoming.entry(vm.clone()).or_insert(session)
                        }
                        Err(e) => {
                            self.ledger.unclaim(&vm);
                            return Err(e.into());
                        }
                    },
                };
                let copy =
                    session
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(|source| AgentError::Dup {
                            what: format!("session {name}"),
                            source,
                        })?;
                log::info!(
                    "agent: VM {vm} claimed its session {name} (pid {})",
                    peer.pid
                );
                Ok((with_session(&name), vec![copy], After::Nothing))
            }
        }
    }
}

impl Agent {
    /// Tries the memfd handler and each of `fds` in scratch sessions.
    fn probe(&self, fds: &[OwnedFd]) -> Reply {
        let memfd = match probe::scratch_memfd() {
            Ok(file) => probe::try_preserve(&self.luo, file.as_fd()),
            Err(e) => HandlerStatus::Unknown(format!("memfd_create: {e}")),
        };
        let mut handlers = vec![memfd];
        handlers.extend(
            fds.iter()
                .map(|fd| probe::try_preserve(&self.luo, fd.as_fd())),
        );
        Reply {
            handlers: Some(handlers),
            ..Reply::ok()
        }
    }
}

/// The holder's name for VM `vm`'s incoming session.
fn held_session(vm: &str) -> String {
    format!("session/{vm}")
}

/// The holder's name for what VM `vm`'s failed restores left.
fn held_kept(vm: &str) -> String {
    format!("kept/{vm}")
}

fn with_session(name: &SessionName) -> Reply {
    Reply {
        session: Some(name.to_string()),
        ..Reply::ok()
    }
}

/// `e` and its sources, in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The ledger as JSON in a new memfd, sealed against resizing (it is preserved as it is).
/// One larger than the next agent reads ([`MAX_REPLY`]) is refused: the update is then off,
/// rather than every VM's session lost with an agent that cannot start.
fn write_ledger(ledger: &Ledger) -> std::io::Result<File> {
    let json = serde_json::to_vec(ledger).map_err(std::io::Error::other)?;
    if json.len() > MAX_REPLY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("ledger of {} bytes, over {MAX_REPLY}", json.len()),
        ));
    }
    let fd = memfd_create(
        "luvmm-agent-ledger",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(&json)?;
    fcntl(
        file.as_fd(),
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK),
    )?;
    Ok(file)
}

fn read_ledger(file: &File) -> std::io::Result<Ledger> {
    let mut file = file;
    let len = file.metadata()?.len();
    let capacity = usize::try_from(len)
        .ok()
        .filter(|&len| len <= MAX_REPLY)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("ledger of {len} bytes"),
            )
        })?;
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::with_capacity(capacity);
    file.read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The process at the other end of `stream`.
fn peer_of(stream: &UnixStream) -> Result<Claimant, AgentError> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(AgentError::Peer)?;
    let pid = u32::try_from(creds.pid()).unwrap_or(0);
    Ok(Claimant {
        pid,
        started: keep::process_start(pid).unwrap_or(0),
    })
}

/// Creates the agent's socket, mode 0600, and the directory it lives in. A socket nobody
/// serves any more (an agent killed) is replaced; a live one is refused.
pub(crate) fn bind_socket(path: &Path) -> Result<UnixListener, AgentError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let stale = std::fs::symlink_metadata(path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        && UnixStream::connect(path)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
    if stale {
        log::warn!("agent: removing the stale socket {}", path.display());
        let _ = std::fs::remove_file(path);
    }
    unix::bind_owner_only(path).map_err(|e| match e {
        BindError::Exists { path } => AgentError::SocketExists { path },
        BindError::Create { path, source } => AgentError::Socket { path, source },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_lost_two_vms_ready_one_released_and_the_update_must_not_go() {
        let mut ledger = Ledger::default();
        for vm in ["vm1", "vm2"] {
            ledger.subscribe(vm, 0).unwrap();
        }
        ledger.ready("vm1", 1, &[]).unwrap();
        let pending = PendingUpdate::new(Instant::now(), &ledger);
        assert_eq!(pending.left(&ledger), None, "both take part");
        ledger.ready("vm2", 2, &[]).unwrap();
        ledger.release("vm2").unwrap();
        assert!(
            ledger.check_update().is_ok(),
            "the ledger alone would let the kexec go"
        );
        assert_eq!(
            pending.left(&ledger),
            Some("vm2"),
            "the pending update must not"
        );
    }

    use crate::agent::ledger::{VmPhase, VmRecord};

    #[test]
    fn the_ledger_reads_back_from_its_memfd() {
        let mut ledger = Ledger::default();
        ledger.subscribe("vm1", 5).unwrap();
        ledger.ready("vm1", 6, &[]).unwrap();
        let memfd = write_ledger(&ledger).unwrap();
        assert_eq!(read_ledger(&memfd).unwrap(), ledger);
        let mut garbage = File::from(memfd_create("bad", MFdFlags::MFD_CLOEXEC).unwrap());
        garbage.write_all(b"{not json").unwrap();
        assert!(read_ledger(&garbage).is_err());
    }

    #[test]
    fn nothing_lost_the_ledger_of_5000_vms_crosses_the_kexec() {
        let mut ledger = Ledger::default();
        let devices: Vec<String> = (0..8).map(|d| format!("0000:00:{:02x}.0", d + 3)).collect();
        ledger.vms = (0..5000)
            .map(|i| VmRecord {
                vm: format!("vm-{i:04}"),
                session: format!("luvmm-vm-{i:04}"),
                phase: VmPhase::Ready,
                times_ms: BTreeMap::from([("ready".to_string(), 1_700_000_000_000)]),
                devices: devices.clone(),
                claimant: None,
                failure: None,
                claims: 0,
                launch: Some(serde_json::json!({
                    "serial": {"file": format!("/var/log/luvmm/vm-{i:04}.log")},
                    "api_socket": format!("/run/luvmm/vm-{i:04}.sock"),
                })),
            })
            .collect();
        let memfd = write_ledger(&ledger).unwrap();
        assert_eq!(read_ledger(&memfd).unwrap(), ledger);
    }

    #[test]
    fn a_ledger_the_next_agent_would_refuse_is_not_preserved() {
        let mut ledger = Ledger::default();
        ledger.times_ms.insert("x".repeat(MAX_REPLY), 0);
        let err = write_ledger(&ledger).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
