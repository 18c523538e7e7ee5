//! `luvmm bench`: figures, never assertions.
//!
//! `restore.rs`: the blackout of a VMM process switch per guest size and device count, and
//! `restore_bed.rs` the same inside the nested bed. `update.rs`: the phases
//! of a host live update per guest size and device count, by drills in the nested bed.

pub mod restore;
pub mod restore_bed;
pub mod update;
pub mod update_scale;

use std::time::Duration;

use luvmm_vmm::api::client::ClientError;

use crate::cli::{BenchArgs, BenchKind};

/// How long one step of `bench restore` may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A benchmark could not produce its figures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("timed out after {STEP_TIMEOUT:?} waiting for {what}")]
    Timeout { what: &'static str },
    #[error("luvmm run exited ({status}) before its guest booted; its error is above")]
    Exited { status: std::process::ExitStatus },
    #[error("the restored VMM reports no restore timings")]
    NoTimings,
    #[error("the restored guest did not check ok:\n{log}")]
    NotOk { log: String },
    #[error("cannot encode the report")]
    Encode(#[source] serde_json::Error),
    #[error("the drill could not run")]
    Drill(#[from] crate::drill::DrillError),
    #[error("{needed} passthrough device(s) asked for, {found} bound to vfio-pci")]
    Devices { needed: usize, found: usize },
    #[error("the bed: {0}")]
    Bed(#[from] crate::drill::bed::BedError),
    #[error("L1 printed no benchmark report; its console ends:\n{tail}")]
    NoReport { tail: String },
    #[error("the benchmark's report from L1 is not JSON")]
    Decode(#[source] serde_json::Error),
    #[error("the drill for {memory_mib} MiB and {devices} device(s) failed: {failures}")]
    DrillFailed {
        memory_mib: u64,
        devices: u32,
        failures: String,
    },
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
}

/// Largest over smallest: how far a figure grows across the runs (1 is flat).
fn flatness(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    if min > 0.0 {
        max / min
    } else {
        f64::NAN
    }
}

/// Runs the chosen benchmark and prints its figures.
pub fn run(args: BenchArgs) -> Result<(), BenchError> {
    match args.which {
        BenchKind::Restore {
            payload,
            sizes,
            devices,
            rounds,
            kernel: Some(kernel),
            initrd: Some(initrd),
            json,
        } => restore_bed::run_in_bed(&restore_bed::InBed {
            kernel: &kernel,
            initrd: &initrd,
            payload: &payload,
            sizes: &sizes,
            devices: &devices,
            rounds,
            json,
        }),
        BenchKind::Restore {
            payload,
            sizes,
            devices,
            rounds,
            json,
            ..
        } => restore::run(&payload, &sizes, &devices, rounds as usize, json),
        BenchKind::Update(args) => update::run(&args),
    }
}
