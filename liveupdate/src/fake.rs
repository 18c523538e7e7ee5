//! An in-memory host for update-flow tests: LUO's sessions and the agent's ledger, behind the
//! traits of [`crate::seams`], with faults to inject and a log of every call.
//!
//! It keeps LUO's rules that an update flow depends on: a file stays preserved while any copy
//! of its session is open (the VMM's and the agent's); a kexec carries the sessions the agent
//! still holds for ready VMs; a failed retrieve stays failed, and a token retrieved again gives
//! the same file; the agent keeps its copy of an incoming session, and hands it out again once
//! its claimant is gone (its session copy dropped) or said it failed. Preserved files are kept as duplicated fds, so a memfd
//! comes back after the "kexec" with its contents.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::agent::ledger::{session_of, Claimant};
use crate::agent::VmPhase;
use crate::agent::{AgentClientError, KeptFiles, Ledger};
use crate::luo::probe::HandlerStatus;
use crate::luo::{LuoError, SessionName, Token};
use crate::seams::{PhaseWatch, PreserveSession, RetrieveSession, UpdateAgent};

/// What to make fail. Tokens are the session's tokens; agent operations are named as in
/// [`UpdateAgent`] (`"subscribe"`, `"ready"`, `"release"`, `"finished"`, `"status"`,
/// `"probe"`, `"claim"`, `"keep"`, `"kept"`).
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// PRESERVE_FD says ENOENT: no handler for this file (a VFIO device on stock Linux).
    pub not_preservable: BTreeSet<Token>,
    /// PRESERVE_FD fails with ENOMEM.
    pub preserve_fails: BTreeSet<Token>,
    /// RETRIEVE_FD fails (for good, as in the kernel).
    pub retrieve_fails: BTreeSet<Token>,
    /// FINISH says EBUSY.
    pub finish_busy: bool,
    /// The agent refuses these operations.
    pub agent_refuses: BTreeSet<&'static str>,
    /// What `probe` reports for each device fd (the memfd handler is always present).
    pub device_handler: Option<HandlerStatus>,
}

/// One outgoing session: its files, and which copies of it are still open.
#[derive(Default)]
struct Outgoing {
    files: BTreeMap<Token, OwnedFd>,
    vmm_copy: bool,
    agent_copy: bool,
}

/// One incoming session: each token's file (the same file for every retrieve of it).
#[derive(Default)]
struct Incoming {
    files: BTreeMap<Token, OwnedFd>,
    retrieved: BTreeSet<Token>,
    failed: BTreeSet<Token>,
    finished: bool,
}

#[derive(Default)]
struct Host {
    ledger: Ledger,
    outgoing: BTreeMap<String, Outgoing>,
    incoming: BTreeMap<String, Incoming>,
    faults: Faults,
    log: Vec<String>,
    /// Claims handed out so far (each claim is a "process" with this number as its pid), and
    /// those whose session copy is still open.
    claims: u32,
    live_claims: BTreeSet<u32>,
    /// What restores left for the next one, per VM.
    kept: BTreeMap<String, KeptFiles>,
}

/// The fake host: clone it freely, every clone is the same host.
#[derive(Clone, Default)]
pub struct FakeHost(Arc<Mutex<Host>>);

impl FakeHost {
    pub fn new() -> FakeHost {
        FakeHost::default()
    }

