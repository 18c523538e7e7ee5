//! Loading the next kernel and jumping into it.
//!
//! Only `kexec_file_load` works with KHO (the old userspace loader knows nothing of it), and the
//! next kernel needs `liveupdate=on` too, so the current command line is reused by default.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `KEXEC_FILE_NO_INITRAMFS`.
const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

/// Loading or starting the next kernel failed.
#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    /// The kernel (or initrd) image cannot be opened.
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The command line cannot be read or holds a NUL byte.
    #[error("bad command line: {0}")]
    Cmdline(String),
    /// Not root, or kexec is disabled (`kernel.kexec_load_disabled`), or lockdown refuses it.
    #[error("{op}: not permitted (needs CAP_SYS_BOOT; kexec may be disabled or locked down)")]
    NotPermitted { op: &'static str },
    /// The running kernel has no `kexec_file_load`.
    #[error("kexec_file_load is not available: the running kernel lacks CONFIG_KEXEC_FILE")]
    NoKexecFile,
    /// `reboot(LINUX_REBOOT_CMD_KEXEC)` returned: nothing was loaded, or a LUO freeze failed.
    #[error("{op} failed")]
    Failed {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The command line of the running kernel, for the next one.
pub fn current_cmdline() -> Result<String, KexecError> {
    std::fs::read_to_string("/proc/cmdline")
        .map(|s| s.trim_end().to_string())
        .map_err(|e| KexecError::Cmdline(format!("/proc/cmdline: {e}")))
}

/// The running kernel's command line with `words` appended: the next kernel's, for an
/// operator's `--append`.
pub fn current_cmdline_with(words: &str) -> Result<String, KexecError> {
    current_cmdline().map(|current| format!("{current} {words}"))
}

/// Loads `kernel` (and `initrd`) as the next kernel with `cmdline`, or the current command line
/// when `None`.
pub fn load(kernel: &Path, initrd: Option<&Path>, cmdline: Option<&str>) -> Result<(), KexecError> {
    let open = |what, path: &Path| {
        File::open(path).map_err(|source| KexecError::Open {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let kernel_file = open("kernel", kernel)?;
    let initrd_file = initrd.map(|p| open("initrd", p)).transpose()?;
    let line = match cmdline {
        Some(line) => line.to_string(),
        None => current_cmdline()?,
    };
    let line = CString::new(line).map_err(|e| KexecError::Cmdline(e.to_string()))?;
    let flags = if initrd_file.is_some() {
        0
    } else {
        KEXEC_FILE_NO_INITRAMFS
    };
    let initrd_fd = initrd_file.as_ref().map_or(-1, |f| f.as_raw_fd());
    // SAFETY: kexec_file_load reads two fds that stay open for the call and a NUL-terminated
    // command line of the given length (NUL included) that outlives it; it writes no memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel_file.as_raw_fd(),
            initrd_fd,
            line.as_bytes_with_nul().len(),
            line.as_ptr(),
            flags,
        )
    };
    file_load_result(ret, "kexec_file_load")
}

/// Whether a next kernel is loaded now (`/sys/kernel/kexec_loaded`); `None` if the kernel
/// does not say.
pub fn loaded() -> Option<bool> {
    let text = std::fs::read_to_string("/sys/kernel/kexec_loaded").ok()?;
    Some(text.trim() == "1")
}

/// `KEXEC_FILE_UNLOAD`.
const KEXEC_FILE_UNLOAD: libc::c_ulong = 0x1;

/// Unloads whatever kernel `load` loaded (a pre-flight loads the next kernel to prove it
/// loads, then takes it back out).
pub fn unload() -> Result<(), KexecError> {
    // SAFETY: with KEXEC_FILE_UNLOAD the kernel reads none of the other arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1,
            -1,
            0usize,
            std::ptr::null::<libc::c_char>(),
            KEXEC_FILE_UNLOAD,
        )
    };
    file_load_result(ret, "kexec_file_load (unload)")
}

/// `kexec_file_load`'s return value `ret` as a result, its errno typed.
fn file_load_result(ret: libc::c_long, op: &'static str) -> Result<(), KexecError> {
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::EPERM) => KexecError::NotPermitted { op },
        Some(libc::ENOSYS) => KexecError::NoKexecFile,
        _ => KexecError::Failed { op, source: err },
    })
}

/// Jumps into the loaded kernel. LUO serializes every outgoing session on the way; processes
/// are not killed, so whoever holds the session fds keeps them to the end. Returns only on
/// failure (nothing loaded, or a preserved file refused to freeze: sessions stay outgoing).
pub fn reboot_into_loaded() -> Result<Infallible, KexecError> {
    nix::unistd::sync();
    let err = match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC) {
        Ok(never) => match never {},
        Err(errno) => errno,
    };
    Err(match err {
        nix::errno::Errno::EPERM => KexecError::NotPermitted {
            op: "reboot(KEXEC)",
        },
        other => KexecError::Failed {
            op: "reboot(LINUX_REBOOT_CMD_KEXEC)",
            source: other.into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kernel_is_named() {
        let err = load(
            Path::new("/nonexistent/vmlinuz"),
            None,
            Some("console=ttyS0"),
        )
        .unwrap_err();
        match err {
            KexecError::Open { what, path, .. } => {
                assert_eq!(what, "kernel");
                assert_eq!(path, Path::new("/nonexistent/vmlinuz"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_nul_in_the_cmdline_is_refused() {
        let exe = std::env::current_exe().unwrap();
        assert!(matches!(
            load(&exe, None, Some("a\0b")),
            Err(KexecError::Cmdline(_))
        ));
    }

    #[test]
    fn the_current_cmdline_is_readable() {
        assert!(current_cmdline().is_ok());
    }
}
