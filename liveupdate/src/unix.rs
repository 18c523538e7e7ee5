//! Unix-socket plumbing shared by the agent and the VMM's API: a listening socket only its
//! owner can reach, and bytes that carry fds (`SCM_RIGHTS`) both ways.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A socket could not be bound for its owner alone.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("cannot create the socket {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a listening socket at `path` with mode 0600. It is bound under a temporary name,
/// restricted, then renamed into place, so `path` never names a socket others may reach. An
/// existing `path` is refused rather than replaced: it may be another process's live socket.
pub fn bind_owner_only(path: &Path) -> Result<UnixListener, BindError> {
    if path.exists() {
        return Err(BindError::Exists {
            path: path.to_path_buf(),
        });
    }
    let create_err = |source| BindError::Create {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // A socket under this process's own temporary name can only be a leftover of a process
    // that had the same pid.
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(create_err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(create_err(e));
    }
    Ok(listener)
}

/// Writes all of `bytes` to `stream`, with `fds` attached to the first ones.
pub fn send_with_fds<F: AsFd>(stream: &UnixStream, bytes: &[u8], fds: &[F]) -> std::io::Result<()> {
    if fds.is_empty() {
        return (&*stream).write_all(bytes);
    }
    // A stream socket sends no message for zero bytes, so the fds would be dropped unsaid.
    if bytes.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "fds need at least one byte to travel with",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
    let sent = stream.send_with_fds(&[bytes], &raw)?;
    (&*stream).write_all(&bytes[sent..])
}

/// Most fds Linux passes with one message (`SCM_MAX_FD`). A reader's control buffer always has
/// room for this many, so the kernel never cuts it short: nix does not parse a cut buffer, and
/// the fds that did arrive in it could not be closed.
const SCM_MAX_FD: usize = 253;

/// The peer sent more fds than the reader takes; every one of them was closed.
#[derive(Debug, thiserror::Error)]
#[error("the peer sent more than {max} fds")]
pub struct TooManyFds {
    pub max: usize,
}

/// Reads a stream socket and keeps the fds that arrive with its bytes, at most `MAX_FDS` in
/// all. More is refused (`InvalidData` wrapping [`TooManyFds`]) rather than silently cut, and
/// the fds of a refused read are closed. Received fds are close-on-exec from the start.
///
/// `recvmsg` here is nix's, not `ScmSocket::recv_with_fds`: that one cannot ask for
/// `MSG_CMSG_CLOEXEC`, and an fd without it could leak into a child spawned meanwhile.
pub struct FdReader<'a, const MAX_FDS: usize> {
    stream: &'a UnixStream,
    fds: Vec<OwnedFd>,
}

impl<'a, const MAX_FDS: usize> FdReader<'a, MAX_FDS> {
    pub fn new(stream: &'a UnixStream) -> Self {
        FdReader {
            stream,
            fds: Vec::new(),
        }
    }

    /// The fds received so far, in the order they came.
    pub fn into_fds(self) -> Vec<OwnedFd> {
        self.fds
    }
}

impl<const MAX_FDS: usize> Read for FdReader<'_, MAX_FDS> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(
            self.stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            // Not with a buffer for SCM_MAX_FD fds and no other control messages asked for.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "control data cut short",
            ));
        }
        let mut arrived = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these fds in this process for us; nothing
                // else owns them.
                arrived.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if self.fds.len() + arrived.len() > MAX_FDS {
            // Dropping `arrived` closes what did come.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                TooManyFds { max: MAX_FDS },
            ));
        }
        self.fds.extend(arrived);
        Ok(msg.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_ends() -> (std::fs::File, std::fs::File) {
        let (read, write) = nix::unistd::pipe().unwrap();
        (read.into(), write.into())
    }

    fn read_all<const MAX_FDS: usize>(stream: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut reader = FdReader::<MAX_FDS>::new(stream);
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).unwrap();
        (bytes, reader.into_fds())
    }

    #[test]
    fn fds_arrive_with_their_bytes_and_work() {
        let (a, b) = UnixStream::pair().unwrap();
        let (pipe_read, pipe_write) = pipe_ends();
        let other = std::fs::File::open("/dev/null").unwrap();
        send_with_fds(&a, b"hello", &[pipe_write.as_fd(), other.as_fd()]).unwrap();
        drop(a);
        let (bytes, fds) = read_all::<4>(&b);
        assert_eq!(bytes, b"hello");
        assert_eq!(fds.len(), 2);
        // The first fd is the pipe's write end: what goes in comes out of our read end.
        let mut received = std::fs::File::from(fds.into_iter().next().unwrap());
        let flags = nix::fcntl::fcntl(&received, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received fd not close-on-exec");
        received.write_all(b"x").unwrap();
        drop((received, pipe_write));
        let mut out = String::new();
        (&pipe_read).read_to_string(&mut out).unwrap();
        assert_eq!(out, "x");
    }

    #[test]
    fn a_message_without_fds_reads_as_plain_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds::<OwnedFd>(&a, b"no fds", &[]).unwrap();
        drop(a);
        let (bytes, fds) = read_all::<4>(&b);
        assert_eq!(bytes, b"no fds");
        assert!(fds.is_empty());
    }

    #[test]
    fn more_fds_than_the_reader_takes_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let (pipe_read, pipe_write) = pipe_ends();
        send_with_fds(&a, b"x", &[&pipe_write, &pipe_write, &pipe_write]).unwrap();
        drop((a, pipe_write));
        let mut reader = FdReader::<1>::new(&b);
        let err = reader.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.get_ref().is_some_and(|e| e.is::<TooManyFds>()), "{err}");
        drop(reader);
        // Every copy of the write end is closed: the pipe reads end-of-file.
        let mut out = Vec::new();
        (&pipe_read).read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn fds_over_several_messages_count_against_one_limit() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_with_fds(&a, b"1", &[&file]).unwrap();
        send_with_fds(&a, b"2", &[&file]).unwrap();
        let mut reader = FdReader::<1>::new(&b);
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).unwrap(), 1);
        assert!(reader.read(&mut buf).is_err());
        assert_eq!(reader.into_fds().len(), 1);
    }

    #[test]
    fn fds_without_bytes_are_refused_at_the_sender() {
        let (a, _b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = send_with_fds(&a, b"", &[&file]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_bound_socket_is_owner_only_and_never_replaces_a_file() {
        let dir = std::env::temp_dir().join(format!("luvmm-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = bind_owner_only(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "a temporary name was left behind");
        UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        assert!(matches!(
            bind_owner_only(&path),
            Err(BindError::Exists { .. })
        ));
        let missing = dir.join("no-such-dir").join("s.sock");
        assert!(matches!(
            bind_owner_only(&missing),
            Err(BindError::Create { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
