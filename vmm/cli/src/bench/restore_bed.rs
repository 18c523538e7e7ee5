//! `bench restore --kernel K --initrd I`: the same benchmark inside the nested bed's L1, on
//! nested KVM, with `edu` devices to pass through, which this machine's own KVM cannot give.
//! L1 boots the bed's base image with this luvmm and the payload added, its init binds the
//! devices to vfio-pci, and a scenario hook runs `luvmm bench restore --json` there; the
//! report comes back as one marked console line.

use std::path::Path;
use std::time::Duration;

use super::restore::{print_table, RestoreReport};
use super::{io, BenchError};
use crate::drill::bed::{self, InitrdFile, L1Spec};
use crate::drill::L1_PAYLOAD;

/// What `bench restore` runs in the bed with.
pub struct InBed<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub payload: &'a Path,
    pub sizes: &'a [u64],
    pub devices: &'a [u32],
    pub rounds: u32,
    pub json: bool,
}

/// The start of the console line that carries L1's report.
const REPORT_MARK: &str = "LUVMM-BENCH ";

/// How long L1 may take for the whole benchmark.
const L1_TIMEOUT: Duration = Duration::from_secs(3600);

/// Runs `bench restore` in L1 and prints its report here.
pub fn run_in_bed(args: &InBed<'_>) -> Result<(), BenchError> {
    let work = std::env::temp_dir().join(format!("luvmm-bench-bed-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(format!("create {}", work.display())))?;
    let initrd = work.join("initrd");
    let exe = std::env::current_exe().map_err(io("find this executable".into()))?;
    let list = |items: Vec<String>| items.join(",");
    let hook = format!(
        "#!/bin/sh\n/luvmm/bin/luvmm bench restore --payload {L1_PAYLOAD} --sizes {} \
         --devices {} --rounds {} --json | sed 's/^/{REPORT_MARK}/'\n",
        list(args.sizes.iter().map(u64::to_string).collect()),
        list(args.devices.iter().map(u32::to_string).collect()),
        args.rounds,
    );
    let (luvmm, payload) = (bed::read(&exe)?, bed::read(args.payload)?);
    let image = bed::extend_initrd(
        &bed::read(args.initrd)?,
        &[
            InitrdFile {
                path: "/luvmm/bin/luvmm",
                mode: 0o755,
                data: &luvmm,
            },
            InitrdFile {
                path: L1_PAYLOAD,
                mode: 0o644,
                data: &payload,
            },
            // The bed's /init runs /luvmm/scenarios/<luvmm.scenario>.sh.
            InitrdFile {
                path: "/luvmm/scenarios/bench-restore.sh",
                mode: 0o755,
                data: hook.as_bytes(),
            },
        ],
    )?;
    bed::write(&initrd, &image)?;
    let most = args.devices.iter().copied().max().unwrap_or(0);
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    let spec = L1Spec {
        kernel: args.kernel,
        initrd: &initrd,
        append: "luvmm.scenario=bench-restore",
        devices: &vec!["edu".to_string(); most as usize],
        drives: &[],
        // The guest's RAM once (source and target share its memfds), and room for L1.
        memory_mib: 2048 + largest,
    };
    let run = bed::run_l1(&spec, L1_TIMEOUT, |line| {
        if line.text.starts_with("LUVMM-L1") {
            eprintln!("bench [{:7.1} s] {}", line.at, line.text);
        }
    })?;
    let _ = std::fs::remove_dir_all(&work);
    let text = run
        .lines
        .iter()
        .find_map(|line| {
            let at = line.text.find(REPORT_MARK)?;
            Some(&line.text[at + REPORT_MARK.len()..])
        })
        .ok_or_else(|| BenchError::NoReport { tail: run.tail(30) })?;
    let report: RestoreReport = serde_json::from_str(text).map_err(BenchError::Decode)?;
    if args.json {
        println!("{text}");
    } else {
        print_table(&report);
    }
    Ok(())
}
