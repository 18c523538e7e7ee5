//! What a VMM writes to, opened or checked before it takes anything it cannot give back: a
//! restore after a live update claims its session once, so a serial path or an API socket path
//! that cannot be used must refuse the restore before the claim, not after it.

use std::fs::OpenOptions;
use std::io::{ErrorKind, IsTerminal, LineWriter};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use luvmm_devices::serial::SerialOut;
use luvmm_resources::config::SerialOutput;
use nix::unistd::{access, AccessFlags};
use vmm_sys_util::terminal::Terminal;

/// The longest path a Unix socket can be bound at (`sun_path`, less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// An output the VMM would fail to open.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("serial output {path}: cannot be opened for writing")]
    Serial {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serial output {path}: is a directory")]
    SerialIsDirectory { path: PathBuf },
    #[error("API socket {path}: something that is not a socket is there already")]
    SocketExists { path: PathBuf },
    #[error("API socket {path}: is a directory; name the socket file in it (DIR/vm.sock)")]
    SocketIsDirectory { path: PathBuf },
    #[error("API socket {path}: a process is serving on it already")]
    SocketInUse { path: PathBuf },
    #[error("API socket {path}: a stale socket is there and cannot be removed")]
    StaleSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API socket {path}: its directory does not exist")]
    SocketDirectory { path: PathBuf },
    #[error("API socket {path}: its directory is not writable")]
    SocketNotWritable {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "API socket {path}: too long for a Unix socket: {len} bytes with luvmm's temporary \
         suffix, at most {MAX_SOCKET_PATH} bytes"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
}

/// The terminal on standard input in raw mode, for a guest console a person types into: no
/// line editing, no echo, no signals (Ctrl-C goes to the guest, as with Firecracker; end the
/// VM from the guest or through the API). Put back in canonical mode when dropped.
pub struct RawConsole(());

impl RawConsole {
    /// Enters raw mode when the guest's console is this process's standard output and
    /// standard input is a terminal; `None` otherwise (a pipe or a file feeds the guest as
    /// it is).
    pub fn enter(serial: &SerialOutput) -> Option<RawConsole> {
        let stdin = std::io::stdin();
        if *serial != SerialOutput::Stdout || !stdin.is_terminal() {
            return None;
        }
        // The lock is held only for the call: the event loop reads standard input too.
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(RawConsole(())),
            Err(e) => {
                log::warn!(
                    "cannot put the terminal in raw mode, the guest console is line-buffered: {e}"
                );
                None
            }
        }
    }
}

impl Drop for RawConsole {
    fn drop(&mut self) {
        if let Err(e) = std::io::stdin().lock().set_canon_mode() {
            log::warn!("cannot put the terminal back in canonical mode: {e}");
        }
    }
}

/// Opens the serial output (a file is created if missing and appended to) and checks that an
/// API socket can be bound at `api_socket`. A socket left there by a luvmm that died (nobody
/// accepts on it) is removed; one a live process serves is refused.
pub fn open_outputs(
    serial: &SerialOutput,
    api_socket: Option<&Path>,
) -> Result<SerialOut, OutputError> {
    let serial = open_serial(serial)?;
    if let Some(path) = api_socket {
        check_socket(path, None)?;
    }
    Ok(serial)
}

/// As [`open_outputs`], for a VMM taking a VM over from the one serving `source`: its API
/// socket may be the source's own (a VMM upgrade keeps the path), which it takes over once
/// the source let the VM go.
pub fn open_outputs_replacing(
    serial: &SerialOutput,
    api_socket: Option<&Path>,
    source: &Path,
) -> Result<SerialOut, OutputError> {
    let serial = open_serial(serial)?;
    if let Some(path) = api_socket {
        check_socket(path, Some(source))?;
    }
    Ok(serial)
}

/// Opens where the guest's COM1 goes.
pub fn open_serial(output: &SerialOutput) -> Result<SerialOut, OutputError> {
    Ok(match output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Discard => Box::new(std::io::sink()),
        SerialOutput::File(path) => {
            if std::fs::metadata(path).is_ok_and(|meta| meta.is_dir()) {
                return Err(OutputError::SerialIsDirectory { path: path.clone() });
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| OutputError::Serial {
                    path: path.clone(),
                    source,
                })?;
            // Line-buffered, so readers of the file see whole guest lines.
            Box::new(LineWriter::new(file))
        }
    })
}

