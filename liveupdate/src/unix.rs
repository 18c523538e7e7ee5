//! Unix-socket plumbing shared by the agent and the VMM's API: a listening socket only its
//! owner can reach, bytes that carry fds (`SCM_RIGHTS`) both ways, and room for those fds.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

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
    let (listener, tmp) = bind_owner_only_aside(path)?;
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(BindError::Create {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(listener)
}

/// Binds a listening socket with mode 0600 under `PATH.<pid>.tmp`, beside `path`, and returns
/// it with that name, for the caller to rename into place once it is ready to be reached there
/// (the API socket of a VM taken over, which may replace its source's).
pub fn bind_owner_only_aside(path: &Path) -> Result<(UnixListener, PathBuf), BindError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let create_err = |source| BindError::Create {
        path: tmp.clone(),
        source,
    };
    // A socket under this process's own temporary name can only be a leftover of a process
    // that had the same pid.
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(create_err)?;
    if let Err(e) = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(create_err(e));
    }
    Ok((listener, tmp))
}

/// Raises this process's soft limit on open fds to its hard limit, and returns the limit now in
/// force. The usual soft limit, 1024, is less than a real host needs: the agent keeps a session
/// fd per VM, and a VM's passthrough devices bring an eventfd per MSI-X vector, twice over
/// while it is handed over.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given, which lives through the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Linux refuses more than `fs.nr_open` fds whatever the hard limit says.
    let ceiling = if limit.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        limit.rlim_max
    };
    if limit.rlim_cur < ceiling {
        limit.rlim_cur = ceiling;
        // SAFETY: setrlimit only reads the struct it is given, which lives through the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Writes all of `bytes` to `stream`, with `fds` attached to the first ones. Linux passes at
/// most [`SCM_MAX_FD`] fds with one message, so more travel in several, each with one byte of
/// `bytes`; the reader gathers them in order.
pub fn send_with_fds<F: AsFd>(stream: &UnixStream, bytes: &[u8], fds: &[F]) -> std::io::Result<()> {
    if fds.is_empty() {
        return (&*stream).write_all(bytes);
    }
    let messages = fds.len().div_ceil(SCM_MAX_FD);
    // A stream socket sends no message for zero bytes, so the fds would be dropped unsaid.
    if bytes.len() < messages {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} fds need at least {messages} bytes to travel with",
                fds.len()
            ),
        ));
    }
    let mut sent = 0;
    for (i, group) in fds.chunks(SCM_MAX_FD).enumerate() {
        let raw: Vec<RawFd> = group.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        // Every message but the last carries exactly one byte, so each group has its own.
        let part = if i + 1 == messages {
            &bytes[sent..]
        } else {
            &bytes[sent..=sent]
        };
        sent += stream.send_with_fds(&[part], &raw)?;
    }
    (&*stream).write_all(&bytes[sent..])
}

/// Most fds Linux passes with one message (`SCM_MAX_FD` in the kernel): `sendmsg` refuses more.
pub const SCM_MAX_FD: usize = 253;

/// The reader refused what came: every fd of it was closed.
#[derive(Debug, thiserror::Error)]
pub enum FdsRefused {
    #[error("the peer sent more than {max} fds")]
    TooMany { max: usize },
    /// The kernel installed fewer fds than were sent (`MSG_CTRUNC`): more than the reader's
    /// control buffer holds, or this process is out of fds.
    #[error("the fds sent were cut short (more than {max}, or this process is out of fds)")]
    CutShort { max: usize },
}

/// Reads a stream socket and keeps the fds that arrive with its bytes, at most `MAX_FDS` in
/// all. Its control buffer holds `MAX_FDS` fds (at most [`SCM_MAX_FD`]) per message: more is
/// refused (`InvalidData` wrapping [`FdsRefused`]) rather than silently cut, and every fd of a
/// refused read, also of one the kernel cut short, is closed, so a long-lived reader leaks
/// none. Received fds are close-on-exec from the start.
///
/// `recvmsg` here is libc's: nix's gives no access to the fds of a cut message, and
/// `ScmSocket::recv_with_fds` cannot ask for `MSG_CMSG_CLOEXEC`, without which an fd could
/// leak into a child spawned meanwhile.
pub struct FdReader<'a, const MAX_FDS: usize> {
    stream: &'a UnixStream,
    fds: Vec<OwnedFd>,
    /// `u64` words, so that the `cmsghdr`s the kernel writes are aligned.
    control: Vec<u64>,
}

impl<'a, const MAX_FDS: usize> FdReader<'a, MAX_FDS> {
    pub fn new(stream: &'a UnixStream) -> Self {
        // CMSG_SPACE of the fds: a header (a whole number of words), then the fds padded to a
        // word.
        let bytes = std::mem::size_of::<libc::cmsghdr>()
            + MAX_FDS.min(SCM_MAX_FD) * std::mem::size_of::<RawFd>();
        FdReader {
            stream,
            fds: Vec::new(),
            control: vec![0; bytes.div_ceil(std::mem::size_of::<u64>())],
        }
    }

    /// The fds received so far, in the order they came.
    pub fn into_fds(self) -> Vec<OwnedFd> {
        self.fds
    }
}

