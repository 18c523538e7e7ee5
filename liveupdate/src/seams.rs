//! What a VMM calls in a live update, as three small traits: its outgoing session (before the
//! kexec), its incoming session (after it), and the agent that hands both out. The kernel-backed
//! types ([`OutgoingSession`], [`IncomingSession`], [`AgentClient`]) implement them; the fakes
//! in [`crate::fake`] implement them in memory, so an update flow can be unit-tested without
//! LUO, a kexec or an agent process.
//!
//! A session is created by the agent (`subscribe`), which keeps a copy so that the session
//! outlives the VMM; unpreserving is closing every copy of the session (`cancel` here, and
//! the agent's `release`), which is LUO's only way to let go of a preserved file.

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::agent::client::AgentWatch;
use crate::agent::{AgentClient, AgentClientError, KeptFiles, Ledger};
use crate::luo::probe::HandlerStatus;
use crate::luo::{IncomingSession, LuoError, OutgoingSession, SessionName, Token};

/// A session before the kexec, as the VMM preserving into it sees it.
pub trait PreserveSession: Send {
    /// The session's name.
    fn name(&self) -> &SessionName;
    /// Preserves `file` under `token`.
    fn preserve(&self, file: BorrowedFd<'_>, token: Token) -> Result<(), LuoError>;
    /// Closes this process's copy; once the agent's copy is gone too, every file in the
    /// session is unpreserved.
    fn cancel(self: Box<Self>);
}

/// A session after the kexec, as the VMM restoring from it sees it.
pub trait RetrieveSession: Send {
    /// The session's name.
    fn name(&self) -> &SessionName;
    /// Gets back the file preserved under `token`; a failed retrieve is permanent.
    fn retrieve(&self, token: Token) -> Result<OwnedFd, LuoError>;
    /// Hands every retrieved file over to userspace and ends the session.
    fn finish(&self) -> Result<(), LuoError>;
}

/// What the agent told of one VM since it was last asked (`told`), without waiting.
pub trait PhaseWatch: Send {
    /// The VM's latest record, `None` when nothing new came, an error once the telling ended.
    fn told(&mut self) -> std::io::Result<Option<Ledger>>;
}

impl PhaseWatch for AgentWatch {
    fn told(&mut self) -> std::io::Result<Option<Ledger>> {
        AgentWatch::told(self)
    }
}

/// The live-update agent, as a VMM sees it.
pub trait UpdateAgent: Send + Sync {
    /// Subscribes VM `vm`: its new outgoing session (the agent keeps a copy until the kexec),
    /// with what its restore needs again (`launch`, kept in the ledger, opaque to the agent).
    fn subscribe(
        &self,
        vm: &str,
        launch: Option<&serde_json::Value>,
    ) -> Result<Box<dyn PreserveSession>, AgentClientError>;
    /// VM `vm` has preserved everything and is paused; it needs `devices` after the kexec.
    fn ready(&self, vm: &str, devices: &[String]) -> Result<(), AgentClientError>;
    /// Calls VM `vm`'s update off: the agent closes its copy of the session.
    fn release(&self, vm: &str) -> Result<(), AgentClientError>;
    /// VM `vm` is restored and its session finished.
    fn finished(&self, vm: &str) -> Result<(), AgentClientError>;
    /// The restore holding VM `vm`'s claim failed, for `reason`: the agent keeps the session
    /// for the next restore.
    fn failed(&self, vm: &str, reason: &str) -> Result<(), AgentClientError>;
    /// The agent's ledger.
    fn status(&self) -> Result<Ledger, AgentClientError>;
    /// The agent's ledger with only VM `vm`'s record.
    fn status_of(&self, vm: &str) -> Result<Ledger, AgentClientError>;
    /// Asks to be told of each change of VM `vm`'s record.
    fn watch(&self, vm: &str) -> Result<Box<dyn PhaseWatch>, AgentClientError>;
    /// Whether the agent's kernel can preserve a memfd and each of `fds`.
    fn probe(&self, fds: &[&OwnedFd]) -> Result<Vec<HandlerStatus>, AgentClientError>;
    /// After the kexec: VM `vm`'s incoming session (a copy: the agent keeps its own until the
    /// VM is finished).
    fn claim(&self, vm: &str) -> Result<Box<dyn RetrieveSession>, AgentClientError>;
    /// Leaves `fds` and `note` for the next restore of VM `vm`, should this one (the
    /// claimant) fail: files it made that the session's files now depend on.
    fn keep(&self, vm: &str, note: &str, fds: &[&OwnedFd]) -> Result<(), AgentClientError>;
    /// What earlier restores of VM `vm` left (asked by its claimant).
    fn kept(&self, vm: &str) -> Result<Option<KeptFiles>, AgentClientError>;
}

impl PreserveSession for OutgoingSession {
    fn name(&self) -> &SessionName {
        OutgoingSession::name(self)
    }

    fn preserve(&self, file: BorrowedFd<'_>, token: Token) -> Result<(), LuoError> {
        OutgoingSession::preserve(self, file, token)
    }

    fn cancel(self: Box<Self>) {
        OutgoingSession::cancel(*self);
    }
}

impl RetrieveSession for IncomingSession {
    fn name(&self) -> &SessionName {
        IncomingSession::name(self)
    }

    fn retrieve(&self, token: Token) -> Result<OwnedFd, LuoError> {
        IncomingSession::retrieve(self, token)
    }

    fn finish(&self) -> Result<(), LuoError> {
        IncomingSession::finish(self)
    }
}

impl UpdateAgent for AgentClient {
    fn subscribe(
        &self,
        vm: &str,
        launch: Option<&serde_json::Value>,
    ) -> Result<Box<dyn PreserveSession>, AgentClientError> {
        Ok(Box::new(AgentClient::subscribe(self, vm, launch)?))
    }

    fn ready(&self, vm: &str, devices: &[String]) -> Result<(), AgentClientError> {
        AgentClient::ready(self, vm, devices)
    }

    fn release(&self, vm: &str) -> Result<(), AgentClientError> {
        AgentClient::release(self, vm)
    }

    fn finished(&self, vm: &str) -> Result<(), AgentClientError> {
        AgentClient::finished(self, vm)
    }

    fn failed(&self, vm: &str, reason: &str) -> Result<(), AgentClientError> {
        AgentClient::failed(self, vm, reason)
    }

    fn status(&self) -> Result<Ledger, AgentClientError> {
        AgentClient::status(self)
    }

    fn status_of(&self, vm: &str) -> Result<Ledger, AgentClientError> {
        AgentClient::status_of(self, vm)
    }

    fn watch(&self, vm: &str) -> Result<Box<dyn PhaseWatch>, AgentClientError> {
        Ok(Box::new(AgentClient::watch(self, vm)?))
    }

    fn probe(&self, fds: &[&OwnedFd]) -> Result<Vec<HandlerStatus>, AgentClientError> {
        AgentClient::probe(self, fds)
    }

    fn claim(&self, vm: &str) -> Result<Box<dyn RetrieveSession>, AgentClientError> {
        Ok(Box::new(AgentClient::claim(self, vm)?))
    }

    fn keep(&self, vm: &str, note: &str, fds: &[&OwnedFd]) -> Result<(), AgentClientError> {
        AgentClient::keep(self, vm, note, fds)
    }

    fn kept(&self, vm: &str) -> Result<Option<KeptFiles>, AgentClientError> {
        AgentClient::kept(self, vm)
    }
}
