//! LUO from userspace, for any VMM: this layer knows nothing of VMs, only files and tokens.
//!
//! - [`uapi`]: the ioctl numbers and argument structs of `include/uapi/linux/liveupdate.h`.
//! - [`LiveUpdate`]: the exclusive `/dev/liveupdate` handle that creates and retrieves sessions.
//! - [`OutgoingSession`] / [`IncomingSession`]: a session before the kexec (preserve files into
//!   it; dropping it unpreserves them) and after it (retrieve files, then finish).
//! - [`kexec`]: loading the next kernel with `kexec_file_load` and jumping into it.
//! - [`probe`]: what this kernel can preserve, found by trying, never leaving anything behind.

pub mod kexec;
pub mod probe;
mod session;
pub mod uapi;

pub use session::{
    IncomingSession, LiveUpdate, LuoError, OutgoingSession, SessionName, Token, DEVICE_PATH,
};
