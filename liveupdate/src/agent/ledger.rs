//! The agent's bookkeeping: which VM holds which session, where each is in the update, and
//! when each phase began. It is what the agent started by the next kernel must know, so it
//! travels across the kexec in a memfd of the agent's own session. The transitions are pure
//! logic, unit-tested here; `server` does the LUO calls around them.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::luo::SessionName;

/// The agent's own session, holding the ledger across the kexec. VM sessions are
/// `luvmm-<vm id>`, and VM ids have no dot, so it can never be one of them.
pub const AGENT_SESSION: &str = "luvmm.agent";
/// The ledger's token in the agent's session.
pub const LEDGER_TOKEN: u64 = 1;
/// Longest VM id: `luvmm-` plus the id must fit LUO's 63-byte names with room to spare.
pub const MAX_VM_ID: usize = 32;

/// Where a VM is in the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// It has its session and is preserving into it.
    Subscribed,
    /// Everything is preserved and it is paused: the kexec may go.
    Ready,
    /// After the kexec: its session waits to be claimed.
    Incoming,
    /// Its session was handed to the VMM restoring it; the agent keeps its own copy until the
    /// VM is finished, so a restore that fails can be tried again.
    Claimed,
    /// The restore that claimed it failed or exited before it finished: the session, still
    /// held by the agent, goes to the next claim (whatever the failed restore retrieved is
    /// retrieved again: LUO gives the same file to every retrieve of a token).
    Failed,
    /// Its VMM restored it and finished the session: this update is over for it, and it may
    /// subscribe for the next one.
    Finished,
    /// The agent called the update off (a VM was not ready by the deadline): its copy of the
    /// session is gone, and the VMM resumes the guest in place.
    Cancelled,
}

/// One VM in the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub vm: String,
    pub session: String,
    pub phase: VmPhase,
    /// When each phase began, in ms since the Unix epoch (the wall clock survives the kexec).
    pub times_ms: BTreeMap<String, u64>,
    /// The host devices (PCI BDFs) the VM needs after the kexec, so a restore can check they
    /// are there before it takes anything from the session.
    #[serde(default)]
    pub devices: Vec<String>,
    /// The restore process holding the session's claim, while it is `Claimed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimant: Option<Claimant>,
    /// Why its last restore failed, while it is `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// How many times its session was claimed in this boot.
    #[serde(default)]
    pub claims: u32,
    /// What its VMM was launched with that its restore needs again, as the VMM sent it when
    /// it subscribed (opaque here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<serde_json::Value>,
}

/// A process that claimed a session, told apart from a later one given the same pid by its
/// start time (in clock ticks after boot, as `/proc/PID/stat` has it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claimant {
    pub pid: u32,
    pub started: u64,
}

/// Everything the agent keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub vms: Vec<VmRecord>,
    /// Kexecs this ledger went through.
    pub updates: u32,
    /// Agent-wide events (`update_requested`, `kexec`, `agent_started`), ms since the epoch.
    pub times_ms: BTreeMap<String, u64>,
}

