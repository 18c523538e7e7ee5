//! Everything luvmm decides before it touches KVM, and everything that must cross an update.
//!
//! - [`config`]: the typed VM configuration and its validation, run before anything is created.
//! - [`layout`]: the guest physical layout (memory regions, boot structures, ports) as values
//!   that can be serialized and compared, so a restore can prove it rebuilds the same machine.
//! - [`state`]: the versioned, checksummed container for a paused VM's state and its typed root.
//! - [`files`]: opening only regular files on a user's word, so a FIFO cannot hang the VMM.
//! - [`json`]: JSON objects decoded with errors that name the wrong field in JSON's words.
//! - [`errors`]: an error and its causes on one line, for every crate's logs.
//! - [`sync`]: the poison-tolerant lock, here because every other crate that locks depends on
//!   this one.

pub mod allocator;
pub mod config;
pub mod errors;
pub mod files;
pub mod json;
pub mod layout;
pub mod state;
pub mod sync;
