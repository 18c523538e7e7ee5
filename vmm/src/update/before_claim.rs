//! After the kexec, first of all: what a restore does before it claims its session, while
//! the agent may still be starting (an init system starts both at once). It asks this host's
//! KVM what the state's checks need and makes the KVM VM, then waits for the agent to listen,
//! and reads what the VM's VMM was launched with (its [`LaunchRecord`], kept in the agent's
//! ledger since the VM subscribed), so the restore needs no flags. Nothing is taken from the
//! session here: every failure leaves it for the next restore.

use std::path::Path;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use luvmm_liveupdate::agent::{AgentClient, AgentClientError, Ledger};
use luvmm_resources::config::LaunchRecord;

use kvm_ioctls::VcpuFd;

use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{KvmVm, VmError};
use crate::vstate::x86_64::host_kvm::{HostKvm, ProbeError};

/// What a restore built before its claim.
pub struct BeforeClaim {
    /// This host's KVM, as the state's checks need it.
    pub host: HostKvm,
    /// The VM, made empty: it gets its RAM and state once they are retrieved.
    pub vm: KvmVm,
    /// vCPU `i`'s KVM object, `i` from 0, when the launch record said how many.
    pub vcpus: Vec<VcpuFd>,
    /// How long making these took.
    pub took_ms: f64,
}

/// The work before the claim failed; nothing was taken from the session.
#[derive(Debug, thiserror::Error)]
pub enum BeforeClaimError {
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("cannot make the KVM VM")]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("asked the agent for {waited_s} s")]
    NoAgent {
        waited_s: u64,
        #[source]
        source: AgentClientError,
    },
    #[error("VM {vm}: the launch record in the agent's ledger does not decode")]
    Record {
        vm: String,
        #[source]
        source: serde_json::Error,
    },
}

impl BeforeClaim {
    /// Asks `kvm` what the checks need and makes the VM.
    pub fn make(kvm: &Kvm) -> Result<BeforeClaim, BeforeClaimError> {
        let started = Instant::now();
        let host = HostKvm::probe(kvm)?;
        let vm = KvmVm::new(kvm)?;
        Ok(BeforeClaim {
            host,
            vm,
            vcpus: Vec::new(),
            took_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Makes the VM's `count` vCPUs (as its launch record says), unless KVM allows fewer:
    /// the state's own count is checked once it is retrieved.
    pub fn make_vcpus(&mut self, count: u32) -> Result<(), BeforeClaimError> {
        if count == 0 || count > self.host.max_vcpus {
            return Ok(());
        }
        let started = Instant::now();
        self.vcpus = (0..count)
            .map(|id| Vcpu::create_fd(&self.vm, id))
            .collect::<Result<_, _>>()?;
        self.took_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }
}

/// Waits until the agent behind `socket` answers, up to `wait`, and returns its ledger. Only a
/// socket nobody listens on yet is waited for.
pub fn wait_for_agent(
    agent: &AgentClient,
    socket: &Path,
    wait: Duration,
) -> Result<Ledger, BeforeClaimError> {
    let started = Instant::now();
    let mut said = false;
    loop {
        match agent.status() {
            Ok(ledger) => return Ok(ledger),
            Err(AgentClientError::NotRunning { .. }) if started.elapsed() < wait => {
                if !said {
                    log::info!(
                        "waiting up to {} s for the agent on {}",
                        wait.as_secs(),
                        socket.display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(BeforeClaimError::NoAgent {
                    waited_s: started.elapsed().as_secs(),
                    source,
                })
            }
        }
    }
}

/// What VM `vm`'s VMM was launched with, as `ledger` keeps it; `None` for a VM the ledger
/// does not know, or whose VMM sent no record.
pub fn launch_record(ledger: &Ledger, vm: &str) -> Result<Option<LaunchRecord>, BeforeClaimError> {
    let Some(launch) = ledger
        .vms
        .iter()
        .find(|record| record.vm == vm)
        .and_then(|record| record.launch.clone())
    else {
        return Ok(None);
    };
    serde_json::from_value(launch)
        .map(Some)
        .map_err(|source| BeforeClaimError::Record {
            vm: vm.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use luvmm_resources::config::SerialOutput;

    #[test]
    fn a_launch_record_comes_back_as_it_was_sent() {
        let mut ledger = Ledger::default();
        ledger.subscribe("vm1", 1).unwrap();
        ledger.subscribe("vm2", 1).unwrap();
        let sent = LaunchRecord::new(
            &SerialOutput::File("vm1.log".into()),
            Some(Path::new("/run/vm1.sock")),
        );
        ledger
            .record_launch("vm1", serde_json::to_value(&sent).unwrap())
            .unwrap();
        let back = launch_record(&ledger, "vm1")
            .unwrap()
            .expect("vm1's record");
        assert_eq!(back, sent);
        // Relative paths were made absolute when recorded.
        let SerialOutput::File(path) = &back.serial else {
            panic!("{back:?}");
        };
        assert!(path.is_absolute(), "{path:?}");
        assert_eq!(launch_record(&ledger, "vm2").unwrap(), None);
        assert_eq!(launch_record(&ledger, "vm3").unwrap(), None);
        ledger
            .record_launch("vm2", serde_json::json!({"serial": 7}))
            .unwrap();
        assert!(matches!(
            launch_record(&ledger, "vm2"),
            Err(BeforeClaimError::Record { .. })
        ));
    }

    #[test]
    fn the_vcpus_the_record_names_are_made_before_the_claim() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let mut before = BeforeClaim::make(&kvm).expect("before the claim");
        assert!(before.vcpus.is_empty());
        before.make_vcpus(2).expect("two vCPUs");
        assert_eq!(before.vcpus.len(), 2);
        // A count KVM cannot give is left to the state's own check.
        let mut other = BeforeClaim::make(&kvm).expect("before the claim");
        let beyond = other.host.max_vcpus + 1;
        other.make_vcpus(beyond).expect("nothing made");
        assert!(other.vcpus.is_empty());
    }
}
