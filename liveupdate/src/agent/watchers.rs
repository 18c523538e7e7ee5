//! Connections that asked to be told of a VM's changes (`Request::Watch`): once per turn of the
//! agent's loop (after the requests it handled and any call-off), each is sent its VM's record if the VM's phase changed since it was last
//! told, and closed once the VM's update is over. A VMM following its update is told of a
//! call-off this way, instead of asking every second.

use std::os::unix::net::UnixStream;

use crate::agent::ledger::{Ledger, VmPhase};
use crate::agent::wire::{send_line, Reply};

/// Most connections told at once; a VMM holds one while its update is staged or prepared.
pub const MAX_WATCHERS: usize = 4096;

/// One connection told of one VM.
struct Watcher {
    vm: String,
    stream: UnixStream,
    /// The phase it was last told (`None`: the VM was not in the ledger).
    told: Option<VmPhase>,
}

/// Every connection told of a VM.
#[derive(Default)]
pub struct Watchers(Vec<Watcher>);

/// The VM's phase in `ledger`, if it is there.
fn phase_of(ledger: &Ledger, vm: &str) -> Option<VmPhase> {
    ledger.vms.iter().find(|r| r.vm == vm).map(|r| r.phase)
}

/// Whether a VM in `phase` has nothing more to be told of in this boot.
fn over(phase: Option<VmPhase>) -> bool {
    matches!(
        phase,
        None | Some(VmPhase::Cancelled | VmPhase::Finished | VmPhase::Failed)
    )
}

impl Watchers {
    /// Whether one more can be taken.
    pub fn full(&self) -> bool {
        self.0.len() >= MAX_WATCHERS
    }

    /// Adds `stream`, already sent VM `vm`'s record in `ledger`.
    pub fn add(&mut self, vm: &str, stream: UnixStream, ledger: &Ledger) {
        self.0.push(Watcher {
            vm: vm.to_string(),
            stream,
            told: phase_of(ledger, vm),
        });
    }

    /// Tells each connection whose VM's phase changed, and closes those whose VM's update is
    /// over and those that cannot be written to (their VMM went away).
    pub fn tell(&mut self, ledger: &Ledger) {
        self.0.retain_mut(|watcher| {
            let now = phase_of(ledger, &watcher.vm);
            if now == watcher.told {
                return true;
            }
            let reply = Reply {
                ledger: Some(ledger.of(Some(&watcher.vm))),
                ..Reply::ok()
            };
            if let Err(e) = send_line(&watcher.stream, &reply, &[]) {
                log::debug!("agent: cannot tell VM {}'s watcher: {e}", watcher.vm);
                return false;
            }
            watcher.told = now;
            !over(now)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::wire::{recv_line, MAX_REPLY};

    #[test]
    fn a_watcher_is_told_each_change_once_and_closed_when_the_update_is_over() {
        let mut ledger = Ledger::default();
        ledger.subscribe("vm1", 1).unwrap();
        ledger.subscribe("vm2", 1).unwrap();
        let mut watchers = Watchers::default();
        let (agent_end, vmm_end) = UnixStream::pair().unwrap();
        watchers.add("vm1", agent_end, &ledger);
        // Another VM's change is not vm1's news.
        ledger.ready("vm2", 2, &[]).unwrap();
        watchers.tell(&ledger);
        vmm_end.set_nonblocking(true).unwrap();
        assert!(recv_line(&vmm_end, MAX_REPLY).is_err(), "nothing told");
        vmm_end.set_nonblocking(false).unwrap();
        ledger.ready("vm1", 3, &[]).unwrap();
        watchers.tell(&ledger);
        watchers.tell(&ledger);
        let told = |stream: &UnixStream| {
            let (line, _) = recv_line(stream, MAX_REPLY).expect("told");
            let reply: Reply = serde_json::from_slice(&line).unwrap();
            reply.ledger.expect("a ledger")
        };
        let ready = told(&vmm_end);
        assert_eq!(ready.vms.len(), 1);
        assert_eq!(ready.vms[0].phase, VmPhase::Ready);
        assert_eq!(watchers.0.len(), 1);
        ledger.cancel_all(4);
        watchers.tell(&ledger);
        assert_eq!(told(&vmm_end).vms[0].phase, VmPhase::Cancelled);
        assert!(watchers.0.is_empty(), "closed once the update is over");
        assert!(
            recv_line(&vmm_end, MAX_REPLY).is_err(),
            "the connection ends"
        );
    }

    #[test]
    fn a_watcher_whose_vmm_went_away_is_dropped() {
        let mut ledger = Ledger::default();
        ledger.subscribe("vm1", 1).unwrap();
        let mut watchers = Watchers::default();
        let (agent_end, vmm_end) = UnixStream::pair().unwrap();
        watchers.add("vm1", agent_end, &ledger);
        drop(vmm_end);
        ledger.ready("vm1", 2, &[]).unwrap();
        watchers.tell(&ledger);
        assert!(watchers.0.is_empty());
    }
}