impl<const MAX_FDS: usize> Read for FdReader<'_, MAX_FDS> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid (no name, no buffers); the fields that matter are
        // set next.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self.control.as_mut_ptr().cast();
        msg.msg_controllen = self.control.len() * std::mem::size_of::<u64>();
        // SAFETY: `msg` points at `buf` and at the control buffer with their true lengths, both
        // live and not otherwise borrowed during the call.
        let received =
            unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        let bytes = usize::try_from(received).map_err(|_| std::io::Error::last_os_error())?;
        // SAFETY: `msg` is what recvmsg just filled in: its control part holds the headers the
        // kernel wrote, within `msg_controllen`, also when it cut the data short.
        let arrived = unsafe { take_fds(&msg) };
        let refused = if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            Some(FdsRefused::CutShort { max: MAX_FDS })
        } else if self.fds.len() + arrived.len() > MAX_FDS {
            Some(FdsRefused::TooMany { max: MAX_FDS })
        } else {
            None
        };
        if let Some(refused) = refused {
            // Dropping `arrived` closes every fd that did come.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                refused,
            ));
        }
        self.fds.extend(arrived);
        Ok(bytes)
    }
}

/// Takes ownership of every fd in the `SCM_RIGHTS` messages of `msg`'s control data.
///
/// # Safety
///
/// `msg` must be as `recvmsg` returned it: `msg_control` points at `msg_controllen` bytes of
/// control messages the kernel wrote, and the fds in them were installed for this call only.
unsafe fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: per this function's contract; CMSG_FIRSTHDR and CMSG_NXTHDR return only headers
    // that lie within `msg_controllen`, or null.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and within the control data, and aligned: the buffer is
        // made of `u64`s and the kernel aligns each header.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            let data_len = header.cmsg_len.saturating_sub(libc::CMSG_LEN(0) as usize);
            // SAFETY: the header's data starts right after it.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..data_len / std::mem::size_of::<RawFd>() {
                // SAFETY: `cmsg_len` counts only fds the kernel wrote, inside the control data
                // (it shortens the header when it cuts the data); they may be unaligned.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed this fd for this call; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: per this function's contract, `cmsg` being one of `msg`'s headers.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    fds
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
        assert!(err.get_ref().is_some_and(|e| e.is::<FdsRefused>()), "{err}");
        drop(reader);
        // Every copy of the write end is closed: the pipe reads end-of-file.
        let mut out = Vec::new();
        (&pipe_read).read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
    }

    /// Whether every copy of `pipe_read`'s write end is closed: it reads end-of-file rather
    /// than "would block".
    fn writers_all_closed(pipe_read: &std::fs::File) -> bool {
        let flags = nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(pipe_read, nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
        match (&*pipe_read).read(&mut [0u8; 1]) {
            Ok(0) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            other => panic!("unexpected read: {other:?}"),
        }
    }

    #[test]
    fn nothing_lost_a_message_cut_short_closes_every_fd_that_arrived() {
        let (a, b) = UnixStream::pair().unwrap();
        let (pipe_read, pipe_write) = pipe_ends();
        let copies: Vec<&std::fs::File> = std::iter::repeat_n(&pipe_write, 5).collect();
        send_with_fds(&a, b"x", &copies).unwrap();
        drop((a, copies));
        drop(pipe_write);
        // The control buffer holds 2 fds: the kernel installs those and cuts the rest.
        let mut reader = FdReader::<2>::new(&b);
        let err = reader.read(&mut [0u8; 16]).unwrap_err();
        assert!(
            matches!(
                err.get_ref().and_then(|e| e.downcast_ref::<FdsRefused>()),
                Some(FdsRefused::CutShort { max: 2 })
            ),
            "{err}"
        );
        assert!(reader.into_fds().is_empty());
        assert!(writers_all_closed(&pipe_read), "a received fd leaked");
    }

    #[test]
    fn nothing_lost_more_fds_than_one_message_carries_arrive_in_order() {
        const COUNT: usize = SCM_MAX_FD + 47;
        let (a, b) = UnixStream::pair().unwrap();
        let (pipe_read, pipe_write) = pipe_ends();
        let null = std::fs::File::open("/dev/null").unwrap();
        // The pipe's write end last, to see that the order held across messages.
        let mut fds: Vec<&std::fs::File> = std::iter::repeat_n(&null, COUNT - 1).collect();
        fds.push(&pipe_write);
        send_with_fds(&a, b"hello", &fds).unwrap();
        drop((a, fds));
        let (bytes, received) = read_all::<COUNT>(&b);
        assert_eq!(bytes, b"hello");
        assert_eq!(received.len(), COUNT);
        let mut last = std::fs::File::from(received.into_iter().next_back().unwrap());
        last.write_all(b"y").unwrap();
        drop((last, pipe_write));
        let mut out = String::new();
        (&pipe_read).read_to_string(&mut out).unwrap();
        assert_eq!(out, "y");
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
        // Two messages' worth of fds need two bytes.
        let many: Vec<&std::fs::File> = std::iter::repeat_n(&file, SCM_MAX_FD + 1).collect();
        let err = send_with_fds(&a, b"x", &many).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn nothing_lost_the_soft_fd_limit_is_raised_to_the_hard_one() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit touch only the struct given, alive through each call.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            // Lowering the soft limit needs no privilege; other tests stay far below 512 fds.
            limit.rlim_cur = limit.rlim_cur.min(512);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        let raised = raise_fd_limit().unwrap();
        assert!(raised > 512, "{raised}");
        // SAFETY: as above.
        unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0) };
        assert_eq!(limit.rlim_cur, raised);
        if limit.rlim_max != libc::RLIM_INFINITY {
            assert_eq!(raised, limit.rlim_max);
        }
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
