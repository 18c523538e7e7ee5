//! The agent's allow list: its one thread serves VMMs on its socket, creates and hands out LUO
//! sessions, keeps its ledger in a memfd, loads the next kernel and kexecs.

use seccompiler::BackendError;

use super::allow::{every_thread, AllowList};
use super::ioctls;

/// `fcntl` commands of the agent: its copy of a session fd, the ledger memfd's seals, and its
/// socket's blocking mode.
const FCNTL: [u64; 6] = [
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_ADD_SEALS as u64,
    libc::F_GET_SEALS as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_SETFD as u64,
];

/// `LINUX_REBOOT_CMD_KEXEC`: the only reboot the agent makes.
const REBOOT_CMD_KEXEC: u64 = 0x4558_4543;

pub(super) fn allow_list() -> Result<AllowList, BackendError> {
    let mut list = every_thread()?;
    list
        // Its socket, created once the filter is in place: the directory, a temporary name
        // made owner-only, then renamed.
        .any(libc::SYS_mkdir)
        .when_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?
        .any(libc::SYS_bind)
        .any(libc::SYS_listen)
        .any(libc::SYS_chmod)
        .any(libc::SYS_rename)
        .any(libc::SYS_unlink)
        // A socket left by an agent that was killed: tried, then replaced.
        .any(libc::SYS_connect)
        // Clients, read side by side on one thread (non-blocking, polled together), with fds
        // both ways and a write timeout; the deadline of a pending update.
        .any(libc::SYS_poll)
        .any(libc::SYS_ppoll)
        .any(libc::SYS_accept4)
        .any(libc::SYS_recvfrom)
        .any(libc::SYS_recvmsg)
        .any(libc::SYS_sendto)
        .any(libc::SYS_sendmsg)
        .any(libc::SYS_setsockopt)
        // Who claims a session (SO_PEERCRED), and whether that process still runs
        // (`/proc/PID/stat`, read with openat and read).
        .any(libc::SYS_getsockopt)
        // The ledger file beside the socket, for an agent started again in this boot: written
        // to a temporary name, synced, renamed (above).
        .any(libc::SYS_fsync)
        .when_arg(libc::SYS_fcntl, 1, &FCNTL)?
        .ioctls(&[libc::FIONBIO])?
        // Sessions: created, preserved into, retrieved, finished; and the probe's scratch
        // session and memfd.
        .ioctls(&ioctls::luo_device())?
        .ioctls(&ioctls::luo_session())?
        // The ledger, in a memfd of the agent's own session; the probe's sized scratch memfd.
        .any(libc::SYS_memfd_create)
        .any(libc::SYS_ftruncate)
        .any(libc::SYS_lseek)
        .any(libc::SYS_statx)
        .any(libc::SYS_newfstatat)
        .any(libc::SYS_fstat)
        // The next kernel: its files and this kernel's command line read, loaded (or unloaded
        // when the update is off), then the jump.
        .any(libc::SYS_openat)
        .any(libc::SYS_kexec_file_load)
        .any(libc::SYS_sync)
        .when_arg(libc::SYS_reboot, 2, &[REBOOT_CMD_KEXEC])?;
    Ok(list)
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::path::Path;

    use luvmm_liveupdate::agent::keep::{self, Kept};
    use luvmm_liveupdate::agent::wire::{recv_line, send_line, Reply, Request, MAX_REQUEST};
    use luvmm_liveupdate::agent::{AgentClient, Ledger};
    use luvmm_liveupdate::luo::{kexec, probe};
    use luvmm_liveupdate::unix::bind_owner_only;
    use nix::sys::socket::sockopt::PeerCredentials;

    use super::super::{Filters, ThreadKind};

    /// What the agent does besides LUO, which this host lacks: its socket made, a client
    /// served with a read timeout and fds in the reply, a sized memfd, this kernel's command
    /// line. Under the agent's filter, in a thread of its own; a forbidden call kills the test
    /// binary with SIGSYS (no handler is installed here).
    fn serve_one_status(socket: &Path) {
        let filters = Filters::build().expect("the filters build");
        seccompiler::apply_filter(filters.of(ThreadKind::Agent)).expect("the agent's filter");
        std::fs::create_dir_all(socket.parent().expect("a directory")).expect("mkdir");
        // The stale-socket probe: nobody there yet.
        assert!(std::os::unix::net::UnixStream::connect(socket).is_err());
        let listener = bind_owner_only(socket).expect("the agent's socket");
        let (stream, _) = listener.accept().expect("a client");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("a read timeout");
        let peer = nix::sys::socket::getsockopt(&stream, PeerCredentials).expect("SO_PEERCRED");
        let pid = u32::try_from(peer.pid()).expect("a pid");
        keep::process_start(pid).expect("the client's start time");
        keep::save(&keep::ledger_file(socket), &Kept::Ledger(Ledger::default()))
            .expect("the ledger file");
        let (line, _) = recv_line(&stream, MAX_REQUEST).expect("a request");
        let request: Request = serde_json::from_slice(&line).expect("a JSON request");
        assert_eq!(request, Request::Status { vm: None });
        kexec::current_cmdline().expect("/proc/cmdline");
        let memfd = OwnedFd::from(probe::scratch_memfd().expect("a scratch memfd"));
        let reply = Reply {
            ledger: Some(Ledger::default()),
            ..Reply::ok()
        };
        send_line(&stream, &reply, &[&memfd]).expect("the reply");
    }

    #[test]
    fn the_agent_serves_a_client_under_its_filter() {
        let dir = std::env::temp_dir().join(format!("luvmm-seccomp-agent-{}", std::process::id()));
        let socket = dir.join("run").join("agent.sock");
        let server = {
            let socket = socket.clone();
            std::thread::spawn(move || serve_one_status(&socket))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let ledger = loop {
            match AgentClient::new(&socket).status() {
                Ok(ledger) => break ledger,
                // Until the thread has made its socket.
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("the filtered agent thread never answered: {e}"),
            }
        };
        assert_eq!(ledger, Ledger::default());
        server.join().expect("the filtered agent thread");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
