//! The LUO uAPI, restated from `include/uapi/linux/liveupdate.h` (Linux 7.2).
//!
//! Every ioctl is `_IO(0xBA, nr)`: no size or direction bits. Each argument struct instead
//! starts with its own `size`, which userspace sets to `size_of` the struct.

use vmm_sys_util::ioctl_io_nr;

/// `LIVEUPDATE_IOCTL_TYPE`.
pub const LIVEUPDATE_IOCTL_TYPE: u32 = 0xBA;
/// `LIVEUPDATE_SESSION_NAME_LENGTH`, NUL included: names have 1 to 63 bytes.
pub const LIVEUPDATE_SESSION_NAME_LENGTH: usize = 64;

ioctl_io_nr!(LIVEUPDATE_IOCTL_CREATE_SESSION, LIVEUPDATE_IOCTL_TYPE, 0x00);
ioctl_io_nr!(
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
    LIVEUPDATE_IOCTL_TYPE,
    0x01
);
ioctl_io_nr!(LIVEUPDATE_SESSION_PRESERVE_FD, LIVEUPDATE_IOCTL_TYPE, 0x40);
ioctl_io_nr!(LIVEUPDATE_SESSION_RETRIEVE_FD, LIVEUPDATE_IOCTL_TYPE, 0x41);
ioctl_io_nr!(LIVEUPDATE_SESSION_FINISH, LIVEUPDATE_IOCTL_TYPE, 0x42);
ioctl_io_nr!(LIVEUPDATE_SESSION_GET_NAME, LIVEUPDATE_IOCTL_TYPE, 0x43);

/// `struct liveupdate_ioctl_create_session` (also the layout of retrieve_session).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SessionArg {
    pub size: u32,
    /// Out: the new session fd (O_CLOEXEC).
    pub fd: i32,
    /// In: NUL-terminated name.
    pub name: [u8; LIVEUPDATE_SESSION_NAME_LENGTH],
}

/// `struct liveupdate_session_preserve_fd` (also the layout of retrieve_fd).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FdArg {
    pub size: u32,
    /// In for preserve, out for retrieve.
    pub fd: i32,
    /// Caller-chosen id, unique within the session.
    pub token: u64,
}

/// `struct liveupdate_session_finish`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FinishArg {
    pub size: u32,
    pub reserved: u32,
}

/// `struct liveupdate_session_get_name`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GetNameArg {
    pub size: u32,
    pub reserved: u32,
    /// Out: the full session name.
    pub name: [u8; LIVEUPDATE_SESSION_NAME_LENGTH],
}

// The kernel's sizes: create 72, retrieve 72, preserve 16, retrieve_fd 16, finish 8, name 72.
// Each argument's `size` field holds its constant, which the asserts tie to the struct.
const SESSION_ARG_SIZE: u32 = 72;
const FD_ARG_SIZE: u32 = 16;
const FINISH_ARG_SIZE: u32 = 8;
const GET_NAME_ARG_SIZE: u32 = 72;
const _: () = assert!(std::mem::size_of::<SessionArg>() == SESSION_ARG_SIZE as usize);
const _: () = assert!(std::mem::size_of::<FdArg>() == FD_ARG_SIZE as usize);
const _: () = assert!(std::mem::size_of::<FinishArg>() == FINISH_ARG_SIZE as usize);
const _: () = assert!(std::mem::size_of::<GetNameArg>() == GET_NAME_ARG_SIZE as usize);
const _: () = assert!(std::mem::offset_of!(FdArg, token) == 8);
const _: () = assert!(std::mem::offset_of!(SessionArg, name) == 8);

impl SessionArg {
    /// An argument with `size` set and `name` copied in; the caller has validated the name.
    pub fn new(name: &[u8]) -> SessionArg {
        let mut arg = SessionArg {
            size: SESSION_ARG_SIZE,
            fd: -1,
            name: [0; LIVEUPDATE_SESSION_NAME_LENGTH],
        };
        let n = name.len().min(LIVEUPDATE_SESSION_NAME_LENGTH - 1);
        arg.name[..n].copy_from_slice(&name[..n]);
        arg
    }
}

impl FdArg {
    /// An argument with `size` set.
    pub fn new(fd: i32, token: u64) -> FdArg {
        FdArg {
            size: FD_ARG_SIZE,
            fd,
            token,
        }
    }
}

impl FinishArg {
    /// An argument with `size` set and `reserved` zero.
    pub fn sized() -> FinishArg {
        FinishArg {
            size: FINISH_ARG_SIZE,
            reserved: 0,
        }
    }
}

impl GetNameArg {
    /// An argument with `size` set.
    pub fn sized() -> GetNameArg {
        GetNameArg {
            size: GET_NAME_ARG_SIZE,
            reserved: 0,
            name: [0; LIVEUPDATE_SESSION_NAME_LENGTH],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        assert_eq!(LIVEUPDATE_IOCTL_CREATE_SESSION(), 0xBA00);
        assert_eq!(LIVEUPDATE_IOCTL_RETRIEVE_SESSION(), 0xBA01);
        assert_eq!(LIVEUPDATE_SESSION_PRESERVE_FD(), 0xBA40);
        assert_eq!(LIVEUPDATE_SESSION_RETRIEVE_FD(), 0xBA41);
        assert_eq!(LIVEUPDATE_SESSION_FINISH(), 0xBA42);
        assert_eq!(LIVEUPDATE_SESSION_GET_NAME(), 0xBA43);
    }

    #[test]
    fn arguments_carry_their_own_size() {
        assert_eq!(SessionArg::new(b"vm-0").size, 72);
        assert_eq!(&SessionArg::new(b"vm-0").name[..5], b"vm-0\0");
        assert_eq!(FdArg::new(3, 7).size, 16);
        assert_eq!(FinishArg::sized().size, 8);
        assert_eq!(GetNameArg::sized().size, 72);
    }
}
