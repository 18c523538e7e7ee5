//! The `handover` scenario: passed-through devices move with their VM to a new process.

use std::path::PathBuf;

use luvmm_tests::nested::Results;

use crate::scenario::{boot_scenario, fail, require_no_failure, require_ok, watched_opens};

/// The sub-tests `handover.sh` must report, each `ok`.
const HANDOVER_TESTS: &[&str] = &[
    "vfio_handover_round_1",
    "vfio_handover_devices_adopted_ahead_kept",
    "vfio_handover_source_confirmed",
    "vfio_handover_round_2",
    "vfio_handover_nvme_kept_its_queues",
    "vfio_handover_memory_intact",
    "vfio_handover_devices_set_up_anew_adopted_again",
    "vfio_handover_irq_raised_during_the_switch_arrives",
    "vfio_handover_pending_msix_kept",
    "vfio_handover_signals_waited_in_eventfds",
    "vfio_handover_round_3",
    "vfio_handover_round_4",
    "vfio_handover_state_without_device_fds_refused",
    "vfio_handover_guest_runs_after_failures",
    "vfio_handover_legacy_refused",
];

/// Two edu devices and an NVMe controller move with their VM to a new luvmm process, twice,
/// without a reopen or a reset, adopted before the pause (and adopted again when the guest
/// set them up anew after that); interrupts raised during a switch arrive; the failures leave
/// the guest running. The new processes open no VFIO device, group, container or /dev/iommu.
#[test]
fn vfio_handover_moves_devices_to_a_new_process() {
    let run = boot_scenario(
        "nested-handover",
        "handover",
        &["edu", "edu", "nvme,serial=luvmm-nvme,msix_qsize=4"],
        &[
            luvmm_tests::payload(),
            PathBuf::from(env!("CARGO_BIN_EXE_vfio-open-watch")),
            PathBuf::from(env!("CARGO_BIN_EXE_handover-taker")),
        ],
    );
    let results = run.results();
    require_no_failure(&run);
    require_ok(&run, "", HANDOVER_TESTS);
    for step in ["handover_b", "handover_c"] {
        let opens = watched_opens(&run, step);
        if !opens.is_empty() {
            fail(
                &run,
                &format!("{step}: the handover opened VFIO or iommufd nodes: {opens:?}"),
            );
        }
    }
    for r in results.iter().filter(|r| r.starts_with("figure ")) {
        println!("nested figure: {r}");
    }
}
