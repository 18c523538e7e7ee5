//! systemd's service notification protocol, as far as the fd store needs it: a datagram of
//! `KEY=VALUE` lines to `$NOTIFY_SOCKET`, fds attached with `SCM_RIGHTS`; a barrier (the write
//! end of a pipe sent with `BARRIER=1`, which the service manager closes once it handled every
//! earlier message); and the fds it hands a service at start (`LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`, from fd 3 on). See systemd's `sd_notify(3)` and `sd_listen_fds(3)`.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The first fd a service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Where the service manager listens, from `$NOTIFY_SOCKET`: a path, or an abstract name
/// written with a leading `@`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifySocket(UnixAddr);

impl NotifySocket {
    /// The socket `$NOTIFY_SOCKET` names, if set and usable.
    pub fn from_env() -> Option<NotifySocket> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        NotifySocket::parse(value.as_bytes())
    }

    /// The socket `value` names: `@name` abstract, `/path` a path.
    pub fn parse(value: &[u8]) -> Option<NotifySocket> {
        match value.split_first()? {
            (b'@', name) => UnixAddr::new_abstract(name).ok().map(NotifySocket),
            (b'/', _) => UnixAddr::new(value).ok().map(NotifySocket),
            _ => None,
        }
    }

    /// Sends `state` (newline-separated assignments) with `fds` attached.
    pub fn send(&self, state: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(state.as_bytes())];
        let sent = sendmsg(
            sock.as_raw_fd(),
            &iov,
            control,
            MsgFlags::MSG_NOSIGNAL,
            Some(&self.0),
        )?;
        if sent == state.len() {
            Ok(())
        } else {
            Err(std::io::Error::other("the notification was cut short"))
        }
    }

    /// Waits until the service manager handled every message sent before this one, up to
    /// `timeout`: it closes the pipe end sent with `BARRIER=1` once it has.
    pub fn barrier(&self, timeout: Duration) -> std::io::Result<()> {
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        self.send("BARRIER=1", &[write_end.as_fd()])?;
        drop(write_end);
        let mut fds = [PollFd::new(read_end.as_fd(), PollFlags::POLLHUP)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms))? {
            0 => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the service manager did not confirm the barrier",
            )),
            _ => Ok(()),
        }
    }
}

/// The fds the service manager passed this process at start, each with its name, in order.
/// Taken once: a second call (or a process the variables were not meant for) gets none. The
/// variables are left as they are (changing the environment of a threaded process is unsound);
/// `LISTEN_PID` keeps a child from taking them.
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Vec::new();
    }
    let var = |name| std::env::var(name).ok();
    let for_us = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = var("LISTEN_FDS").and_then(|n| n.parse::<RawFd>().ok());
    let (true, Some(count)) = (for_us, count) else {
        return Vec::new();
    };
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    (LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count))
        .filter_map(|raw| {
            let name = names.next().unwrap_or("unknown").to_string();
            // The fd must be open: a variable that lies names nothing this process may own.
            let flags = fcntl(raw_fd(raw)?, FcntlArg::F_GETFD).ok()?;
            // SAFETY: `raw` is an open fd (F_GETFD succeeded) that the service manager passed to
            // this process, named by LISTEN_FDS; nothing else in the process owns it, as this
            // runs once (`TAKEN`).
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let cloexec = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(fd.as_fd(), FcntlArg::F_SETFD(cloexec));
            Some((name, fd))
        })
        .collect()
}

/// `raw` borrowed for a flags query, if it is a plausible fd number.
fn raw_fd(raw: RawFd) -> Option<BorrowedFd<'static>> {
    // SAFETY: the borrow is used only for F_GETFD, which fails harmlessly (EBADF) on a closed
    // fd; nothing is read or written through it.
    (raw >= 0).then(|| unsafe { BorrowedFd::borrow_raw(raw) })
}

/// One datagram a service manager received, and the fds it carried (tests stand in for the
/// service manager).
#[cfg(test)]
pub(crate) fn receive(manager: &std::os::unix::net::UnixDatagram) -> (String, Vec<OwnedFd>) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    let mut buf = [0u8; 512];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let msg = recvmsg::<()>(
        manager.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these fds in this process for this message.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let n = msg.bytes;
    (String::from_utf8_lossy(&buf[..n]).into_owned(), fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_notify_socket_is_a_path_or_an_abstract_name() {
        assert!(NotifySocket::parse(b"/run/systemd/notify").is_some());
        assert!(NotifySocket::parse(b"@/org/freedesktop/systemd1/notify/1").is_some());
        assert_eq!(NotifySocket::parse(b"relative"), None);
        assert_eq!(NotifySocket::parse(b""), None);
    }

    #[test]
    fn a_notification_carries_its_text_and_fds_and_a_barrier_waits_for_the_close() {
        let dir = std::env::temp_dir().join(format!("luvmm-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        let socket = NotifySocket::parse(path.as_os_str().as_bytes()).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        socket.send("FDSTORE=1\nFDNAME=x", &[file.as_fd()]).unwrap();
        let (text, fds) = receive(&manager);
        assert_eq!(text, "FDSTORE=1\nFDNAME=x");
        assert_eq!(fds.len(), 1);
        // A manager that handles the barrier closes the pipe end it was sent.
        let waiter = std::thread::spawn(move || socket.barrier(Duration::from_secs(5)));
        let (text, fds) = receive(&manager);
        assert_eq!(text, "BARRIER=1");
        drop(fds);
        waiter.join().unwrap().unwrap();
        // One that never does leaves the barrier to time out.
        let socket = NotifySocket::parse(path.as_os_str().as_bytes()).unwrap();
        let waiter = std::thread::spawn(move || socket.barrier(Duration::from_millis(200)));
        let (_, held) = receive(&manager);
        let err = waiter.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(held);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
