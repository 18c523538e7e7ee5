//! Gathering what a restore starts from: the saved state and the RAM memfds, handed over by
//! the running VMM through its API socket, inherited as fds from a holder process, or, after
//! a host live update, retrieved from the VM's LUO session (`update::retrieve`).

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use luvmm_liveupdate::seams::RetrieveSession;

use kvm_ioctls::Kvm;
use luvmm_devices::serial::SerialOut;
use luvmm_resources::state::{self, StateError};

use crate::api::client::{ClientError, VmmClient};
use crate::builder::{Origin, RestoreArgs, VmAhead};
use crate::faults::{self, Fault};
use crate::passthrough::{HandedDevice, HandedDeviceManifest, HandedDevices};
use crate::shell::{Shell, ShellError};
use crate::takeover::Takeover;
use crate::update::before_claim::{BeforeClaim, BeforeClaimError};
use crate::update::holder::Holder;
use crate::update::retrieve::{retrieve, RetrieveError};
use crate::update::retry::AgentKeeper;
use crate::vmm::{HandoverTicket, StageManifest, StagedDevices};

/// Where the state and memory come from.
pub enum RestoreSource {
    /// Ask the VMM behind this API socket to hand its VM over.
    Socket(PathBuf),
    /// After a host live update: VM `vm_id`'s session, claimed from its holder (an agent is
    /// waited for if it is not listening yet).
    Session { vm_id: String, holder: Holder },
    /// Fds this process inherited, plus the state from an fd or a file.
    Inherited {
        state: StateSource,
        memory_fds: Vec<RawFd>,
    },
}

/// Where the saved state comes from when fds are inherited.
pub enum StateSource {
    Fd(RawFd),
    File(PathBuf),
}

