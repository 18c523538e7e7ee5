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

/// Longest request line the agent reads: a request names a VM, a kernel or a VM's devices.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Longest reply line a client reads, and so the largest ledger the agent may keep: `status`
/// sends it whole, and it crosses the kexec in a memfd that the next agent reads under this
/// bound. A VM's record with 8 devices and its launch record takes about 400 bytes, so 32 MiB
/// holds some 80 000 VMs.
pub const MAX_REPLY: usize = 32 * 1024 * 1024;

/// What a client asks of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A new VM: create its session; the reply carries the session fd. `launch` is what the
    /// VM's restore after the kexec needs again (its VMM's outputs), kept in the ledger for
    /// it; the agent does not look inside.
    Subscribe {
        vm: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        launch: Option<serde_json::Value>,
    },
    /// The VM has preserved everything and is paused; after the kexec it needs `devices`.
    Ready {
        vm: String,
        #[serde(default)]
        devices: Vec<String>,
    },
    /// The VM calls its update off: the agent closes its copy of the session.
    Release { vm: String },
    /// The ledger; with `vm`, only that VM's record (what a VMM following its own update
    /// needs, whatever the number of VMs on the host).
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
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
    /// Tell this connection of each change of VM `vm`'s record: the reply is its record now
    /// (a ledger with that VM only), then one such reply line per change of its phase, an
    /// empty one once it left the ledger. The agent closes the connection once the VM's
    /// update is over (cancelled, finished or gone) and at the kexec. A VMM following its
    /// update is told of a call-off this way instead of asking every second.
    Watch { vm: String },
    /// After the kexec: hand the VM's incoming session over (a copy: the agent keeps its own
    /// until the VM is finished); the reply carries it.
    Claim { vm: String },
    /// The VM is restored and its session finished.
    Finished { vm: String },
    /// The restore holding the VM's claim failed (only the claimant may say so): the session
    /// goes to the next claim.
    Failed { vm: String, reason: String },
    /// Which of the attached fds (and a memfd of the agent's) this kernel can preserve; each
    /// is tried in a scratch session that is closed at once.
    Probe {},
    /// The restore holding the VM's claim leaves the attached fds and `note` for the next
    /// restore, should this one fail: files it made that the session's files now depend on
    /// (a retrieved device stays bound to the iommufd that restore created). They replace
    /// what was kept before, and go when the VM is finished or released.
    Keep { vm: String, note: String },
    /// What the VM's earlier restores kept (only the claimant may ask): the reply's `kept`
    /// note, with the kept fds attached; no note when nothing was kept.
    Kept { vm: String },
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
    /// For `kept`: the note an earlier restore left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
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

/// Files kept for a VM with a note on them: what a restore leaves with the agent for the
/// next one, and what the agent leaves with its holder.
#[derive(Debug)]
pub struct KeptFiles {
    pub note: String,
    pub fds: Vec<OwnedFd>,
}

impl KeptFiles {
    /// A copy, every fd duplicated.
    pub fn try_clone(&self) -> std::io::Result<KeptFiles> {
        Ok(KeptFiles {
            note: self.note.clone(),
            fds: self
                .fds
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<Result<_, _>>()?,
        })
    }

    /// The reply that hands this out: the note in `kept`, the fds to attach.
    pub fn into_reply(self) -> (Reply, Vec<OwnedFd>) {
        let reply = Reply {
            kept: Some(self.note),
            ..Reply::ok()
        };
        (reply, self.fds)
    }
}

/// Most fds one line carries: a session, or the fds a probe asks about, one per passthrough
/// device of a VM. A VM's devices sit on its one PCI bus, which has 32 slots.
pub(crate) const MAX_FDS: usize = 32;

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

