//! `luvmm bench restore` in the nested bed, as an operator runs it: a handover benchmark with
//! passthrough devices, which only the bed's nested KVM and `edu` functions can give. Figures
//! are never judged here, only that every row was measured from a guest that vouched for its
//! memory (the benchmark fails otherwise) and carries its parts.

use std::process::Command;

use luvmm_tests::nested::{one_l1_at_a_time, prepare};
use luvmm_tests::{luvmm_bin, payload, TestDir};
use serde_json::Value;

#[test]
fn bench_restore_in_the_bed_measures_handovers_with_passthrough_devices() {
    let work = TestDir::new("bench-restore-bed");
    let bed = prepare(work.path(), &[luvmm_bin()]);
    let _turn = one_l1_at_a_time();
    let out = Command::new(luvmm_bin())
        .args([
            "bench",
            "restore",
            "--sizes",
            "32",
            "--devices",
            "0,2",
            "--rounds",
            "3",
            "--json",
        ])
        .args(bed.luvmm_args())
        .arg("--payload")
        .arg(payload())
        .output()
        .expect("run luvmm bench restore");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON report");
    let rows = report["sizes"].as_array().expect("rows");
    let devices: Vec<u64> = rows.iter().filter_map(|r| r["devices"].as_u64()).collect();
    assert_eq!(devices, [0, 2], "{report}");
    for row in rows {
        let median = &row["median"];
        for part in [
            "blackout_ms",
            "save_ms",
            "transfer_ms",
            "load_ms",
            "built_ahead_ms",
        ] {
            let ms = median[part].as_f64().unwrap_or(-1.0);
            assert!(ms > 0.0, "{part}: {row}");
        }
    }
    let ratio = &report["devices_over_none"][0];
    assert_eq!(ratio[0], 32, "{report}");
    assert!(ratio[1].as_f64().unwrap_or(0.0) > 0.0, "{report}");
}
