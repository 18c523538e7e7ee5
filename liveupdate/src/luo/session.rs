//! `/dev/liveupdate` and its sessions as typed fd wrappers.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::uapi::{
    FdArg, FinishArg, GetNameArg, SessionArg, LIVEUPDATE_IOCTL_CREATE_SESSION,
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION, LIVEUPDATE_SESSION_FINISH, LIVEUPDATE_SESSION_GET_NAME,
    LIVEUPDATE_SESSION_NAME_LENGTH, LIVEUPDATE_SESSION_PRESERVE_FD, LIVEUPDATE_SESSION_RETRIEVE_FD,
};

/// The LUO device node.
pub const DEVICE_PATH: &str = "/dev/liveupdate";

/// A caller-chosen id for a preserved file, unique within its session.
pub type Token = u64;

/// A LUO operation failed; every variant says what happened in LUO's terms.
#[derive(Debug, thiserror::Error)]
pub enum LuoError {
    /// No `/dev/liveupdate`: the kernel lacks LUO or it is off.
    #[error("LUO not enabled: boot a kernel with CONFIG_LIVEUPDATE and `liveupdate=on kho=on`")]
    NotEnabled,
    /// `/dev/liveupdate` is open elsewhere; it admits one open file at a time.
    #[error("/dev/liveupdate is held by another process (only one may open it at a time)")]
    Busy,
    /// The previous kernel's sessions could not be rebuilt here (a preserved file had no
    /// handler in this kernel); LUO keeps failing and those sessions are lost.
    #[error("/dev/liveupdate fails with EIO: the sessions handed over by the previous kernel could not be restored (a preserved file type has no handler in this kernel); they are lost")]
    Deserialize,
    /// Opening `/dev/liveupdate` failed otherwise.
    #[error("cannot open /dev/liveupdate")]
    Open(#[source] io::Error),
    /// A session name is empty, too long or holds a NUL.
    #[error("invalid session name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// An outgoing session already has this name.
    #[error("session {name:?} already exists")]
    SessionExists { name: String },
    /// No incoming session has this name.
    #[error("no session {name:?} was handed over by the previous kernel")]
    SessionNotFound { name: String },
    /// The incoming session was already retrieved once (retrieval is one-shot).
    #[error("session {name:?} was already retrieved in this boot")]
    SessionAlreadyRetrieved { name: String },
    /// The token is taken in this session.
    #[error("session {session:?}: token {token:#x} is already used")]
    TokenInUse { session: String, token: Token },
    /// The same file (same inode, for memfds) is preserved already, in this or another session.
    #[error("session {session:?}: the file for token {token:#x} is already preserved (in this or another session)")]
    AlreadyPreserved { session: String, token: Token },
    /// No LUO file handler in this kernel accepts this kind of file.
    #[error("session {session:?}: this kernel cannot preserve the file for token {token:#x} (no LUO handler for its type)")]
    NotPreservable { session: String, token: Token },
    /// The fd is not open.
    #[error("session {session:?}: fd {fd} is not open")]
    BadFd { session: String, fd: RawFd },
    /// The operation is for the other kind of session (preserve needs outgoing; retrieve and
    /// finish need incoming), or an argument was refused.
    #[error("session {session:?}: {op} refused (EINVAL): wrong session kind or argument")]
    Invalid { session: String, op: &'static str },
    /// The token was not preserved in the previous kernel's session.
    #[error("session {session:?}: no file was preserved under token {token:#x}")]
    TokenNotFound { session: String, token: Token },
    /// A file's handler refused to finish yet; nothing was released and FINISH may be retried.
    #[error(
        "session {session:?}: FINISH refused (EBUSY): a preserved file is not ready to be released"
    )]
    FinishBusy { session: String },
    /// Any other errno, with the uAPI's meaning for it.
    #[error("session {session:?}: {op} failed: {meaning}")]
    Ioctl {
        session: String,
        op: &'static str,
        meaning: String,
        #[source]
        source: io::Error,
    },
}