/// Whether `a` and `b` name the same file.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Checks that an API socket can be bound at `path`; the socket of `replacing`, if that is
/// what is there, will be replaced.
fn check_socket(path: &Path, replacing: Option<&Path>) -> Result<(), OutputError> {
    let owned = || path.to_path_buf();
    let replaced = replacing.is_some_and(|source| same_file(path, source));
    if let (false, Ok(meta)) = (replaced, std::fs::symlink_metadata(path)) {
        if meta.is_dir() {
            return Err(OutputError::SocketIsDirectory { path: owned() });
        }
        if !meta.file_type().is_socket() {
            return Err(OutputError::SocketExists { path: owned() });
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(OutputError::SocketInUse { path: owned() }),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| OutputError::StaleSocket {
                    path: owned(),
                    source,
                })?;
                log::warn!(
                    "API socket {}: removed a stale socket nobody served",
                    path.display()
                );
            }
            Err(source) => {
                return Err(OutputError::StaleSocket {
                    path: owned(),
                    source,
                })
            }
        }
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(OutputError::SocketDirectory { path: owned() });
    }
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|source| {
        OutputError::SocketNotWritable {
            path: owned(),
            source,
        }
    })?;
    // The socket is bound under `PATH.<pid>.tmp` first, then renamed (`unix::bind_owner_only`).
    let len = path.as_os_str().len() + format!(".{}.tmp", std::process::id()).len();
    if len > MAX_SOCKET_PATH {
        return Err(OutputError::SocketPathTooLong { path: owned(), len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luvmm-outputs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn nothing_lost_an_unusable_serial_path_is_named() {
        let dir = scratch("serial");
        let missing = SerialOutput::File(dir.join("no/such/dir/serial.log"));
        assert!(matches!(
            open_outputs(&missing, None),
            Err(OutputError::Serial { .. })
        ));
        let directory = SerialOutput::File(dir.clone());
        assert!(matches!(
            open_outputs(&directory, None),
            Err(OutputError::SerialIsDirectory { .. })
        ));
        let fine = SerialOutput::File(dir.join("serial.log"));
        open_outputs(&fine, None).expect("a new file in an existing directory");
        open_outputs(&SerialOutput::Discard, None).expect("nothing to open");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nothing_lost_an_unusable_api_socket_path_is_named() {
        let dir = scratch("socket");
        let taken = dir.join("taken.sock");
        std::fs::write(&taken, b"").expect("a file in the way");
        let check = |path: &Path| open_outputs(&SerialOutput::Discard, Some(path)).map(drop);
        assert!(matches!(
            check(&dir),
            Err(OutputError::SocketIsDirectory { .. })
        ));
        assert!(matches!(
            check(&taken),
            Err(OutputError::SocketExists { .. })
        ));
        let served = dir.join("served.sock");
        let listener = UnixListener::bind(&served).expect("a live socket");
        assert!(matches!(
            check(&served),
            Err(OutputError::SocketInUse { .. })
        ));
        drop(listener);
        check(&served).expect("a stale socket is removed");
        assert!(!served.exists());
        assert!(matches!(
            check(&dir.join("missing/api.sock")),
            Err(OutputError::SocketDirectory { .. })
        ));
        let long = dir.join("x".repeat(MAX_SOCKET_PATH));
        assert!(matches!(
            check(&long),
            Err(OutputError::SocketPathTooLong { .. })
        ));
        check(&dir.join("api.sock")).expect("a free path in a writable directory");
        let _listener = UnixListener::bind(&served).expect("a live socket again");
        let replacing = |path: &Path| {
            open_outputs_replacing(&SerialOutput::Discard, Some(path), &served).map(drop)
        };
        replacing(&served).expect("the source's own socket is taken over");
        assert!(matches!(
            replacing(&long),
            Err(OutputError::SocketPathTooLong { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