    fn host(&self) -> MutexGuard<'_, Host> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets what fails from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.host().faults = faults;
    }

    /// Every call since the last `take_log`, one line each (`preserve luvmm-vm1 0x1000`).
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.host().log)
    }

    /// The agent's ledger.
    pub fn ledger(&self) -> Ledger {
        self.host().ledger.clone()
    }

    /// The tokens preserved in `session` and still held by some copy of it.
    pub fn preserved(&self, session: &str) -> Vec<Token> {
        self.host()
            .outgoing
            .get(session)
            .map(|s| s.files.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The kexec: every session the agent holds for a ready VM becomes incoming; the others
    /// are lost, as in LUO.
    pub fn kexec(&self) {
        let mut host = self.host();
        let ledger = std::mem::take(&mut host.ledger).after_kexec(0);
        let ready: BTreeSet<String> = ledger.vms.iter().map(|r| r.session.clone()).collect();
        let outgoing = std::mem::take(&mut host.outgoing);
        for (name, session) in outgoing {
            if session.agent_copy && ready.contains(&name) {
                host.incoming.insert(
                    name,
                    Incoming {
                        files: session.files,
                        ..Incoming::default()
                    },
                );
            }
        }
        host.ledger = ledger;
        host.log.push("kexec".into());
    }

    /// The agent calls the update off for everyone not past the kexec (its deadline passed,
    /// or the kexec failed): their sessions' agent copies are closed.
    pub fn call_off_all(&self) {
        let mut host = self.host();
        let cancelled = host.ledger.cancel_all(0);
        for vm in cancelled {
            if let Ok(name) = session_of(&vm) {
                if let Some(session) = host.outgoing.get_mut(name.as_str()) {
                    session.agent_copy = false;
                }
            }
        }
        host.drop_closed();
        host.log.push("call off".into());
    }

    /// Tokens of `session` not retrieved yet (after the kexec).
    pub fn not_retrieved(&self, session: &str) -> Vec<Token> {
        self.host()
            .incoming
            .get(session)
            .map(|s| {
                s.files
                    .keys()
                    .filter(|t| !s.retrieved.contains(t))
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `session` was finished.
    pub fn finished(&self, session: &str) -> bool {
        self.host()
            .incoming
            .get(session)
            .is_some_and(|s| s.finished)
    }

    /// The fake agent of this host.
    pub fn agent(&self) -> FakeAgent {
        FakeAgent(self.clone())
    }

    fn agent_call(
        &self,
        op: &'static str,
        vm: &str,
    ) -> Result<MutexGuard<'_, Host>, AgentClientError> {
        let mut host = self.host();
        host.log
            .push(format!("agent {op} {vm}").trim_end().to_string());
        if host.faults.agent_refuses.contains(op) {
            return Err(AgentClientError::Refused {
                op,
                message: "refused by the test".into(),
            });
        }
        Ok(host)
    }
}

fn refused(op: &'static str, e: impl std::fmt::Display) -> AgentClientError {
    AgentClientError::Refused {
        op,
        message: e.to_string(),
    }
}

fn name_of(vm: &str) -> Result<SessionName, AgentClientError> {
    session_of(vm).map_err(|e| refused("subscribe", e))
}

/// The agent of a [`FakeHost`].
#[derive(Clone)]
pub struct FakeAgent(FakeHost);

impl UpdateAgent for FakeAgent {
    fn subscribe(
        &self,
        vm: &str,
        launch: Option<&serde_json::Value>,
    ) -> Result<Box<dyn PreserveSession>, AgentClientError> {
        let mut host = self.0.agent_call("subscribe", vm)?;
        let name = host
            .ledger
            .subscribe(vm, 0)
            .map_err(|e| refused("subscribe", e))?;
        if let Some(launch) = launch {
            host.ledger
                .record_launch(vm, launch.clone())
                .map_err(|e| refused("subscribe", e))?;
        }
        host.outgoing.insert(
            name.to_string(),
            Outgoing {
                files: BTreeMap::new(),
                vmm_copy: true,
                agent_copy: true,
            },
        );
        Ok(Box::new(FakeOutgoing {
            host: self.0.clone(),
            name,
        }))
    }

    fn ready(&self, vm: &str, devices: &[String]) -> Result<(), AgentClientError> {
        let mut host = self.0.agent_call("ready", vm)?;
        host.ledger
            .ready(vm, 0, devices)
            .map_err(|e| refused("ready", e))
    }

    fn release(&self, vm: &str) -> Result<(), AgentClientError> {
        let mut host = self.0.agent_call("release", vm)?;
        let record = host.ledger.release(vm).map_err(|e| refused("release", e))?;
        host.kept.remove(vm);
        if let Some(session) = host.outgoing.get_mut(&record.session) {
            session.agent_copy = false;
        }
        host.drop_closed();
        Ok(())
    }

    fn finished(&self, vm: &str) -> Result<(), AgentClientError> {
        let mut host = self.0.agent_call("finished", vm)?;
        host.ledger
            .finished(vm, 0)
            .map_err(|e| refused("finished", e))?;
        host.kept.remove(vm);
        Ok(())
    }

    fn status(&self) -> Result<Ledger, AgentClientError> {
        let host = self.0.agent_call("status", "")?;
        Ok(host.ledger.clone())
    }

    fn status_of(&self, vm: &str) -> Result<Ledger, AgentClientError> {
        let host = self.0.agent_call("status", vm)?;
        Ok(host.ledger.of(Some(vm)))
    }

    fn watch(&self, vm: &str) -> Result<Box<dyn PhaseWatch>, AgentClientError> {
        let host = self.0.agent_call("watch", vm)?;
        let told = host.ledger.vms.iter().find(|r| r.vm == vm).map(|r| r.phase);
        Ok(Box::new(FakeWatch {
            host: self.0.clone(),
            vm: vm.to_string(),
            told,
        }))
    }

    fn probe(&self, fds: &[&OwnedFd]) -> Result<Vec<HandlerStatus>, AgentClientError> {
        let host = self.0.agent_call("probe", "")?;
        let device = host
            .faults
            .device_handler
            .clone()
            .unwrap_or(HandlerStatus::Present);
        let mut handlers = vec![HandlerStatus::Present];
        handlers.extend(fds.iter().map(|_| device.clone()));
        Ok(handlers)
    }

    fn failed(&self, vm: &str, reason: &str) -> Result<(), AgentClientError> {
        let mut host = self.0.agent_call("failed", vm)?;
        let claimant = host.claimant("failed", vm)?;
        host.ledger
            .failed(vm, reason, 0, claimant)
            .map_err(|e| refused("failed", e))
    }

    fn claim(&self, vm: &str) -> Result<Box<dyn RetrieveSession>, AgentClientError> {
        let mut host = self.0.agent_call("claim", vm)?;
        let pid = host.claims + 1;
        let live = host.live_claims.clone();
        let alive = move |c: &Claimant| live.contains(&c.pid);
        host.ledger
            .claim(vm, 0, Claimant { pid, started: 0 }, &alive)
            .map_err(|e| refused("claim", e))?;
        host.claims = pid;
        host.live_claims.insert(pid);
        Ok(Box::new(FakeIncoming {
            host: self.0.clone(),
            name: name_of(vm)?,
            claim: pid,
        }))
    }

    fn keep(&self, vm: &str, note: &str, fds: &[&OwnedFd]) -> Result<(), AgentClientError> {
        let mut host = self.0.agent_call("keep", vm)?;
        let claimant = host.claimant("keep", vm)?;
        host.ledger
            .check_claimant(vm, claimant)
            .map_err(|e| refused("keep", e))?;
        let copies = fds
            .iter()
            .map(|fd| OwnedFd::try_clone(fd))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| refused("keep", e))?;
        let kept = KeptFiles {
            note: note.to_string(),
            fds: copies,
        };
        host.kept.insert(vm.to_string(), kept);
        Ok(())
    }

    fn kept(&self, vm: &str) -> Result<Option<KeptFiles>, AgentClientError> {
        let host = self.0.agent_call("kept", vm)?;
        let claimant = host.claimant("kept", vm)?;
        host.ledger
            .check_claimant(vm, claimant)
            .map_err(|e| refused("kept", e))?;
        host.kept
            .get(vm)
            .map(KeptFiles::try_clone)
            .transpose()
            .map_err(|e| refused("kept", e))
    }
}

impl Host {
    /// The process holding VM `vm`'s claim: the fake's callers all act as it.
    fn claimant(&self, op: &'static str, vm: &str) -> Result<Claimant, AgentClientError> {
        self.ledger
            .vms
            .iter()
            .find(|r| r.vm == vm)
            .and_then(|r| r.claimant)
            .ok_or_else(|| refused(op, "not claimed"))
    }

    /// A session no copy of which is open any more unpreserves its files.
    fn drop_closed(&mut self) {
        self.outgoing.retain(|_, s| s.vmm_copy || s.agent_copy);
    }
}

/// The VMM's copy of an outgoing session of a [`FakeHost`].
struct FakeOutgoing {
    host: FakeHost,
    name: SessionName,
}

impl PreserveSession for FakeOutgoing {
    fn name(&self) -> &SessionName {
        &self.name
    }

    fn preserve(&self, file: BorrowedFd<'_>, token: Token) -> Result<(), LuoError> {
        let mut host = self.host.host();
        let session = self.name.to_string();
        host.log.push(format!("preserve {session} {token:#x}"));
        if host.faults.not_preservable.contains(&token) {
            return Err(LuoError::NotPreservable { session, token });
        }
        if host.faults.preserve_fails.contains(&token) {
            return Err(ioctl_error(session, "PRESERVE_FD", libc::ENOMEM));
        }
        let copy = file.try_clone_to_owned().map_err(|e| LuoError::Ioctl {
            session: session.clone(),
            op: "PRESERVE_FD",
            meaning: "cannot duplicate the file".into(),
            source: e,
        })?;
        let outgoing = host.outgoing.entry(session.clone()).or_default();
        if outgoing.files.contains_key(&token) {
            return Err(LuoError::TokenInUse { session, token });
        }
        outgoing.files.insert(token, copy);
        Ok(())
    }

    fn cancel(self: Box<Self>) {
        drop(self);
    }
}

impl Drop for FakeOutgoing {
    fn drop(&mut self) {
        let mut host = self.host.host();
        host.log.push(format!("close {}", self.name));
        if let Some(session) = host.outgoing.get_mut(self.name.as_str()) {
            session.vmm_copy = false;
        }
        host.drop_closed();
    }
}

/// An incoming session of a [`FakeHost`], as claimed from its agent.
struct FakeIncoming {
    host: FakeHost,
    name: SessionName,
    claim: u32,
}

impl Drop for FakeIncoming {
    /// The claimant's copy of the session closes (its process exits); the agent's stays.
    fn drop(&mut self) {
        self.host.host().live_claims.remove(&self.claim);
    }
}

impl RetrieveSession for FakeIncoming {
    fn name(&self) -> &SessionName {
        &self.name
    }

    fn retrieve(&self, token: Token) -> Result<OwnedFd, LuoError> {
        let mut host = self.host.host();
        let session = self.name.to_string();
        host.log.push(format!("retrieve {session} {token:#x}"));
        let fails = host.faults.retrieve_fails.contains(&token);
        let incoming = host.incoming.entry(session.clone()).or_default();
        if fails || incoming.failed.contains(&token) {
            incoming.failed.insert(token);
            incoming.files.remove(&token);
            return Err(ioctl_error(session, "RETRIEVE_FD", libc::EIO));
        }
        incoming.retrieved.insert(token);
        match incoming.files.get(&token).map(OwnedFd::try_clone) {
            Some(Ok(file)) => Ok(file),
            Some(Err(e)) => Err(LuoError::Ioctl {
                session,
                op: "RETRIEVE_FD",
                meaning: "cannot duplicate the file".into(),
                source: e,
            }),
            None => Err(LuoError::TokenNotFound { session, token }),
        }
    }

    fn finish(&self) -> Result<(), LuoError> {
        let mut host = self.host.host();
        let session = self.name.to_string();
        host.log.push(format!("finish {session}"));
        if host.faults.finish_busy {
            return Err(LuoError::FinishBusy { session });
        }
        let incoming = host.incoming.entry(session).or_default();
        incoming.finished = true;
        // Files never retrieved are discarded, as LUO does with memfds.
        incoming.files.clear();
        Ok(())
    }
}

fn ioctl_error(session: String, op: &'static str, errno: i32) -> LuoError {
    LuoError::Ioctl {
        session,
        op,
        meaning: format!("injected errno {errno}"),
        source: io::Error::from_raw_os_error(errno),
    }
}

/// A watch on one VM of a [`FakeHost`]'s agent: told of each change of its phase. The fault
/// `agent_refuses: "watching"` ends it, as an agent that went away would.
struct FakeWatch {
    host: FakeHost,
    vm: String,
    told: Option<VmPhase>,
}

impl PhaseWatch for FakeWatch {
    fn told(&mut self) -> io::Result<Option<Ledger>> {
        let host = self.host.host();
        if host.faults.agent_refuses.contains("watching") {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let now = host
            .ledger
            .vms
            .iter()
            .find(|r| r.vm == self.vm)
            .map(|r| r.phase);
        if now == self.told {
            return Ok(None);
        }
        self.told = now;
        Ok(Some(host.ledger.of(Some(&self.vm))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn memfd(contents: &[u8]) -> std::fs::File {
        let mut file = tempfile();
        file.write_all(contents).unwrap();
        file
    }

    fn tempfile() -> std::fs::File {
        let fd = nix::sys::memfd::memfd_create(c"fake-test", nix::sys::memfd::MFdFlags::empty())
            .unwrap();
        std::fs::File::from(fd)
    }

    #[test]
    fn a_ready_session_crosses_the_kexec_and_a_failed_restore_can_be_retried() {
        let host = FakeHost::new();
        let agent = host.agent();
        let session = agent.subscribe("vm1", None).unwrap();
        let file = memfd(b"guest ram");
        session.preserve(file.as_fd(), 7).unwrap();
        agent.ready("vm1", &[]).unwrap();
        drop(session);
        host.kexec();
        let read = |incoming: &dyn RetrieveSession| {
            let mut back = std::fs::File::from(incoming.retrieve(7).unwrap());
            let mut contents = String::new();
            back.rewind().unwrap();
            back.read_to_string(&mut contents).unwrap();
            contents
        };
        let incoming = agent.claim("vm1").unwrap();
        assert_eq!(read(incoming.as_ref()), "guest ram");
        assert!(agent.claim("vm1").is_err(), "its claimant still holds it");
        // The claimant exits: the next claim gets the session, and the same file again.
        drop(incoming);
        let incoming = agent.claim("vm1").unwrap();
        assert_eq!(read(incoming.as_ref()), "guest ram");
        agent.failed("vm1", "a test").unwrap();
        let incoming = agent.claim("vm1").unwrap();
        incoming.finish().unwrap();
        agent.finished("vm1").unwrap();
        assert!(agent.claim("vm1").is_err(), "a finished session is gone");
    }

    #[test]
    fn a_session_is_unpreserved_once_both_copies_are_closed() {
        let host = FakeHost::new();
        let agent = host.agent();
        let session = agent.subscribe("vm1", None).unwrap();
        session.preserve(memfd(b"x").as_fd(), 1).unwrap();
        session.cancel();
        assert_eq!(
            host.preserved("luvmm-vm1"),
            vec![1],
            "the agent still holds it"
        );
        agent.release("vm1").unwrap();
        assert!(host.preserved("luvmm-vm1").is_empty());
    }

    #[test]
    fn a_failed_retrieve_stays_failed() {
        let host = FakeHost::new();
        let agent = host.agent();
        let session = agent.subscribe("vm1", None).unwrap();
        session.preserve(memfd(b"x").as_fd(), 1).unwrap();
        agent.ready("vm1", &[]).unwrap();
        host.set_faults(Faults {
            retrieve_fails: BTreeSet::from([1]),
            ..Faults::default()
        });
        host.kexec();
        let incoming = agent.claim("vm1").unwrap();
        assert!(incoming.retrieve(1).is_err());
        host.set_faults(Faults::default());
        assert!(incoming.retrieve(1).is_err());
    }
}
