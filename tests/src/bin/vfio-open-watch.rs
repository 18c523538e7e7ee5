//! Records every open of a VFIO device cdev (`/dev/vfio/devices/*`), a VFIO group
//! (`/dev/vfio/<group>`), the VFIO container (`/dev/vfio/vfio`) and `/dev/iommu`, by any
//! process, while a command runs. It puts kprobes on the kernel's open handlers of those nodes
//! through tracefs, so it sees opens by every process and opens nothing itself (a watcher that
//! opened a preserved device to look at it would disturb what it watches).
//!
//!     vfio-open-watch -- CMD [ARGS...]
//!
//! After CMD exits it prints one line per open, then a summary, and exits with CMD's status:
//!
//!     LUVMM-OPEN node=vfio_cdev pid=412 comm=luvmm
//!     LUVMM-OPEN done opens=3 status=0

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Probe group in tracefs.
const GROUP: &str = "luvmm_watch";

/// Each watched node: its name in the output and the kernel function that opens it.
const PROBES: &[(&str, &str)] = &[
    ("vfio_cdev", "vfio_device_fops_cdev_open"),
    ("vfio_group", "vfio_group_fops_open"),
    ("vfio_container", "vfio_fops_open"),
    ("iommufd", "iommufd_fops_open"),
];

/// One recorded open.
#[derive(Debug, PartialEq, Eq)]
struct Open {
    node: String,
    pid: u32,
    comm: String,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match args.split_first() {
        Some((dashes, rest)) if dashes == "--" && !rest.is_empty() => rest,
        _ => {
            eprintln!("usage: vfio-open-watch -- CMD [ARGS...]");
            return ExitCode::from(2);
        }
    };
    match watch(command) {
        Ok((opens, status)) => {
            for open in &opens {
                println!(
                    "LUVMM-OPEN node={} pid={} comm={}",
                    open.node, open.pid, open.comm
                );
            }
            println!("LUVMM-OPEN done opens={} status={status}", opens.len());
            ExitCode::from(u8::try_from(status).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("vfio-open-watch: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Arms the probes, runs `command`, and returns what opened the watched nodes meanwhile.
fn watch(command: &[String]) -> Result<(Vec<Open>, i32), String> {
    let tracing = tracefs()?;
    let probes = Probes::arm(&tracing)?;
    let status = Command::new(&command[0])
        .args(&command[1..])
        .status()
        .map_err(|e| format!("cannot run {}: {e}", command[0]))?;
    let trace = std::fs::read_to_string(tracing.join("trace"))
        .map_err(|e| format!("cannot read the trace: {e}"))?;
    drop(probes);
    Ok((parse_trace(&trace), status.code().unwrap_or(128)))
}

/// The tracefs mount, mounted at `/sys/kernel/tracing` if it is not there yet.
fn tracefs() -> Result<PathBuf, String> {
    let dir = PathBuf::from("/sys/kernel/tracing");
    if !dir.join("kprobe_events").exists() {
        let status = Command::new("mount")
            .args(["-t", "tracefs", "tracefs"])
            .arg(&dir)
            .status()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !status.success() || !dir.join("kprobe_events").exists() {
            return Err("no tracefs with kprobe events (CONFIG_KPROBE_EVENTS)".into());
        }
    }
    Ok(dir)
}

/// The kprobes while they are armed; dropping them disarms and removes them.
struct Probes {
    tracing: PathBuf,
}

impl Probes {
    fn arm(tracing: &Path) -> Result<Probes, String> {
        let probes = Probes {
            tracing: tracing.to_path_buf(),
        };
        for (node, function) in PROBES {
            append(
                &tracing.join("kprobe_events"),
                &format!("p:{GROUP}/{node} {function}"),
            )?;
        }
        // An empty write clears the ring buffer, so only this command's opens are in it.
        std::fs::write(tracing.join("trace"), "").map_err(|e| format!("clear trace: {e}"))?;
        std::fs::write(tracing.join(format!("events/{GROUP}/enable")), "1")
            .map_err(|e| format!("enable probes: {e}"))?;
        Ok(probes)
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        let _ = std::fs::write(self.tracing.join(format!("events/{GROUP}/enable")), "0");
        for (node, _) in PROBES {
            let _ = append(
                &self.tracing.join("kprobe_events"),
                &format!("-:{GROUP}/{node}"),
            );
        }
    }
}

fn append(path: &Path, line: &str) -> Result<(), String> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
        .map_err(|e| format!("{}: {line:?}: {e}", path.display()))
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
        assert_eq!(
            parse_trace(trace),
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
    }
}
