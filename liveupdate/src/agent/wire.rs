//! The agent's wire format: one JSON request per line from the client, one JSON reply line
//! back, with the fds a reply carries (a session) attached by `SCM_RIGHTS` to its bytes.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::agent::ledger::Ledger;
use crate::luo::probe::HandlerStatus;
use crate::unix::{self, FdReader};

/// Longest line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// What a client asks of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A new VM: create its session; the reply carries the session fd.
    Subscribe { vm: String },
    /// The VM has preserved everything and is paused; after the kexec it needs `devices`.
    Ready {
        vm: String,
        #[serde(default)]
        devices: Vec<String>,
    },
    /// The VM calls its update off: the agent closes its copy of the session.
    Release { vm: String },
    /// The ledger.
    Status {},
    /// Load the next kernel and kexec into it once every VM is ready: at once (refused if one
    /// is not), or within `deadline_s` seconds, after which everyone's update is called off.
    Update {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        /// The next kernel's command line; the current one if absent.
        cmdline: Option<String>,
        #[serde(default)]
        deadline_s: Option<u64>,
    },
    /// After the kexec: hand the VM's incoming session over (once); the reply carries it.
    Claim { vm: String },
    /// The VM is restored and its session finished.
    Finished { vm: String },
    /// Which of the attached fds (and a memfd of the agent's) this kernel can preserve; each
    /// is tried in a scratch session that is closed at once.
    Probe {},
}

/// The agent's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The session an attached fd is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<Ledger>,
    /// For `probe`: the memfd handler, then one entry per attached fd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handlers: Option<Vec<HandlerStatus>>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    pub fn error(message: String) -> Reply {
        Reply {
            ok: false,
            error: Some(message),
            ..Reply::default()
        }
    }
}

/// Most fds one line carries: a session, or the fds a probe asks about.
const MAX_FDS: usize = 4;

/// Sends `value` as one line, with `fds` attached.
pub fn send_line<T: Serialize>(
    stream: &UnixStream,
    value: &T,
    fds: &[&OwnedFd],
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    unix::send_with_fds(stream, &bytes, fds)
}

/// Receives one line and the fds that came with it.
pub fn recv_line(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut reader = FdReader::<MAX_FDS>::new(stream);
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // One request or reply per connection turn: everything up to the newline.
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            return Ok((line, reader.into_fds()));
        }
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line longer than 64 KiB",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_cross_a_socket_with_their_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let request = Request::Subscribe { vm: "vm1".into() };
        send_line(&a, &request, &[]).unwrap();
        let (line, fds) = recv_line(&b).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&line).unwrap(), request);
        assert!(fds.is_empty());
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let reply = Reply {
            session: Some("luvmm-vm1".into()),
            ..Reply::ok()
        };
        send_line(&b, &reply, &[&file]).unwrap();
        let (line, fds) = recv_line(&a).unwrap();
        assert_eq!(serde_json::from_slice::<Reply>(&line).unwrap(), reply);
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn a_line_cut_short_or_with_too_many_fds_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        unix::send_with_fds(&a, br#"{"op":"status"}"#, &[&file]).unwrap();
        drop(a);
        let err = recv_line(&b).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);

        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<&OwnedFd> = std::iter::repeat_n(&file, MAX_FDS + 1).collect();
        send_line(&a, &Request::Probe {}, &fds).unwrap();
        let err = recv_line(&b).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn unknown_operations_and_fields_are_refused() {
        for bad in [
            r#"{"op":"reboot"}"#,
            r#"{"op":"subscribe"}"#,
            r#"{"op":"status","force":true}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