/// A request the ledger refuses; each says why in the operator's terms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("invalid VM id {vm:?}: 1 to {MAX_VM_ID} characters of A-Z, a-z, 0-9, '_' and '-'")]
    BadVmId { vm: String },
    #[error("session {session} is already handed out (VM {vm:?} subscribed before)")]
    AlreadySubscribed { vm: String, session: String },
    #[error("no VM {vm:?} is known to the agent")]
    UnknownVm { vm: String },
    #[error("session {session} is claimed by a restore still running (pid {pid})")]
    ClaimedBy { session: String, pid: u32 },
    #[error(
        "session {session} was restored and finished in this boot: there is nothing left to claim"
    )]
    AlreadyFinished { session: String },
    #[error("VM {vm:?}: only the restore holding its claim may report it failed or keep files")]
    NotClaimant { vm: String },
    #[error("VM {vm:?} is {phase:?}: {what} needs it {needs}")]
    WrongPhase {
        vm: String,
        phase: VmPhase,
        what: &'static str,
        needs: &'static str,
    },
    #[error("no VM subscribed: there is nothing to update")]
    NoVms,
    #[error("VMs {vms:?} are not ready: every subscribed VM must be ready before the kexec")]
    NotReady { vms: Vec<String> },
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Ledger {
    fn find(&mut self, vm: &str) -> Result<&mut VmRecord, LedgerError> {
        self.vms
            .iter_mut()
            .find(|r| r.vm == vm)
            .ok_or_else(|| LedgerError::UnknownVm { vm: vm.to_string() })
    }

    /// The ledger with only VM `vm`'s record (and the agent-wide times), or all of it.
    pub fn of(&self, vm: Option<&str>) -> Ledger {
        match vm {
            None => self.clone(),
            Some(vm) => Ledger {
                vms: self.vms.iter().filter(|r| r.vm == vm).cloned().collect(),
                updates: self.updates,
                times_ms: self.times_ms.clone(),
            },
        }
    }

    /// Whether VM `vm`'s session waits to be restored: the kexec is over and no restore
    /// finished it (one that claimed it and died leaves it to the next claim).
    pub fn session_waits(&self, vm: &str) -> bool {
        self.vms.iter().any(|r| {
            r.vm == vm
                && matches!(
                    r.phase,
                    VmPhase::Incoming | VmPhase::Claimed | VmPhase::Failed
                )
        })
    }

    /// A new VM: its session's name, refused if it has one already.
    pub fn subscribe(&mut self, vm: &str, at_ms: u64) -> Result<SessionName, LedgerError> {
        let session = session_of(vm)?;
        // A VM whose update was called off, or is over, may go again.
        self.vms
            .retain(|r| !(r.vm == vm && matches!(r.phase, VmPhase::Cancelled | VmPhase::Finished)));
        if let Some(existing) = self.vms.iter().find(|r| r.vm == vm) {
            return Err(LedgerError::AlreadySubscribed {
                vm: vm.to_string(),
                session: existing.session.clone(),
            });
        }
        self.vms.push(VmRecord {
            vm: vm.to_string(),
            session: session.to_string(),
            phase: VmPhase::Subscribed,
            times_ms: BTreeMap::from([("subscribed".to_string(), at_ms)]),
            devices: Vec::new(),
            claimant: None,
            failure: None,
            claims: 0,
            launch: None,
        });
        Ok(session)
    }

    /// Keeps what VM `vm`'s VMM was launched with, for its restore after the kexec.
    pub fn record_launch(
        &mut self,
        vm: &str,
        launch: serde_json::Value,
    ) -> Result<(), LedgerError> {
        self.find(vm)?.launch = Some(launch);
        Ok(())
    }

    /// The VM has preserved everything and is paused; after the kexec it needs `devices`.
    pub fn ready(&mut self, vm: &str, at_ms: u64, devices: &[String]) -> Result<(), LedgerError> {
        let record = self.find(vm)?;
        match record.phase {
            VmPhase::Subscribed | VmPhase::Ready => {
                record.phase = VmPhase::Ready;
                record.devices = devices.to_vec();
                record.times_ms.insert("ready".into(), at_ms);
                Ok(())
            }
            phase => Err(LedgerError::WrongPhase {
                vm: vm.to_string(),
                phase,
                what: "ready",
                needs: "subscribed",
            }),
        }
    }

    /// The VM calls its update off (or is done with it): it leaves the ledger.
    pub fn release(&mut self, vm: &str) -> Result<VmRecord, LedgerError> {
        let index = self
            .vms
            .iter()
            .position(|r| r.vm == vm)
            .ok_or_else(|| LedgerError::UnknownVm { vm: vm.to_string() })?;
        Ok(self.vms.remove(index))
    }

    /// The VMM restored VM `vm` and finished its session.
    pub fn finished(&mut self, vm: &str, at_ms: u64) -> Result<(), LedgerError> {
        let record = self.find(vm)?;
        match record.phase {
            VmPhase::Claimed => {
                record.phase = VmPhase::Finished;
                record.claimant = None;
                record.times_ms.insert("finished".into(), at_ms);
                Ok(())
            }
            phase => Err(LedgerError::WrongPhase {
                vm: vm.to_string(),
                phase,
                what: "finish",
                needs: "claimed",
            }),
        }
    }

    /// The kexec may go only when every subscribed VM is ready (VMs whose last update was
    /// called off or is over take no part).
    pub fn check_update(&self) -> Result<(), LedgerError> {
        let out_of_it = |r: &VmRecord| matches!(r.phase, VmPhase::Cancelled | VmPhase::Finished);
        if self.vms.iter().all(out_of_it) {
            return Err(LedgerError::NoVms);
        }
        let waiting: Vec<String> = self
            .vms
            .iter()
            .filter(|r| !(r.phase == VmPhase::Ready || out_of_it(r)))
            .map(|r| r.vm.clone())
            .collect();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(LedgerError::NotReady { vms: waiting })
        }
    }

    /// Calls everyone's update off: every VM not yet past the kexec is `Cancelled`; returns
    /// their ids.
    pub fn cancel_all(&mut self, at_ms: u64) -> Vec<String> {
        let mut cancelled = Vec::new();
        for record in &mut self.vms {
            if matches!(record.phase, VmPhase::Subscribed | VmPhase::Ready) {
                record.phase = VmPhase::Cancelled;
                record.times_ms.insert("cancelled".into(), at_ms);
                cancelled.push(record.vm.clone());
            }
        }
        cancelled
    }

    /// The VMs an update still waits for.
    pub fn not_ready(&self) -> Vec<String> {
        self.vms
            .iter()
            .filter(|r| r.phase == VmPhase::Subscribed)
            .map(|r| r.vm.clone())
            .collect()
    }

    /// The ledger as the next kernel's agent takes it: every ready VM's session is now
    /// incoming (a VM that was not ready has no session left: LUO dropped it).
    pub fn after_kexec(mut self, at_ms: u64) -> Ledger {
        self.vms.retain(|r| r.phase == VmPhase::Ready);
        for record in &mut self.vms {
            record.phase = VmPhase::Incoming;
        }
        self.updates += 1;
        self.times_ms.insert("agent_started".into(), at_ms);
        self
    }

    /// Hands a VM's incoming session to `claimant`: a session never claimed, one whose last
    /// restore failed, or one whose claimant is no longer `alive` (killed, say). A claimant
    /// still running keeps its claim.
    pub fn claim(
        &mut self,
        vm: &str,
        at_ms: u64,
        claimant: Claimant,
        alive: &dyn Fn(&Claimant) -> bool,
    ) -> Result<SessionName, LedgerError> {
        self.reap(vm, at_ms, alive);
        let record = self.find(vm)?;
        match record.phase {
            VmPhase::Incoming | VmPhase::Failed => {
                record.phase = VmPhase::Claimed;
                record.claimant = Some(claimant);
                record.failure = None;
                record.claims += 1;
                record.times_ms.insert("claimed".into(), at_ms);
                session_of(vm)
            }
            VmPhase::Claimed => Err(LedgerError::ClaimedBy {
                session: record.session.clone(),
                pid: record.claimant.map_or(0, |c| c.pid),
            }),
            VmPhase::Finished => Err(LedgerError::AlreadyFinished {
                session: record.session.clone(),
            }),
            phase => Err(LedgerError::WrongPhase {
                vm: vm.to_string(),
                phase,
                what: "claim",
                needs: "incoming (after a kexec)",
            }),
        }
    }

    /// The restore holding VM `vm`'s claim failed, for `reason`: the next claim gets the
    /// session. Only `from`, the claimant, may say so.
    pub fn failed(
        &mut self,
        vm: &str,
        reason: &str,
        at_ms: u64,
        from: Claimant,
    ) -> Result<(), LedgerError> {
        let record = self.find(vm)?;
        if record.phase != VmPhase::Claimed || record.claimant != Some(from) {
            return Err(LedgerError::NotClaimant { vm: vm.to_string() });
        }
        record.phase = VmPhase::Failed;
        record.claimant = None;
        record.failure = Some(reason.to_string());
        record.times_ms.insert("failed".into(), at_ms);
        Ok(())
    }

    /// Refuses anyone but the process holding VM `vm`'s claim.
    pub fn check_claimant(&self, vm: &str, who: Claimant) -> Result<(), LedgerError> {
        let holds = self
            .vms
            .iter()
            .any(|r| r.vm == vm && r.phase == VmPhase::Claimed && r.claimant == Some(who));
        if holds {
            Ok(())
        } else {
            Err(LedgerError::NotClaimant { vm: vm.to_string() })
        }
    }

    /// Every claim (of VM `vm`, or of all with `"*"`) whose claimant is no longer `alive` is
    /// `Failed`: the process exited before it finished.
    pub fn reap(&mut self, vm: &str, at_ms: u64, alive: &dyn Fn(&Claimant) -> bool) {
        for record in &mut self.vms {
            if record.phase != VmPhase::Claimed || (vm != "*" && record.vm != vm) {
                continue;
            }
            if let Some(gone) = record.claimant.filter(|c| !alive(c)) {
                record.phase = VmPhase::Failed;
                record.claimant = None;
                record.failure = Some(format!(
                    "its restore (pid {}) exited before it finished",
                    gone.pid
                ));
                record.times_ms.insert("failed".into(), at_ms);
            }
        }
    }

    /// Puts a claim back when the session could not be handed out after all.
    pub fn unclaim(&mut self, vm: &str) {
        if let Ok(record) = self.find(vm) {
            // Only a first claim can fail so: later ones find the session held by the agent.
            record.phase = VmPhase::Incoming;
            record.claimant = None;
            record.claims = record.claims.saturating_sub(1);
        }
    }

    /// Whether some VM still has a session from the previous kernel to be restored or
    /// released: until none has, the agent keeps the ledger (and those sessions).
    pub fn has_incoming(&self) -> bool {
        self.vms.iter().any(|r| {
            matches!(
                r.phase,
                VmPhase::Incoming | VmPhase::Claimed | VmPhase::Failed
            )
        })
    }
}