/// The inputs of a restore could not be gathered. Nothing has been built yet, but for a
/// handover's VM built ahead (`Ahead`).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot build the VM ahead of the handover")]
    Ahead(#[from] ShellError),
    #[error("saved state refused")]
    State(#[from] StateError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("handover from {socket} carried {got} fds, manifest needs {expected}")]
    FdCount {
        socket: PathBuf,
        got: usize,
        expected: usize,
    },
    #[error("fd {fd} is not open in this process")]
    NotOpen { fd: RawFd },
    #[error("fd {fd} is given twice")]
    Duplicate { fd: RawFd },
    #[error("no memory fds given")]
    NoMemory,
    #[error("restore needs --from-socket, or one of --state and --state-fd with --memory-fd")]
    NoSource,
    #[error("the saved state from {from}")]
    ReadState {
        from: String,
        #[source]
        source: state::ReadError,
    },
    #[error(transparent)]
    Session(#[from] RetrieveError),
    #[error(transparent)]
    BeforeClaim(#[from] BeforeClaimError),
}

/// What a restore gathered: the inputs of `build_from_saved`; after a live update, the session
/// they came from, to finish once the VM is rebuilt; after a handover, the handover to confirm
/// once it is.
pub type Gathered = (
    RestoreArgs,
    Option<Box<dyn RetrieveSession>>,
    Option<Takeover>,
);

/// Collects the state and memfds for `build_from_saved` (after a live update, its state checked
/// against `kvm`, the KVM the VM will be rebuilt on, on the VM `before` made if the caller
/// made it, and waited for the agent, already), and what must be finished or confirmed once
/// the VM is rebuilt.
pub fn collect(
    source: RestoreSource,
    serial: SerialOut,
    kvm: &Kvm,
    before: Option<BeforeClaim>,
) -> Result<Gathered, RestoreError> {
    let mut started = Instant::now();
    let (mut args, session, takeover) = match source {
        RestoreSource::Socket(socket) => {
            let (args, takeover) = from_socket(&socket, serial)?;
            (args, None, Some(takeover))
        }
        RestoreSource::Session { vm_id, holder } => {
            // What needs no session first, while the agent may still be starting.
            let agent = holder.client();
            // A caller that made `before` has heard from the holder already.
            let before = match before {
                Some(before) => before,
                None => {
                    let before = BeforeClaim::make(kvm)?;
                    holder.ledger()?;
                    before
                }
            };
            started = Instant::now();
            let retrieved = retrieve(&vm_id, agent.as_ref(), &before.host)?;
            let keeper = AgentKeeper::new(holder.client(), &vm_id);
            let args = RestoreArgs {
                state: retrieved.state,
                state_bytes: retrieved.state_bytes,
                state_memfd: Some(retrieved.state_memfd),
                memfds: retrieved.memfds,
                origin: Origin::LiveUpdate {
                    devices: retrieved.devices,
                    earlier_iommu: retrieved.earlier_iommu,
                    keeper: Box::new(keeper),
                    paused_at: retrieved.source_paused_at,
                    retrieve_ram_ms: retrieved.retrieve_ram_ms,
                },
                serial,
                gather_ms: 0.0,
                ahead: Some(VmAhead {
                    vm: before.vm,
                    vcpus: before.vcpus,
                    took_ms: before.took_ms,
                }),
            };
            (args, Some(retrieved.session), None)
        }
        RestoreSource::Inherited { state, memory_fds } => {
            (from_inherited(state, memory_fds, serial)?, None, None)
        }
    };
    args.gather_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok((args, session, takeover))
}

fn from_inherited(
    state: StateSource,
    memory_fds: Vec<RawFd>,
    serial: SerialOut,
) -> Result<RestoreArgs, RestoreError> {
    if memory_fds.is_empty() {
        return Err(RestoreError::NoMemory);
    }
    let state_fd = match &state {
        StateSource::Fd(fd) => Some(*fd),
        StateSource::File(_) => None,
    };
    let mut all: Vec<RawFd> = memory_fds.clone();
    all.extend(state_fd);
    let mut memfds = claim_fds(&all)?;
    let state_memfd = state_fd.and_then(|_| memfds.pop());
    let blob = match (&state, &state_memfd) {
        (StateSource::Fd(fd), Some(file)) => read_state(file, None, &format!("fd {fd}"))?,
        (StateSource::File(path), _) => read_state_file(path)?,
        (StateSource::Fd(fd), None) => return Err(RestoreError::NotOpen { fd: *fd }),
    };
    Ok(RestoreArgs {
        state: state::decode(&blob)?,
        state_bytes: blob.len() as u64,
        state_memfd,
        memfds,
        origin: Origin::Saved,
        serial,
        gather_ms: 0.0,
        ahead: None,
    })
}

/// Builds the KVM VM, guest RAM and passthrough devices of the VM behind `socket` while that
/// VMM runs it on: the first half of a handover, out of the guest's blackout.
pub fn build_ahead(socket: &Path, kvm: &Kvm) -> Result<Shell, RestoreError> {
    let (staged, memfds, devices) = stage(socket)?;
    let shell = Shell::build(
        kvm,
        &staged.memory,
        memfds,
        staged.memory_thp,
        staged.vcpus,
        devices,
    )?;
    if faults::armed(Fault::StopAfterStage) {
        faults::stop_here();
    }
    Ok(shell)
}

/// The devices a stage handed out: their setup and their fds.
type StagedFds = Option<(StagedDevices, HandedDevices)>;

/// What a target builds on before it asks for the VM, from the VMM behind `socket`, which
/// runs on: guest RAM's layout, its memfds (one per region), the vCPU count, and the
/// passthrough devices' setup and fds.
fn stage(socket: &Path) -> Result<(StageManifest, Vec<File>, StagedFds), RestoreError> {
    let mut staged = VmmClient::new(socket).stage_handover()?;
    let regions = staged.manifest.memory.regions.len();
    let devices = staged.manifest.devices.take();
    let handed = devices.as_ref().map_or(&[][..], |d| &d.handed[..]);
    let mut fds = HandedFds::new(socket, staged.fds, regions + device_fd_count(handed))?;
    let memfds = fds.files(regions)?;
    let devices = match devices {
        Some(devices) => {
            let handed = fds.devices(&devices.handed)?;
            Some((devices, handed))
        }
        None => None,
    };
    Ok((staged.manifest, memfds, devices))
}

/// The fds a handover brings for `devices`: the iommufd, then per device its cdev and its
/// interrupt eventfds; none without devices.
fn device_fd_count(devices: &[HandedDeviceManifest]) -> usize {
    let per_device: usize = devices.iter().map(|d| 1 + d.interrupt_fds).sum();
    usize::from(!devices.is_empty()) + per_device
}

/// The fds of a reply, taken in the order its manifest lists them once their count is checked.
struct HandedFds {
    fds: std::vec::IntoIter<OwnedFd>,
    socket: PathBuf,
    expected: usize,
}

impl HandedFds {
    /// Refuses a reply whose fds are not the `expected` count.
    fn new(socket: &Path, fds: Vec<OwnedFd>, expected: usize) -> Result<HandedFds, RestoreError> {
        if fds.len() != expected {
            return Err(RestoreError::FdCount {
                socket: socket.to_path_buf(),
                got: fds.len(),
                expected,
            });
        }
        Ok(HandedFds {
            fds: fds.into_iter(),
            socket: socket.to_path_buf(),
            expected,
        })
    }

    /// The next fd; the count was checked, so this finds one.
    fn next(&mut self) -> Result<OwnedFd, RestoreError> {
        self.fds.next().ok_or_else(|| RestoreError::FdCount {
            socket: self.socket.clone(),
            got: 0,
            expected: self.expected,
        })
    }

    fn files(&mut self, count: usize) -> Result<Vec<File>, RestoreError> {
        (0..count).map(|_| self.next().map(File::from)).collect()
    }

    /// The iommufd, then per device in `manifest` its cdev and its interrupt eventfds.
    fn devices(
        &mut self,
        manifest: &[HandedDeviceManifest],
    ) -> Result<HandedDevices, RestoreError> {
        let iommufd = File::from(self.next()?);
        let devices = manifest
            .iter()
            .map(|device| {
                Ok(HandedDevice {
                    fd: File::from(self.next()?),
                    interrupts: (0..device.interrupt_fds)
                        .map(|_| self.next())
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<_, RestoreError>>()?;
        Ok(HandedDevices { iommufd, devices })
    }
}

/// Asks the VMM behind `socket` for its VM, which it pauses and saves now if it runs: this
/// process built what it could beforehand (see [`stage`]).
fn from_socket(socket: &Path, serial: SerialOut) -> Result<(RestoreArgs, Takeover), RestoreError> {
    let handover = VmmClient::new(socket).pause_and_hand_over_to_this_process()?;
    let manifest = handover.manifest;
    let regions = manifest.memory.regions.len();
    // The state memfd, the RAM, the devices, the ticket.
    let expected = 1 + regions + device_fd_count(&manifest.passthrough) + 1;
    let mut fds = HandedFds::new(socket, handover.fds, expected)?;
    let state_memfd = File::from(fds.next()?);
    let memfds = fds.files(regions)?;
    let devices = if manifest.passthrough.is_empty() {
        None
    } else {
        Some(fds.devices(&manifest.passthrough)?)
    };
    let takeover = Takeover::new(socket, &manifest, HandoverTicket::from_fd(fds.next()?));
    let paused_at = manifest
        .paused_at_unix_ns
        .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns));
    let blob = read_state(
        &state_memfd,
        Some(manifest.state_bytes),
        &format!("handover from {}", socket.display()),
    )?;
    let args = RestoreArgs {
        state: state::decode(&blob)?,
        state_bytes: blob.len() as u64,
        state_memfd: Some(state_memfd),
        memfds,
        origin: Origin::Handover {
            devices,
            manifest: manifest.passthrough,
            paused_at,
            source_save_ms: manifest.pause_to_saved_us.map(|us| us as f64 / 1e3),
            handed_after_pause_ms: paused_at
                .and_then(|at| at.elapsed().ok())
                .map(|since| since.as_secs_f64() * 1e3),
        },
        serial,
        gather_ms: 0.0,
        ahead: None,
    };
    Ok((args, takeover))
}

/// Takes ownership of inherited fds after checking each is open and named once.
fn claim_fds(fds: &[RawFd]) -> Result<Vec<File>, RestoreError> {
    for (i, &fd) in fds.iter().enumerate() {
        if fds[..i].contains(&fd) {
            return Err(RestoreError::Duplicate { fd });
        }
        // SAFETY: F_GETFD only reads the fd's flags; an invalid fd yields EBADF.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(RestoreError::NotOpen { fd });
        }
    }
    Ok(fds
        .iter()
        // SAFETY: each fd is open (checked above), distinct, and was passed to this process for
        // it to own; nothing else in luvmm refers to these numbers.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect())
}

/// Reads a state blob from `file` (its first `len` bytes, or all of it); `from` names where it
/// came from, for the error.
fn read_state(file: &File, len: Option<u64>, from: &str) -> Result<Vec<u8>, RestoreError> {
    state::read_blob(file, len).map_err(|source| RestoreError::ReadState {
        from: from.to_string(),
        source,
    })
}

/// Reads a state file; only a regular file is opened, so a FIFO cannot hang the restore.
fn read_state_file(path: &Path) -> Result<Vec<u8>, RestoreError> {
    let from = path.display().to_string();
    let file = luvmm_resources::files::open_regular(path).map_err(|e| RestoreError::ReadState {
        from: from.clone(),
        source: state::ReadError::Io(e),
    })?;
    read_state(&file, None, &from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::IntoRawFd;

    fn raw_memfd(contents: &[u8]) -> RawFd {
        let fd = nix::sys::memfd::memfd_create("restore-test", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        let mut file = File::from(fd);
        file.write_all(contents).expect("write");
        file.into_raw_fd()
    }

    fn inherited(state: StateSource, memory_fds: Vec<RawFd>) -> Result<RestoreArgs, RestoreError> {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        collect(
            RestoreSource::Inherited { state, memory_fds },
            Box::new(std::io::sink()),
            &kvm,
            None,
        )
        .map(|(args, session, takeover)| {
            assert!(session.is_none(), "inherited fds bring no session");
            assert!(
                takeover.is_none(),
                "inherited fds bring no handover to confirm"
            );
            args
        })
    }

    #[test]
    fn inherited_fds_are_checked_before_they_are_owned() {
        assert!(matches!(
            inherited(StateSource::Fd(3), Vec::new()),
            Err(RestoreError::NoMemory)
        ));
        let ram = raw_memfd(b"");
        assert!(matches!(
            inherited(StateSource::Fd(ram), vec![ram]),
            Err(RestoreError::Duplicate { fd }) if fd == ram
        ));
        assert!(matches!(
            inherited(StateSource::Fd(-1), vec![ram]),
            Err(RestoreError::NotOpen { fd: -1 })
        ));
        // SAFETY: `ram` was made above and nothing owns it after the refusals.
        drop(unsafe { File::from_raw_fd(ram) });
    }

    #[test]
    fn an_inherited_state_fd_is_read_and_decoded() {
        let golden = include_bytes!("../../tests/golden/1.2/state.bin");
        let state = raw_memfd(golden);
        let ram = raw_memfd(&[0; 4096]);
        let args = inherited(StateSource::Fd(state), vec![ram]).expect("collect");
        assert_eq!(args.state_bytes, golden.len() as u64);
        assert_eq!(args.memfds.len(), 1);
        assert!(args.state_memfd.is_some());
        assert!(matches!(args.origin, Origin::Saved));

        let ram = raw_memfd(&[0; 4096]);
        let garbage = raw_memfd(b"not a state");
        assert!(matches!(
            inherited(StateSource::Fd(garbage), vec![ram]),
            Err(RestoreError::State(_))
        ));
    }
}
