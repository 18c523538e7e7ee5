//! Who opened VFIO and IOMMU nodes during an update: the evidence that a preserved device
//! was reached only through its LUO session, from the prepare to the kexec and from the next
//! kernel's agent to the last resume.
//!
//! Two kernel sources, neither of which opens what it watches (a watcher that opened a
//! preserved device to look at it would disturb what it watches):
//! - kprobes on the open handlers of the VFIO cdevs, groups, the container and `/dev/iommu`,
//!   through tracefs: every open by any process, whatever path it took, with its pid and comm;
//! - inotify `IN_OPEN` on each watched device's own cdev and group node, which says *which*
//!   device was opened. inotify merges an event into an identical one not yet read, so a
//!   thread reads them as they come; the kprobes' total is the cross-check.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use luvmm_resources::sync::lock;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use serde::{Deserialize, Serialize};

/// Probe group in tracefs.
const GROUP: &str = "luvmm_watch";

/// Each watched node class: its name in the output and the kernel function that opens it.
const PROBES: &[(&str, &str)] = &[
    ("vfio_cdev", "vfio_device_fops_cdev_open"),
    ("vfio_group", "vfio_group_fops_open"),
    ("vfio_container", "vfio_fops_open"),
    ("iommufd", "iommufd_fops_open"),
];

/// Watching could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("no tracefs with kprobe events at /sys/kernel/tracing (CONFIG_KPROBE_EVENTS)")]
    NoTracefs,
    #[error("cannot run mount for tracefs")]
    Mount(#[source] std::io::Error),
    #[error("tracefs {path}: {what}")]
    Tracefs {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("inotify on {path}")]
    Inotify {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{bdf}: {what}")]
    Device {
        bdf: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One open seen by the kprobes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// `vfio_cdev`, `vfio_group`, `vfio_container` or `iommufd`.
    pub node: String,
    pub pid: u32,
    pub comm: String,
}

/// What the watch saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opens {
    /// Every open of a watched node class, by any process.
    pub opens: Vec<Open>,
    /// Opens of each watched device's cdev or group node, by BDF.
    pub per_device: BTreeMap<String, u32>,
}

impl Opens {
    /// Opens of VFIO cdevs and groups (not the iommufd, which is never preserved).
    pub fn device_opens(&self) -> usize {
        self.opens
            .iter()
            .filter(|o| o.node == "vfio_cdev" || o.node == "vfio_group")
            .count()
    }
}

/// A watch while it is armed: [`OpenWatch::seen`] says what it saw so far, and
/// [`OpenWatch::finish`] disarms it and says what it saw in all.
pub struct OpenWatch {
    tracing: PathBuf,
    stop: Arc<AtomicBool>,
    /// Opens per watched BDF, counted by the reader thread as they come.
    per_device: Arc<Mutex<BTreeMap<String, u32>>>,
    reader: Option<JoinHandle<()>>,
}

impl OpenWatch {
    /// Arms the kprobes and an inotify watch on the cdev and group node of each of `bdfs`.
    pub fn start(bdfs: &[String]) -> Result<OpenWatch, WatchError> {
        let tracing = tracefs()?;
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(|source| {
                WatchError::Inotify {
                    path: PathBuf::from("(init)"),
                    source,
                }
            })?;
        let mut nodes = Vec::new();
        for bdf in bdfs {
            for node in device_nodes(bdf)? {
                let wd = inotify
                    .add_watch(&node, AddWatchFlags::IN_OPEN)
                    .map_err(|source| WatchError::Inotify {
                        path: node.clone(),
                        source,
                    })?;
                nodes.push((wd, bdf.clone()));
            }
        }
        let per_device = Arc::new(Mutex::new(
            bdfs.iter()
                .map(|b| (b.clone(), 0))
                .collect::<BTreeMap<_, _>>(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            let per_device = per_device.clone();
            std::thread::spawn(move || count_opens(&inotify, &nodes, &per_device, &stop))
        };
        let watch = OpenWatch {
            tracing,
            stop,
            per_device,
            reader: Some(reader),
        };
        watch.arm_probes()?;
        Ok(watch)
    }

    fn arm_probes(&self) -> Result<(), WatchError> {
        let events = self.tracing.join("kprobe_events");
        for (node, function) in PROBES {
            append(&events, &format!("p:{GROUP}/{node} {function}"))?;
        }
        // An empty write clears the ring buffer, so only opens from now on are in it.
        write(&self.tracing.join("trace"), "", "clear the trace")?;
        write(
            &self.tracing.join(format!("events/{GROUP}/enable")),
            "1",
            "enable the probes",
        )
    }

    /// What was opened since [`OpenWatch::start`], the watch still armed: a stage that ends in
    /// a kexec reports this as it goes, since it never gets to finish.
    pub fn seen(&self) -> Result<Opens, WatchError> {
        let path = self.tracing.join("trace");
        let trace = std::fs::read_to_string(&path).map_err(|source| WatchError::Tracefs {
            path,
            what: "read".into(),
            source,
        })?;
        Ok(Opens {
            opens: parse_trace(&trace),
            per_device: lock(&self.per_device).clone(),
        })
    }

    /// Disarms everything and returns what was opened since [`OpenWatch::start`].
    pub fn finish(mut self) -> Result<Opens, WatchError> {
        self.stop.store(true, Ordering::Relaxed);
        // The reader drains what inotify still holds before it returns.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.seen()
    }
}

/// Counts `IN_OPEN` events per device until `stop`, then drains what is left.
fn count_opens(
    inotify: &Inotify,
    nodes: &[(WatchDescriptor, String)],
    per_device: &Mutex<BTreeMap<String, u32>>,
    stop: &AtomicBool,
) {
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(20u8)).unwrap_or(0);
        if ready > 0 {
            for event in inotify.read_events().unwrap_or_default() {
                if let Some((_, bdf)) = nodes.iter().find(|(wd, _)| *wd == event.wd) {
                    *lock(per_device).entry(bdf.clone()).or_default() += 1;
                }
            }
        } else if stopping {
            return;
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::write(self.tracing.join(format!("events/{GROUP}/enable")), "0");
        for (node, _) in PROBES {
            let _ = append(
                &self.tracing.join("kprobe_events"),
                &format!("-:{GROUP}/{node}"),
            );
        }
    }
}

/// The PCI functions bound to vfio-pci, in BDF order: what can be watched.
pub fn vfio_pci_devices() -> std::io::Result<Vec<String>> {
    let mut bdfs: Vec<String> = std::fs::read_dir(VFIO_PCI)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("0000:"))
        .collect();
    bdfs.sort();
    Ok(bdfs)
}

/// vfio-pci's sysfs directory, which lists the functions bound to it.
pub const VFIO_PCI: &str = "/sys/bus/pci/drivers/vfio-pci";

/// The device's cdev (`/dev/vfio/devices/vfioN`) and group node (`/dev/vfio/G`), where they
/// exist: a device bound to vfio-pci has both.
fn device_nodes(bdf: &str) -> Result<Vec<PathBuf>, WatchError> {
    let sysfs = Path::new("/sys/bus/pci/devices").join(bdf);
    let err = |what| {
        move |source| WatchError::Device {
            bdf: bdf.to_string(),
            what,
            source,
        }
    };
    let mut nodes = Vec::new();
    let vfio_dev = sysfs.join("vfio-dev");
    if vfio_dev.exists() {
        for entry in std::fs::read_dir(&vfio_dev).map_err(err("read vfio-dev"))? {
            let entry = entry.map_err(err("read vfio-dev"))?;
            nodes.push(Path::new("/dev/vfio/devices").join(entry.file_name()));
        }
    }
    let group = std::fs::read_link(sysfs.join("iommu_group")).map_err(err("no IOMMU group"))?;
    if let Some(number) = group.file_name() {
        let node = Path::new("/dev/vfio").join(number);
        if node.exists() {
            nodes.push(node);
        }
    }
    Ok(nodes)
}

/// The tracefs mount, mounted at `/sys/kernel/tracing` if it is not there yet.
fn tracefs() -> Result<PathBuf, WatchError> {
    let dir = PathBuf::from("/sys/kernel/tracing");
    if !dir.join("kprobe_events").exists() {
        let status = Command::new("mount")
            .args(["-t", "tracefs", "tracefs"])
            .arg(&dir)
            .status()
            .map_err(WatchError::Mount)?;
        if !status.success() || !dir.join("kprobe_events").exists() {
            return Err(WatchError::NoTracefs);
        }
    }
    Ok(dir)
}

fn write(path: &Path, text: &str, what: &str) -> Result<(), WatchError> {
    std::fs::write(path, text).map_err(|source| WatchError::Tracefs {
        path: path.to_path_buf(),
        what: what.to_string(),
        source,
    })
}

fn append(path: &Path, line: &str) -> Result<(), WatchError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
        .map_err(|source| WatchError::Tracefs {
            path: path.to_path_buf(),
            what: format!("write {line:?}"),
            source,
        })
}

