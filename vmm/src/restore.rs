//! Gathering what a restore starts from: the saved state and the RAM memfds, either handed
//! over by the running VMM through its API socket or inherited as fds from a holder process.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use luvmm_resources::config::SerialOutput;
use luvmm_resources::state::{self, StateError, HEADER_LEN, MAX_BODY_LEN};

use crate::api::client::{ClientError, VmmClient};
use crate::builder::RestoreArgs;
use crate::passthrough::{HandedDevice, HandedDevices};

/// Where the state and memory come from.
pub enum RestoreSource {
    /// Ask the VMM behind this API socket to hand its VM over.
    Socket(PathBuf),
    /// After a host live update: VM `vm_id`'s session, claimed from the agent.
    Session {
        vm_id: String,
        agent_socket: PathBuf,
    },
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

/// The inputs of a restore could not be gathered. Nothing has been built yet.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
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
    #[error("cannot read the saved state from {from}")]
    ReadState {
        from: String,
        #[source]
        source: std::io::Error,
    },
    #[error("saved state in {from} is {len} bytes, more than the format allows")]
    StateTooLarge { from: String, len: u64 },
    #[error("session {session}: {what}")]
    Session {
        session: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "session {session}: the saved state is refused before anything else is retrieved: {why}"
    )]
    SessionState { session: String, why: String },
}

/// Collects the state and memfds for `build_from_saved`.
pub fn collect(source: RestoreSource, serial: SerialOutput) -> Result<RestoreArgs, RestoreError> {
    let started = std::time::Instant::now();
    let mut args = gather(source, serial)?;
    args.gather_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(args)
}

fn gather(source: RestoreSource, serial: SerialOutput) -> Result<RestoreArgs, RestoreError> {
    match source {
        RestoreSource::Socket(socket) => from_socket(&socket, serial),
        RestoreSource::Session {
            vm_id,
            agent_socket,
        } => crate::update::retrieve::from_session(&vm_id, &agent_socket, serial),
        RestoreSource::Inherited { state, memory_fds } => {
            if memory_fds.is_empty() {
                return Err(RestoreError::NoMemory);
            }
            let state_fd = match &state {
                StateSource::Fd(fd) => Some(*fd),
                StateSource::File(_) => None,
            };
            let mut all: Vec<RawFd> = memory_fds.clone();
            all.extend(state_fd);
            let files = claim_fds(&all)?;
            let (memfds, state_memfd) = match state_fd {
                Some(_) => {
                    let mut files = files;
                    let state_file = files.pop();
                    (files, state_file)
                }
                None => (files, None),
            };
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
                devices: None,
                device_manifest: Vec::new(),
                source_paused_at: None,
                session: None,
                serial,
                gather_ms: 0.0,
                retrieve_ram_ms: None,
            })
        }
    }
}

fn from_socket(socket: &Path, serial: SerialOutput) -> Result<RestoreArgs, RestoreError> {
    let handover = VmmClient::new(socket).handover()?;
    let manifest = handover.manifest;
    let regions = manifest.memory.regions.len();
    let device_fds: usize = manifest
        .passthrough
        .iter()
        .map(|d| 1 + d.interrupt_fds)
        .sum();
    let iommufd = usize::from(!manifest.passthrough.is_empty());
    let expected = 1 + regions + iommufd + device_fds;
    if handover.fds.len() != expected {
        return Err(RestoreError::FdCount {
            socket: socket.to_path_buf(),
            got: handover.fds.len(),
            expected,
        });
    }
    // The count was checked above: every `next` below finds its fd.
    let mut fds = handover.fds.into_iter();
    let mut next = || {
        fds.next().ok_or_else(|| RestoreError::FdCount {
            socket: socket.to_path_buf(),
            got: 0,
            expected,
        })
    };
    let state_memfd = File::from(next()?);
    let memfds = (0..regions)
        .map(|_| next().map(File::from))
        .collect::<Result<Vec<_>, _>>()?;
    let devices = if manifest.passthrough.is_empty() {
        None
    } else {
        let iommufd = File::from(next()?);
        let mut devices = Vec::with_capacity(manifest.passthrough.len());
        for device in &manifest.passthrough {
            devices.push(HandedDevice {
                fd: File::from(next()?),
                interrupts: (0..device.interrupt_fds)
                    .map(|_| next())
                    .collect::<Result<_, _>>()?,
            });
        }
        Some(HandedDevices { iommufd, devices })
    };
    let blob = read_state(
        &state_memfd,
        Some(manifest.state_bytes),
        &format!("handover from {}", socket.display()),
    )?;
    Ok(RestoreArgs {
        state: state::decode(&blob)?,
        state_bytes: blob.len() as u64,
        state_memfd: Some(state_memfd),
        memfds,
        devices,
        device_manifest: manifest.passthrough,
        source_paused_at: manifest
            .paused_at_unix_ns
            .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns)),
        session: None,
        serial,
        gather_ms: 0.0,
        retrieve_ram_ms: None,
    })
}

/// Tells the VMM behind `socket` that this process rebuilt its VM and takes it over. Until
/// then that VMM can still resume it; after this it refuses to. If it refuses now (it was
/// resumed meanwhile), it keeps the VM and this process must not run it.
pub fn complete_handover(socket: &Path) -> Result<(), RestoreError> {
    Ok(VmmClient::new(socket).complete_handover()?)
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

const MAX_STATE_BYTES: u64 = HEADER_LEN as u64 + MAX_BODY_LEN;

pub(crate) fn read_state(
    file: &File,
    len: Option<u64>,
    from: &str,
) -> Result<Vec<u8>, RestoreError> {
    let read_err = |source| RestoreError::ReadState {
        from: from.to_string(),
        source,
    };
    let len = match len {
        Some(len) => len,
        None => file.metadata().map_err(read_err)?.len(),
    };
    if len > MAX_STATE_BYTES {
        return Err(RestoreError::StateTooLarge {
            from: from.to_string(),
            len,
        });
    }
    let mut file = file;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut blob = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut blob).map_err(read_err)?;
    Ok(blob)
}

fn read_state_file(path: &Path) -> Result<Vec<u8>, RestoreError> {
    let from = path.display().to_string();
    let file = File::open(path).map_err(|source| RestoreError::ReadState {
        from: from.clone(),
        source,
    })?;
    read_state(&file, None, &from)
}
