//! The holder against a small service manager on a datagram socket that keeps an fd store as
//! systemd does (FDSTORE, FDSTOREREMOVE by name, BARRIER), and hands it to the "next start".

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::thread::JoinHandle;

use super::*;
use crate::agent::ledger::VmPhase;

/// This boot's id, and the one before the kexec.
const BOOT: &str = "0b5c2d1e-6f7a-4b8c-9d0e-1f2a3b4c5d6e";
const EARLIER_BOOT: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";

/// A service manager's fd store, served on its own thread until `stop`.
struct Manager {
    dir: PathBuf,
    socket: NotifySocket,
    thread: Option<JoinHandle<Served>>,
}

/// The store as the manager left it, and every name it was asked to drop.
struct Served {
    store: Vec<(String, OwnedFd)>,
    removed: Vec<String>,
}

impl Manager {
    fn start(name: &str) -> Manager {
        let dir = std::env::temp_dir().join(format!("luvmm-fdstore-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let socket = NotifySocket::parse(path.as_os_str().as_bytes()).unwrap();
        let thread = std::thread::spawn(move || serve(&server));
        Manager {
            dir,
            socket,
            thread: Some(thread),
        }
    }

    /// Stops serving; the store as the next start of the service gets it.
    fn stop(self) -> Vec<(String, OwnedFd)> {
        self.stop_served().store
    }

    fn stop_served(mut self) -> Served {
        self.socket.send("STOP=1", &[]).unwrap();
        let served = self.thread.take().unwrap().join().unwrap();
        std::fs::remove_dir_all(&self.dir).unwrap();
        served
    }
}

fn serve(server: &UnixDatagram) -> Served {
    let mut store: Vec<(String, OwnedFd)> = Vec::new();
    let mut removed = Vec::new();
    loop {
        let (text, fds) = super::notify::receive(server);
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::to_string)
        };
        if field("STOP=").is_some() {
            return Served { store, removed };
        }
        if field("BARRIER=").is_some() {
            drop(fds);
            continue;
        }
        let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
        if field("FDSTOREREMOVE=").is_some() {
            store.retain(|(n, _)| *n != name);
            removed.push(name);
        } else if field("FDSTORE=").is_some() {
            store.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
        }
    }
}

fn memfd_with(text: &str) -> OwnedFd {
    OwnedFd::from(text_memfd("test", text).unwrap())
}

#[test]
fn what_a_failed_restore_keeps_comes_back_at_the_next_start_and_goes_when_finished() {
    let manager = Manager::start("kept");
    let store = FdStore::new(manager.socket.clone(), Vec::new(), BOOT);
    let (a, b) = (memfd_with("iommufd"), memfd_with("other"));
    store.keep("vm1", "{\"bound\":[]}", &[&a, &b]).unwrap();
    // Kept again: the earlier set is replaced, not added to.
    store.keep("vm1", "{\"bound\":[1]}", &[&a]).unwrap();
    let passed = manager.stop();
    let names: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["luvmm-kept-note", "luvmm-kept-0"]);

    let manager = Manager::start("kept2");
    let next = FdStore::new(manager.socket.clone(), passed, BOOT);
    let kept = next.kept("vm1").unwrap().unwrap();
    assert_eq!(kept.note, "{\"bound\":[1]}");
    assert_eq!(kept.fds.len(), 1);
    assert_eq!(read_memfd(kept.fds[0].as_fd()).unwrap(), "iommufd");
    // Finished: every name of the update is dropped from the store.
    next.finished("vm1").unwrap();
    assert!(manager.stop().is_empty());
}

#[test]
fn the_record_written_at_ready_tells_the_claim_the_devices_and_a_claim_needs_a_session() {
    let manager = Manager::start("record");
    let store = FdStore::new(manager.socket.clone(), Vec::new(), BOOT);
    let devices = vec!["0000:00:03.0".to_string()];
    store.ready("vm1", &devices).unwrap();
    assert_eq!(store.status().unwrap().vms[0].phase, VmPhase::Ready);
    let mut passed = manager.stop();
    assert_eq!(passed.len(), 1);
    assert_eq!(passed[0].0, RECORD_FDNAME);

    // After the kexec, without the session: nothing to claim, and it says so.
    let manager = Manager::start("record2");
    let record = passed.remove(0);
    let next = FdStore::new(manager.socket.clone(), vec![record], BOOT);
    assert!(!next.session_waits());
    let err = next.claim("vm1").err().unwrap();
    assert!(err.to_string().contains("fd store"), "{err}");
    assert!(next.status().unwrap().vms.is_empty());
    drop(manager.stop());
}