/// The session a VM id gets: `luvmm-<vm id>`.
pub fn session_of(vm: &str) -> Result<SessionName, LedgerError> {
    let valid = (1..=MAX_VM_ID).contains(&vm.len())
        && vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let bad = || LedgerError::BadVmId { vm: vm.to_string() };
    if !valid {
        return Err(bad());
    }
    SessionName::new(&format!("luvmm-{vm}")).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Claimant = Claimant {
        pid: 7,
        started: 70,
    };

    fn alive(_: &Claimant) -> bool {
        true
    }

    #[test]
    fn nothing_lost_a_failed_or_dead_restore_leaves_the_session_claimable() {
        let mut ledger = Ledger::default();
        ledger.subscribe("vm1", 1).unwrap();
        ledger.ready("vm1", 2, &[]).unwrap();
        let mut next = ledger.after_kexec(3);
        next.claim("vm1", 4, ME, &alive).unwrap();
        // Only the claimant may say its restore failed, or keep files for the next one.
        let other = Claimant {
            pid: 8,
            started: 80,
        };
        assert_eq!(next.check_claimant("vm1", ME), Ok(()));
        assert_eq!(
            next.check_claimant("vm1", other),
            Err(LedgerError::NotClaimant { vm: "vm1".into() })
        );
        assert_eq!(
            next.failed("vm1", "no", 5, other),
            Err(LedgerError::NotClaimant { vm: "vm1".into() })
        );
        next.failed("vm1", "serial: no such directory", 5, ME)
            .unwrap();
        assert_eq!(next.vms[0].phase, VmPhase::Failed);
        assert_eq!(
            next.vms[0].failure.as_deref(),
            Some("serial: no such directory")
        );
        // Claimed again; the claimant is then killed: the next claim finds it dead.
        next.claim("vm1", 6, other, &alive).unwrap();
        let dead = |c: &Claimant| c.pid != other.pid;
        next.claim("vm1", 7, ME, &dead).unwrap();
        let record = &next.vms[0];
        assert_eq!(
            (record.phase, record.claims, record.claimant),
            (VmPhase::Claimed, 3, Some(ME))
        );
        assert_eq!(record.times_ms["failed"], 7);
        // A status sees a dead claimant as failed too, with the reason.
        next.reap("*", 8, &|_| false);
        assert_eq!(next.vms[0].phase, VmPhase::Failed);
        assert_eq!(
            next.vms[0].failure.as_deref(),
            Some("its restore (pid 7) exited before it finished")
        );
        assert!(next.has_incoming());
        next.claim("vm1", 9, ME, &alive).unwrap();
        next.finished("vm1", 10).unwrap();
        assert!(!next.has_incoming());
    }

    #[test]
    fn a_session_is_handed_out_once_before_and_once_after_the_kexec() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.subscribe("vm1", 10).unwrap().as_str(), "luvmm-vm1");
        assert_eq!(
            ledger.subscribe("vm1", 11),
            Err(LedgerError::AlreadySubscribed {
                vm: "vm1".into(),
                session: "luvmm-vm1".into()
            })
        );
        ledger.subscribe("vm2", 12).unwrap();
        assert_eq!(
            ledger.check_update(),
            Err(LedgerError::NotReady {
                vms: vec!["vm1".into(), "vm2".into()]
            })
        );
        ledger.ready("vm1", 20, &["0000:00:03.0".into()]).unwrap();
        ledger.ready("vm2", 21, &[]).unwrap();
        assert_eq!(ledger.check_update(), Ok(()));

        let mut next = ledger.after_kexec(100);
        assert_eq!(next.updates, 1);
        assert!(next.vms.iter().all(|r| r.phase == VmPhase::Incoming));
        assert_eq!(
            next.claim("vm1", 110, ME, &alive).unwrap().as_str(),
            "luvmm-vm1"
        );
        assert_eq!(
            next.claim("vm1", 111, ME, &alive),
            Err(LedgerError::ClaimedBy {
                session: "luvmm-vm1".into(),
                pid: ME.pid
            })
        );
        assert_eq!(
            next.claim("vm3", 112, ME, &alive),
            Err(LedgerError::UnknownVm { vm: "vm3".into() })
        );
        // A claim whose retrieve failed can be put back and tried again.
        next.unclaim("vm1");
        assert!(next.claim("vm1", 113, ME, &alive).is_ok());
        assert_eq!(next.vms[0].devices, ["0000:00:03.0"]);
        let times = &next.vms[0].times_ms;
        assert_eq!(
            (times["subscribed"], times["ready"], times["claimed"]),
            (10, 20, 113)
        );
    }

    #[test]
    fn a_finished_vm_takes_part_in_the_next_update_and_is_never_claimed_twice() {
        let mut ledger = Ledger::default();
        ledger.subscribe("vm1", 1).unwrap();
        ledger.subscribe("vm2", 2).unwrap();
        ledger.ready("vm1", 3, &[]).unwrap();
        ledger.ready("vm2", 4, &[]).unwrap();
        let mut next = ledger.after_kexec(10);
        assert!(matches!(
            next.finished("vm1", 11),
            Err(LedgerError::WrongPhase { what: "finish", .. })
        ));
        next.claim("vm1", 12, ME, &alive).unwrap();
        next.claim("vm2", 12, ME, &alive).unwrap();
        next.finished("vm1", 13).unwrap();
        next.finished("vm2", 13).unwrap();
        assert_eq!(
            next.claim("vm1", 14, ME, &alive),
            Err(LedgerError::AlreadyFinished {
                session: "luvmm-vm1".into()
            })
        );
        // Finished VMs take no part until they subscribe again.
        assert_eq!(next.check_update(), Err(LedgerError::NoVms));
        assert_eq!(next.subscribe("vm1", 20).unwrap().as_str(), "luvmm-vm1");
        assert_eq!(
            next.check_update(),
            Err(LedgerError::NotReady {
                vms: vec!["vm1".into()]
            })
        );
        next.ready("vm1", 21, &[]).unwrap();
        assert_eq!(next.check_update(), Ok(()));
        let third = next.after_kexec(30);
        assert_eq!(third.updates, 2);
        assert_eq!(third.vms.len(), 1, "vm2 was not in this update: {third:?}");
    }

    #[test]
    fn vms_not_ready_lose_their_session_at_the_kexec() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.check_update(), Err(LedgerError::NoVms));
        ledger.subscribe("ready", 1).unwrap();
        ledger.subscribe("late", 2).unwrap();
        ledger.ready("ready", 3, &[]).unwrap();
        let next = ledger.after_kexec(4);
        assert_eq!(next.vms.len(), 1);
        assert_eq!(next.vms[0].vm, "ready");
        // Before the kexec, a claim is refused: the session is still outgoing.
        let mut before = Ledger::default();
        before.subscribe("vm", 1).unwrap();
        assert!(matches!(
            before.claim("vm", 2, ME, &alive),
            Err(LedgerError::WrongPhase { what: "claim", .. })
        ));
        assert!(before.release("vm").is_ok());
        assert!(before.vms.is_empty());
    }

    #[test]
    fn a_deadline_calls_everyone_off_and_they_may_subscribe_again() {
        let mut ledger = Ledger::default();
        ledger.subscribe("ready", 1).unwrap();
        ledger.subscribe("slow", 2).unwrap();
        ledger.ready("ready", 3, &[]).unwrap();
        assert_eq!(ledger.not_ready(), ["slow"]);
        assert_eq!(ledger.cancel_all(4), ["ready", "slow"]);
        assert!(ledger.vms.iter().all(|r| r.phase == VmPhase::Cancelled));
        assert_eq!(ledger.check_update(), Err(LedgerError::NoVms));
        assert!(ledger.subscribe("ready", 5).is_ok());
        assert_eq!(ledger.vms.len(), 2);
        // A cancelled VM does not cross the kexec.
        ledger.ready("ready", 6, &[]).unwrap();
        assert_eq!(ledger.check_update(), Ok(()));
        let next = ledger.after_kexec(7);
        assert_eq!(next.vms.len(), 1);
    }

    #[test]
    fn vm_ids_make_valid_session_names_and_never_the_agents() {
        for bad in ["", "a.b", "agent session", &"x".repeat(33), "vm/1"] {
            assert_eq!(
                session_of(bad).map(|s| s.to_string()),
                Err(LedgerError::BadVmId { vm: bad.into() })
            );
        }
        assert_eq!(session_of(&"x".repeat(32)).unwrap().as_str().len(), 38);
        assert_ne!(session_of("agent").unwrap().as_str(), AGENT_SESSION);
    }

    #[test]
    fn nothing_lost_no_vm_takes_the_probes_scratch_session() {
        let probe = crate::luo::probe::scratch_session_name();
        // The VM id that would give a session of the same name, were the separator a dash.
        let vm = &probe["luvmm.".len()..];
        assert_ne!(session_of(vm).map(|s| s.to_string()), Ok(probe.clone()));
    }

    /// A host of 1000 VMs through a whole update, each step on every VM: every session
    /// handed out once, every VM finished, nothing mixed up between them.
    #[test]
    fn a_host_of_1000_vms_goes_through_an_update() {
        let mut ledger = Ledger::default();
        let vms: Vec<String> = (0..1000).map(|i| format!("vm-{i:04}")).collect();
        for vm in &vms {
            ledger.subscribe(vm, 1).unwrap();
        }
        assert_eq!(ledger.not_ready().len(), 1000);
        for vm in &vms {
            ledger.ready(vm, 2, &[]).unwrap();
        }
        ledger.check_update().expect("every VM ready");
        let mut ledger = ledger.after_kexec(3);
        let claimant = Claimant { pid: 7, started: 1 };
        for vm in &vms {
            let session = ledger.claim(vm, 4, claimant, &|_| true).unwrap();
            assert_eq!(session.to_string(), format!("luvmm-{vm}"));
            ledger.finished(vm, 5).unwrap();
        }
        assert!(ledger
            .vms
            .iter()
            .all(|r| r.phase == VmPhase::Finished && r.claims == 1));
        assert!(!ledger.has_incoming());
        let one = ledger.of(Some("vm-0999"));
        assert_eq!(one.vms.len(), 1);
        assert_eq!(one.vms[0].vm, "vm-0999");
        assert_eq!(one.updates, 1);
    }
}
