//! What happens when a thread makes a system call its filter forbids: the filter traps
//! (`SIGSYS`), and the handler here writes one line naming the thread and the call, then ends
//! the whole process with [`VIOLATION_EXIT_STATUS`]. A forbidden call means the thread does
//! something luvmm never does; the process stops rather than go on in an unknown state.
//!
//! The handler runs inside the trapped thread, under that thread's filter, so it makes only
//! two system calls, which every filter allows: `write` (to stderr) and `exit_group`. It does
//! not allocate or take locks: the thread's name and the pid are recorded beforehand.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::signal::register_signal_handler;

use super::names::syscall_name;

/// The exit status of a process ended by a forbidden system call: 128 + `SIGSYS`, what a
/// shell shows for a process the kernel killed with `SIGSYS`, so it reads the same either way.
pub const VIOLATION_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// `si_code` of a `SIGSYS` raised by a seccomp filter (`SYS_SECCOMP`).
const SYS_SECCOMP: libc::c_int = 1;

/// The longest thread name Linux keeps (`TASK_COMM_LEN` less the NUL).
const NAME_LEN: usize = 15;

/// The process id, for the log line: `getpid` is not in every filter.
static PID: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// This thread's name as its filter was installed, and its length.
    static THREAD_NAME: Cell<([u8; NAME_LEN], usize)> = const { Cell::new(([0; NAME_LEN], 0)) };
}

/// `siginfo_t` as the kernel fills it for `SIGSYS` on 64-bit Linux (`_sigsys` in
/// `include/uapi/asm-generic/siginfo.h`): three ints, padding to 16 bytes, then the union.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

const _: () = assert!(std::mem::size_of::<SigsysInfo>() <= std::mem::size_of::<libc::siginfo_t>());

/// Installs the `SIGSYS` handler for the whole process.
pub(super) fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    PID.store(std::process::id(), Ordering::Relaxed);
    register_signal_handler(libc::SIGSYS, on_sigsys)
}

/// Records this thread's name for the handler's line; longer names are cut as Linux cuts them.
pub(super) fn set_thread_name(name: &str) {
    let mut buf = [0u8; NAME_LEN];
    let len = name.len().min(NAME_LEN);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|cell| cell.set((buf, len)));
}

extern "C" fn on_sigsys(
    _signum: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO), and `SigsysInfo`
    // restates its layout for this signal; it is only read.
    let (code, syscall) = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        (info.code, info.syscall)
    };
    let (name, len) = THREAD_NAME.with(Cell::get);
    let mut line = Line::new();
    line.push(b"luvmm[");
    line.push_number(u64::from(PID.load(Ordering::Relaxed)));
    line.push(b"] ERROR seccomp: thread ");
    line.push(if len == 0 { b"?" } else { &name[..len] });
    if code == SYS_SECCOMP {
        line.push(b" made system call ");
        line.push_number(u64::try_from(syscall).unwrap_or(u64::MAX));
        if let Some(name) = syscall_name(i64::from(syscall)) {
            line.push(b" (");
            line.push(name.as_bytes());
            line.push(b")");
        }
        line.push(b", which its seccomp filter forbids");
    } else {
        line.push(b" got a SIGSYS that no filter raised");
    }
    line.push(b": exiting with status ");
    line.push_number(VIOLATION_EXIT_STATUS.unsigned_abs().into());
    line.push(b"\n");
    // SAFETY: `write` and `_exit` are async-signal-safe, and every filter allows both; the
    // buffer is a live local.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(VIOLATION_EXIT_STATUS);
    }
}

/// A fixed buffer the handler writes its line into: no allocation in a signal handler.
struct Line {
    buf: [u8; 200],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 200],
            len: 0,
        }
    }

    /// Appends what fits; a longer line is cut, never overflows.
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            // A digit: `value % 10` is below 10.
            digits[start] = b'0' + u8::try_from(value % 10).unwrap_or(0);
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_holds_numbers_and_is_cut_rather_than_overflowed() {
        let mut line = Line::new();
        line.push(b"pid ");
        line.push_number(0);
        line.push(b" ");
        line.push_number(4_294_967_295);
        assert_eq!(&line.buf[..line.len], b"pid 0 4294967295");
        line.push(&[b'x'; 300]);
        assert_eq!(line.len, line.buf.len());
    }
}
