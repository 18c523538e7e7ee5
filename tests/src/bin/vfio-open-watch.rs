//! Records every open of a VFIO device cdev, a VFIO group, the VFIO container and `/dev/iommu`,
//! by any process, while a command runs (luvmm's own watcher, `luvmm::drill::watch`, which
//! opens nothing it watches). It also counts, per device bound to vfio-pci, the opens of that
//! device's own cdev and group node.
//!
//!     vfio-open-watch -- CMD [ARGS...]
//!
//! After CMD exits it prints one line per open, one per device, then a summary, and exits with
//! CMD's status:
//!
//!     LUVMM-OPEN node=vfio_cdev pid=412 comm=luvmm
//!     LUVMM-OPEN device=0000:00:03.0 opens=1
//!     LUVMM-OPEN done opens=3 status=0

use std::process::{Command, ExitCode};

use luvmm::drill::watch::{vfio_pci_devices, OpenWatch, Opens};

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
        Ok((seen, status)) => {
            for open in &seen.opens {
                println!(
                    "LUVMM-OPEN node={} pid={} comm={}",
                    open.node, open.pid, open.comm
                );
            }
            for (bdf, opens) in &seen.per_device {
                println!("LUVMM-OPEN device={bdf} opens={opens}");
            }
            println!("LUVMM-OPEN done opens={} status={status}", seen.opens.len());
            ExitCode::from(u8::try_from(status).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("vfio-open-watch: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Arms the watch on every vfio-pci device, runs `command`, and returns what it saw.
fn watch(command: &[String]) -> Result<(Opens, i32), String> {
    let bdfs = vfio_pci_devices().map_err(|e| format!("cannot list vfio-pci's devices: {e}"))?;
    let watch = OpenWatch::start(&bdfs).map_err(|e| e.to_string())?;
    let status = Command::new(&command[0])
        .args(&command[1..])
        .status()
        .map_err(|e| format!("cannot run {}: {e}", command[0]))?;
    let seen = watch.finish().map_err(|e| e.to_string())?;
    Ok((seen, status.code().unwrap_or(128)))
}