/// Receives one line of at most `max_bytes` and the fds that came with it.
pub fn recv_line(
    stream: &UnixStream,
    max_bytes: usize,
) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut reader = FdReader::<MAX_FDS>::new(stream);
    let mut line = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // One request or reply per connection turn: everything up to the newline. Only the new
        // bytes are searched, so a long line costs its length once.
        let searched = line.len();
        line.extend_from_slice(&chunk[..n]);
        let end = line[searched..].iter().position(|&b| b == b'\n');
        if let Some(end) = end {
            line.truncate(searched + end);
        }
        if line.len() > max_bytes {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {max_bytes} bytes"),
            ));
        }
        if end.is_some() {
            return Ok((line, reader.into_fds()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_cross_a_socket_with_their_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let request = Request::Subscribe {
            vm: "vm1".into(),
            launch: None,
        };
        send_line(&a, &request, &[]).unwrap();
        let (line, fds) = recv_line(&b, MAX_REQUEST).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&line).unwrap(), request);
        assert!(fds.is_empty());
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let reply = Reply {
            session: Some("luvmm-vm1".into()),
            ..Reply::ok()
        };
        send_line(&b, &reply, &[&file]).unwrap();
        let (line, fds) = recv_line(&a, MAX_REPLY).unwrap();
        assert_eq!(serde_json::from_slice::<Reply>(&line).unwrap(), reply);
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn a_line_cut_short_or_with_too_many_fds_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        unix::send_with_fds(&a, br#"{"op":"status"}"#, &[&file]).unwrap();
        drop(a);
        let err = recv_line(&b, MAX_REQUEST).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);

        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<&OwnedFd> = std::iter::repeat_n(&file, MAX_FDS + 1).collect();
        send_line(&a, &Request::Probe {}, &fds).unwrap();
        let err = recv_line(&b, MAX_REQUEST).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn nothing_lost_a_probe_of_eight_devices_crosses_one_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let devices: Vec<OwnedFd> = (0..8)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        let fds: Vec<&OwnedFd> = devices.iter().collect();
        send_line(&a, &Request::Probe {}, &fds).unwrap();
        let (line, received) = recv_line(&b, MAX_REQUEST).unwrap();
        assert_eq!(
            serde_json::from_slice::<Request>(&line).unwrap(),
            Request::Probe {}
        );
        assert_eq!(received.len(), 8);
    }

    #[test]
    fn nothing_lost_a_status_of_1000_vms_crosses_the_socket() {
        let mut ledger = Ledger::default();
        let devices: Vec<String> = (0..8).map(|d| format!("0000:00:{:02x}.0", d + 3)).collect();
        for i in 0..1000 {
            let vm = format!("vm-{i:04}");
            ledger.subscribe(&vm, 1_700_000_000_000).unwrap();
            let launch = serde_json::json!({
                "serial": {"file": format!("/var/log/luvmm/{vm}.log")},
                "api_socket": format!("/run/luvmm/{vm}.sock"),
            });
            ledger.record_launch(&vm, launch).unwrap();
            ledger.ready(&vm, 1_700_000_000_001, &devices).unwrap();
        }
        let reply = Reply {
            ledger: Some(ledger),
            ..Reply::ok()
        };
        let (a, b) = UnixStream::pair().unwrap();
        // The reply is larger than the socket's buffer: it is sent while it is read.
        let sent = reply.clone();
        let sender = std::thread::spawn(move || send_line(&a, &sent, &[]));
        let (line, fds) = recv_line(&b, MAX_REPLY).unwrap();
        sender.join().unwrap().unwrap();
        assert!(fds.is_empty());
        assert_eq!(serde_json::from_slice::<Reply>(&line).unwrap(), reply);
        // The bound `MAX_REPLY` states: 80 000 such VMs fit.
        assert!(line.len() * 80 < MAX_REPLY, "{} bytes", line.len());
    }

    #[test]
    fn a_line_longer_than_its_bound_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        send_line(&a, &"x".repeat(100), &[]).unwrap();
        let err = recv_line(&b, 50).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_subscribe_carries_its_launch_record_or_none() {
        let with: Request = serde_json::from_str(
            r#"{"op":"subscribe","vm":"vm1","launch":{"api_socket":"/run/vm1.sock"}}"#,
        )
        .unwrap();
        assert_eq!(
            with,
            Request::Subscribe {
                vm: "vm1".into(),
                launch: Some(serde_json::json!({"api_socket": "/run/vm1.sock"})),
            }
        );
        // An older VMM sends none.
        let without: Request = serde_json::from_str(r#"{"op":"subscribe","vm":"vm1"}"#).unwrap();
        assert_eq!(
            without,
            Request::Subscribe {
                vm: "vm1".into(),
                launch: None,
            }
        );
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

    /// A host of 1000 VMs, each with 8 devices and a launch record: the whole ledger crosses
    /// the socket within `MAX_REPLY`, and the record one VMM asks for stays small.
    #[test]
    fn a_ledger_of_1000_vms_crosses_the_socket_and_one_vms_record_stays_small() {
        let mut ledger = Ledger::default();
        let devices: Vec<String> = (0..8).map(|i| format!("0000:00:{:02x}.0", i + 3)).collect();
        for i in 0..1000 {
            let vm = format!("vm-{i:04}");
            ledger.subscribe(&vm, 1_000 + i).unwrap();
            let launch = serde_json::json!({
                "serial": {"file": format!("/var/log/luvmm/{vm}.log")},
                "api_socket": format!("/run/luvmm/{vm}.sock"),
                "vcpus": 4,
            });
            ledger.record_launch(&vm, launch).unwrap();
            ledger.ready(&vm, 5_000 + i, &devices).unwrap();
        }
        ledger.check_update().expect("every VM ready");
        let ledger = ledger.after_kexec(9_000);
        let (a, b) = UnixStream::pair().unwrap();
        let whole = Reply {
            ledger: Some(ledger.clone()),
            ..Reply::ok()
        };
        let sender = std::thread::spawn(move || send_line(&a, &whole, &[]).map(|()| a));
        let (line, _) = recv_line(&b, MAX_REPLY).expect("the whole ledger");
        let _a = sender.join().unwrap().expect("sent");
        assert!(line.len() < MAX_REPLY / 16, "{} bytes", line.len());
        let back: Reply = serde_json::from_slice(&line).unwrap();
        assert_eq!(back.ledger.as_ref().map(|l| l.vms.len()), Some(1000));
        assert_eq!(back.ledger.unwrap(), ledger);
        let one = serde_json::to_vec(&Reply {
            ledger: Some(ledger.of(Some("vm-0500"))),
            ..Reply::ok()
        })
        .unwrap();
        assert!(one.len() < 1024, "{} bytes for one VM", one.len());
    }
}