/// The uAPI's general meaning of an errno, for errors no specific variant covers.
fn errno_meaning(errno: i32) -> String {
    match errno {
        libc::ENOTTY => "ENOTTY: this kernel does not know the ioctl".into(),
        libc::E2BIG => {
            "E2BIG: argument larger than the kernel knows, with non-zero extra bytes".into()
        }
        libc::EOPNOTSUPP => "EOPNOTSUPP: a field has an unsupported value".into(),
        libc::EINVAL => "EINVAL: a field is wrong".into(),
        libc::ENOENT => "ENOENT: no such token or name".into(),
        libc::ENOMEM => "ENOMEM: the kernel is out of memory".into(),
        libc::EOVERFLOW => "EOVERFLOW: arithmetic overflow in the kernel".into(),
        libc::EFBIG => "EFBIG: the file is too large to preserve".into(),
        libc::EPERM => "EPERM: not permitted".into(),
        other => io::Error::from_raw_os_error(other).to_string(),
    }
}

/// A validated session name: 1 to 63 bytes, no NUL.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionName(String);

impl SessionName {
    /// Checks `name` against the kernel's rules before any ioctl sees it.
    pub fn new(name: &str) -> Result<SessionName, LuoError> {
        let reason = if name.is_empty() {
            Some("empty")
        } else if name.len() >= LIVEUPDATE_SESSION_NAME_LENGTH {
            Some("longer than 63 bytes")
        } else if name.as_bytes().contains(&0) {
            Some("contains a NUL byte")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(LuoError::InvalidName {
                name: name.to_string(),
                reason,
            }),
            None => Ok(SessionName(name.to_string())),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs one LUO ioctl on `fd` with `arg`; `Err` holds the errno.
fn luo_ioctl<T>(fd: &impl AsRawFd, request: libc::c_ulong, arg: &mut T) -> Result<(), i32> {
    // SAFETY: `request` is one of the LUO ioctls and `arg` is the matching #[repr(C)] struct
    // with its `size` field set to its own size, so the kernel reads and writes at most
    // `size_of::<T>()` bytes of it; `fd` is open for the duration of the call.
    let ret = unsafe { ioctl_with_mut_ref(fd, request, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

/// Takes ownership of an fd the kernel just returned in an ioctl argument.
fn owned(fd: i32) -> OwnedFd {
    // SAFETY: the ioctl succeeded and installed `fd` in this process's table for the caller;
    // nothing else refers to it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The open `/dev/liveupdate`. Only one process may hold it, so hold it briefly: sessions live
/// on after it is closed.
pub struct LiveUpdate {
    file: File,
}

impl LiveUpdate {
    /// Opens `/dev/liveupdate`.
    pub fn open() -> Result<LiveUpdate, LuoError> {
        Self::open_at(Path::new(DEVICE_PATH))
    }

    /// Opens the LUO device at `path` (tests point it elsewhere).
    pub fn open_at(path: &Path) -> Result<LiveUpdate, LuoError> {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => Ok(LiveUpdate { file }),
            Err(e) => Err(match e.raw_os_error() {
                Some(libc::ENOENT) => LuoError::NotEnabled,
                Some(libc::EBUSY) => LuoError::Busy,
                Some(libc::EIO) => LuoError::Deserialize,
                _ => LuoError::Open(e),
            }),
        }
    }

    /// Creates an outgoing session.
    pub fn create_session(&self, name: &SessionName) -> Result<OutgoingSession, LuoError> {
        let fd = self.session_ioctl(
            LIVEUPDATE_IOCTL_CREATE_SESSION(),
            name,
            "CREATE_SESSION",
            |errno, name| match errno {
                libc::EEXIST => Some(LuoError::SessionExists { name }),
                libc::EINVAL => Some(LuoError::InvalidName {
                    name,
                    reason: "refused by the kernel",
                }),
                _ => None,
            },
        )?;
        Ok(OutgoingSession {
            fd,
            name: name.clone(),
        })
    }

    /// Retrieves a session the previous kernel handed over. One-shot per boot.
    pub fn retrieve_session(&self, name: &SessionName) -> Result<IncomingSession, LuoError> {
        let fd = self.session_ioctl(
            LIVEUPDATE_IOCTL_RETRIEVE_SESSION(),
            name,
            "RETRIEVE_SESSION",
            |errno, name| match errno {
                libc::ENOENT => Some(LuoError::SessionNotFound { name }),
                libc::EINVAL => Some(LuoError::SessionAlreadyRetrieved { name }),
                _ => None,
            },
        )?;
        Ok(IncomingSession {
            fd,
            name: name.clone(),
        })
    }

    /// Runs a device ioctl that takes a session name and returns a session fd; `specific`
    /// turns the errnos this ioctl defines into their typed errors.
    fn session_ioctl(
        &self,
        request: libc::c_ulong,
        name: &SessionName,
        op: &'static str,
        specific: fn(i32, String) -> Option<LuoError>,
    ) -> Result<OwnedFd, LuoError> {
        let mut arg = SessionArg::new(name.as_str().as_bytes());
        luo_ioctl(&self.file, request, &mut arg).map_err(|errno| {
            specific(errno, name.to_string()).unwrap_or_else(|| ioctl_error(name, op, errno))
        })?;
        Ok(owned(arg.fd))
    }
}

fn ioctl_error(session: &SessionName, op: &'static str, errno: i32) -> LuoError {
    LuoError::Ioctl {
        session: session.to_string(),
        op,
        meaning: errno_meaning(errno),
        source: io::Error::from_raw_os_error(errno),
    }
}

fn session_name(fd: &OwnedFd, name: &SessionName) -> Result<String, LuoError> {
    let mut arg = GetNameArg::sized();
    luo_ioctl(fd, LIVEUPDATE_SESSION_GET_NAME(), &mut arg)
        .map_err(|errno| ioctl_error(name, "GET_NAME", errno))?;
    let len = arg
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(arg.name.len());
    Ok(String::from_utf8_lossy(&arg.name[..len]).into_owned())
}

/// A session before the kexec. Files preserved into it stay preserved only while this fd is
/// open somewhere: **dropping the last copy unpreserves every file** (that is LUO's cancel
/// path). Hand it to the process that holds sessions across the kexec with
/// [`OutgoingSession::into_fd`], or call [`OutgoingSession::cancel`] to call the update off.
#[must_use = "dropping an outgoing session unpreserves every file in it"]
pub struct OutgoingSession {
    fd: OwnedFd,
    name: SessionName,
}

impl OutgoingSession {
    /// Preserves `file` under `token`. For a memfd this pins and fills every page, so its cost
    /// grows with the file's size; from now on the memfd's size is frozen.
    pub fn preserve(&self, file: BorrowedFd<'_>, token: Token) -> Result<(), LuoError> {
        let mut arg = FdArg::new(file.as_raw_fd(), token);
        let session = self.name.to_string();
        luo_ioctl(&self.fd, LIVEUPDATE_SESSION_PRESERVE_FD(), &mut arg).map_err(|errno| match errno
        {
            libc::EEXIST => LuoError::TokenInUse { session, token },
            libc::EBUSY => LuoError::AlreadyPreserved { session, token },
            libc::ENOENT => LuoError::NotPreservable { session, token },
            libc::EBADF => LuoError::BadFd {
                session,
                fd: file.as_raw_fd(),
            },
            libc::EINVAL => LuoError::Invalid {
                session,
                op: "PRESERVE_FD",
            },
            _ => ioctl_error(&self.name, "PRESERVE_FD", errno),
        })
    }

    /// Retrieval is for incoming sessions only; on an outgoing one the kernel says EINVAL.
    /// Kept so callers (and tests) can observe that rule through the typed error.
    pub fn retrieve(&self, token: Token) -> Result<OwnedFd, LuoError> {
        retrieve_fd(&self.fd, &self.name, token)
    }

    /// The session's name as the kernel reports it.
    pub fn kernel_name(&self) -> Result<String, LuoError> {
        session_name(&self.fd, &self.name)
    }

    /// The name it was created with.
    pub fn name(&self) -> &SessionName {
        &self.name
    }

    /// Calls the update off for this session: every preserved file is released.
    pub fn cancel(self) {
        drop(self.fd);
    }

    /// Gives up the wrapper and returns the fd that keeps the session alive.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Rebuilds the wrapper around a session fd held elsewhere (e.g. received from a holder).
    pub fn from_fd(fd: OwnedFd, name: SessionName) -> OutgoingSession {
        OutgoingSession { fd, name }
    }
}

impl AsFd for OutgoingSession {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn retrieve_fd(fd: &OwnedFd, name: &SessionName, token: Token) -> Result<OwnedFd, LuoError> {
    let mut arg = FdArg::new(-1, token);
    luo_ioctl(fd, LIVEUPDATE_SESSION_RETRIEVE_FD(), &mut arg).map_err(|errno| match errno {
        libc::ENOENT => LuoError::TokenNotFound {
            session: name.to_string(),
            token,
        },
        libc::EINVAL => LuoError::Invalid {
            session: name.to_string(),
            op: "RETRIEVE_FD",
        },
        _ => ioctl_error(name, "RETRIEVE_FD", errno),
    })?;
    Ok(owned(arg.fd))
}

/// A session handed over by the previous kernel. Retrieve its files in any order, then
/// [`IncomingSession::finish`]. Closing it without finishing makes the kernel try FINISH
/// itself; if that fails the session's resources stay held until the next update.
pub struct IncomingSession {
    fd: OwnedFd,
    name: SessionName,
}

impl IncomingSession {
    /// Gets back the file preserved under `token`. A failed retrieve is permanent for that
    /// token, so check everything that can be checked before calling this.
    pub fn retrieve(&self, token: Token) -> Result<OwnedFd, LuoError> {
        retrieve_fd(&self.fd, &self.name, token)
    }

    /// Hands every file back to userspace; files never retrieved are discarded (memfds) or
    /// make FINISH fail (handlers that refuse).
    pub fn finish(&self) -> Result<(), LuoError> {
        let mut arg = FinishArg::sized();
        luo_ioctl(&self.fd, LIVEUPDATE_SESSION_FINISH(), &mut arg).map_err(|errno| match errno {
            libc::EBUSY => LuoError::FinishBusy {
                session: self.name.to_string(),
            },
            libc::EINVAL => LuoError::Invalid {
                session: self.name.to_string(),
                op: "FINISH",
            },
            _ => ioctl_error(&self.name, "FINISH", errno),
        })
    }

    /// The session's name as the kernel reports it.
    pub fn kernel_name(&self) -> Result<String, LuoError> {
        session_name(&self.fd, &self.name)
    }

    /// The name it was retrieved by.
    pub fn name(&self) -> &SessionName {
        &self.name
    }

    /// Gives up the wrapper and returns the session fd, to hand it to another process.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Rebuilds the wrapper around a session fd retrieved elsewhere (by the agent).
    pub fn from_fd(fd: OwnedFd, name: SessionName) -> IncomingSession {
        IncomingSession { fd, name }
    }
}

impl AsFd for IncomingSession {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_ioctl() {
        assert!(SessionName::new("vm-0").is_ok());
        assert!(SessionName::new(&"x".repeat(63)).is_ok());
        for (bad, reason) in [
            ("", "empty"),
            (&"x".repeat(64) as &str, "longer than 63 bytes"),
            ("a\0b", "contains a NUL byte"),
        ] {
            match SessionName::new(bad) {
                Err(LuoError::InvalidName { reason: r, .. }) => assert_eq!(r, reason),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_device_means_luo_is_not_enabled() {
        let err = LiveUpdate::open_at(Path::new("/nonexistent/liveupdate"))
            .err()
            .unwrap();
        assert!(matches!(err, LuoError::NotEnabled));
        assert!(err.to_string().contains("liveupdate=on kho=on"));
    }

    #[test]
    fn ioctls_on_a_file_that_is_not_a_session_fail_typed() {
        // /dev/null takes no LUO ioctl: the kernel answers ENOTTY, reported with its meaning.
        let null = File::open("/dev/null").unwrap();
        let session = OutgoingSession::from_fd(OwnedFd::from(null), SessionName::new("s").unwrap());
        let memfd = File::open("/dev/null").unwrap();
        match session.preserve(memfd.as_fd(), 1) {
            Err(LuoError::Ioctl { meaning, op, .. }) => {
                assert_eq!(op, "PRESERVE_FD");
                assert!(meaning.starts_with("ENOTTY"), "{meaning}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_documented_errno_has_a_meaning() {
        for errno in [
            libc::ENOTTY,
            libc::E2BIG,
            libc::EOPNOTSUPP,
            libc::EINVAL,
            libc::ENOENT,
            libc::ENOMEM,
            libc::EOVERFLOW,
        ] {
            assert!(errno_meaning(errno).contains(':'), "{errno}");
        }
    }
}