/// Reads tracefs lines like
/// `           luvmm-412     [000] d..1.  12.345678: vfio_cdev: (vfio_device_fops_cdev_open+0x0/0x90)`.
fn parse_trace(trace: &str) -> Vec<Open> {
    trace
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (task, rest) = line.trim_start().split_once(' ')?;
            let node = PROBES
                .iter()
                .map(|(node, _)| *node)
                .find(|node| rest.contains(&format!(" {node}: (")))?;
            // The task is COMM-PID, and a command name may itself hold dashes.
            let (comm, pid) = task.rsplit_once('-')?;
            Some(Open {
                node: node.to_string(),
                pid: pid.parse().ok()?,
                comm: comm.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_become_opens() {
        let trace = "# tracer: nop\n\
            #           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION\n\
            \x20          luvmm-412     [000] d..1.  12.345678: vfio_cdev: (vfio_device_fops_cdev_open+0x0/0x90)\n\
            \x20   kworker/u2:1-33      [000] d..1.  12.345700: iommufd: (iommufd_fops_open+0x0/0x1a0)\n\
            \x20          my-vmm-7      [000] d..1.  12.4: vfio_group: (vfio_group_fops_open+0x0/0x120)\n";
        let opens = parse_trace(trace);
        assert_eq!(
            opens,
            [
                Open {
                    node: "vfio_cdev".into(),
                    pid: 412,
                    comm: "luvmm".into()
                },
                Open {
                    node: "iommufd".into(),
                    pid: 33,
                    comm: "kworker/u2:1".into()
                },
                Open {
                    node: "vfio_group".into(),
                    pid: 7,
                    comm: "my-vmm".into()
                },
            ]
        );
        let seen = Opens {
            opens,
            per_device: BTreeMap::new(),
        };
        assert_eq!(seen.device_opens(), 2, "the iommufd open is not a device's");
    }
}
