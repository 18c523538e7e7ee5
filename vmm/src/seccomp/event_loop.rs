//! The event loop's allow list: the main thread, which serves the control API and runs what
//! it asks (pause, save and export, handover, a live update's prepare and cancel), watches the
//! guest's exit and pause requests, feeds stdin to the serial port, and follows the agent.

use seccompiler::BackendError;

use super::allow::{every_thread, AllowList};
use super::ioctls;

/// `fcntl` commands of the event loop: duplicating fds (handover, the agent's session),
/// sealing the state memfd, and blocking or not a client's socket.
const FCNTL: [u64; 6] = [
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_ADD_SEALS as u64,
    libc::F_GET_SEALS as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_SETFD as u64,
];

/// `kick` is the signal that takes a vCPU out of `KVM_RUN`.
pub(super) fn allow_list(kick: i32) -> Result<AllowList, BackendError> {
    let mut list = every_thread()?;
    list
        // event-manager's loop.
        .any(libc::SYS_epoll_wait)
        .any(libc::SYS_epoll_pwait)
        .any(libc::SYS_epoll_ctl)
        // The API's clients (SCM_RIGHTS replies for a handover), its read deadline, and what
        // the agent tells of the update (or, where it cannot, the update's poll of it).
        .any(libc::SYS_accept4)
        .any(libc::SYS_recvfrom)
        .any(libc::SYS_recvmsg)
        .any(libc::SYS_sendto)
        .any(libc::SYS_sendmsg)
        .any(libc::SYS_timerfd_settime)
        .any(libc::SYS_timerfd_gettime)
        // The agent, reached over its Unix socket (prepare, release, finished), with a reply
        // timeout.
        .when_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?
        .any(libc::SYS_connect)
        .any(libc::SYS_setsockopt)
        .any(libc::SYS_getsockopt)
        .any(libc::SYS_poll)
        .any(libc::SYS_ppoll)
        .when_arg(libc::SYS_fcntl, 1, &FCNTL)?
        // A process handover's target, watched (a pidfd from its peer credentials) so that the
        // source resumes the VM if the target exits without confirming.
        .any(libc::SYS_pidfd_open)
        // Pausing a running vCPU: the kick signal, to that thread only.
        .when_arg(libc::SYS_tgkill, 2, &[u64::try_from(kick).unwrap_or(0)])?
        // Save: the state in a memfd and, with --export, a file written to a temporary name,
        // synced and renamed; the API socket removed at shutdown.
        .any(libc::SYS_memfd_create)
        .any(libc::SYS_ftruncate)
        .any(libc::SYS_openat)
        .any(libc::SYS_statx)
        .any(libc::SYS_newfstatat)
        .any(libc::SYS_fstat)
        .any(libc::SYS_lseek)
        .any(libc::SYS_fsync)
        .any(libc::SYS_rename)
        .any(libc::SYS_renameat)
        .any(libc::SYS_unlink)
        .any(libc::SYS_unlinkat)
        // The VM's clock and interrupt controllers, read for a save; FIONBIO for sockets.
        .ioctls(&ioctls::vm_save())?
        .ioctls(&[libc::FIONBIO])?
        // Passthrough devices: their interrupts held, quiesced and re-armed; re-opened after a
        // cancelled update, from sysfs and /dev/vfio or /dev/iommu; config space read through
        // the VFIO fd.
        .ioctls(&ioctls::device_emulation())?
        .ioctls(&ioctls::vfio_devices())?
        .any(libc::SYS_eventfd2)
        .any(libc::SYS_pread64)
        .any(libc::SYS_pwrite64)
        .any(libc::SYS_getdents64)
        // vfio-ioctls duplicates the KVM VFIO device fd (`VfioDeviceFd::try_clone`, with dup)
        // when a device is opened again into the VM's IOMMU context.
        .any(libc::SYS_dup)
        .any(libc::SYS_readlink)
        .any(libc::SYS_readlinkat)
        // A live update's prepare: RAM, devices and state preserved into the VM's session.
        .ioctls(&ioctls::luo_session())?
        // Where systemd holds the session (fdstore): the session created on /dev/liveupdate
        // (opened with openat, then closed), the fd store told with datagrams (socket and
        // sendmsg, above) and a barrier (a pipe whose end systemd closes, polled); the device
        // is waited for, a few ms at a time, while another VMM creates its session.
        .ioctls(&ioctls::luo_device())?
        .any(libc::SYS_pipe2)
        .any(libc::SYS_clock_nanosleep);
    Ok(list)
}