#[test]
fn a_claim_hands_out_a_copy_of_the_session_systemd_passed() {
    let manager = Manager::start("claim");
    let session = memfd_with("a session stands in");
    let record =
        memfd_with("{\"vm\":\"vm1\",\"devices\":[\"0000:00:03.0\"],\"launch\":{\"vcpus\":2}}");
    let store = FdStore::new(
        manager.socket.clone(),
        vec![
            (session_fdname(EARLIER_BOOT), session),
            (RECORD_FDNAME.to_string(), record),
        ],
        BOOT,
    );
    assert!(store.session_waits());
    // Before the claim the ledger has the VM as the agent's would after the kexec: incoming,
    // with its devices and launch record.
    let before = store.status().unwrap().vms[0].clone();
    assert_eq!(before.phase, VmPhase::Incoming);
    assert_eq!(before.devices, ["0000:00:03.0"]);
    assert_eq!(before.launch.unwrap()["vcpus"], 2);
    let claimed = store.claim("vm1").unwrap();
    assert_eq!(claimed.name().as_str(), "luvmm-vm1");
    let ledger = store.status().unwrap();
    assert_eq!(ledger.vms[0].phase, VmPhase::Claimed);
    // The holder keeps its own copy: a second claim (a retried restore) gets one too.
    assert!(store.claim("vm1").is_ok());
    drop(manager.stop());
}

#[test]
fn only_a_service_with_a_notify_socket_and_a_store_has_one() {
    use std::ffi::OsStr;
    let socket = Some(OsStr::new("/run/systemd/notify"));
    assert!(store_socket(socket, Some("16")).is_ok());
    for (socket, store) in [(socket, Some("0")), (socket, None), (None, Some("16"))] {
        let err = store_socket(socket, store).err().unwrap();
        assert!(err.to_string().contains("FileDescriptorStoreMax"), "{err}");
    }
    let relative = Some(OsStr::new("notify"));
    assert!(store_socket(relative, Some("16")).is_err());
}

#[test]
fn the_host_systemd_version_is_read_from_systemctl() {
    assert_eq!(
        parse_systemd_version("systemd 262 (262.1-1)\n+PAM +AUDIT\n"),
        Some(262)
    );
    assert_eq!(
        parse_systemd_version("systemd 252 (252.39-1~deb12u1)"),
        Some(252)
    );
    assert_eq!(parse_systemd_version("something else"), None);
    assert!(preserves_fd_stores(Some(261)) && !preserves_fd_stores(Some(260)));
    assert!(!preserves_fd_stores(None));
}

#[test]
fn an_update_that_did_not_kexec_within_its_limit_is_told_off_once() {
    let manager = Manager::start("limit");
    let store = FdStore::new(manager.socket.clone(), Vec::new(), BOOT)
        .with_update_limit(Duration::from_millis(100));
    let mut watch = store.watch("vm1").unwrap();
    assert_eq!(watch.told().unwrap(), None);
    std::thread::sleep(Duration::from_millis(150));
    // A ledger without the VM: its update is off.
    assert_eq!(watch.told().unwrap(), Some(Ledger::default()));
    assert_eq!(watch.told().unwrap(), None);
    drop(manager.stop());
}

#[test]
fn a_session_this_boot_left_behind_is_dropped_and_the_vm_boots_afresh() {
    let manager = Manager::start("left");
    let passed = vec![
        (
            session_fdname(BOOT),
            memfd_with("an outgoing session stands in"),
        ),
        (
            RECORD_FDNAME.to_string(),
            memfd_with("{\"vm\":\"vm1\",\"devices\":[]}"),
        ),
    ];
    let store = FdStore::new(manager.socket.clone(), passed, BOOT);
    // Nothing to restore from: LUO retrieves nothing before a kexec.
    assert!(!store.session_waits());
    assert!(store.status().unwrap().vms.is_empty());
    store.drop_left_behind().unwrap();
    let removed = manager.stop_served().removed;
    assert!(removed.contains(&session_fdname(BOOT)), "{removed:?}");
    assert!(removed.contains(&RECORD_FDNAME.to_string()), "{removed:?}");
    // The name carries the boot id without its dashes.
    assert_eq!(
        session_fdname(BOOT),
        "luvmm-session-0b5c2d1e6f7a4b8c9d0e1f2a3b4c5d6e"
    );
}
