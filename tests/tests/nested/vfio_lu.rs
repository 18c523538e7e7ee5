//! The `vfio-lu` scenario: luvmm's VFIO live-update handler in the bed's kernel, across a
//! chain of kexecs.

use std::path::PathBuf;

use luvmm_tests::nested::{L1Run, Results};

use crate::scenario::{boot_scenario_appending, fail, hostcheck, require_no_failure};

/// The L1 lines `test vfio_lu_<name> ok`, counted.
fn vfio_lu_oks(run: &L1Run, name: &str) -> usize {
    let expected = format!("test vfio_lu_{name} ok");
    run.results().iter().filter(|r| **r == expected).count()
}

/// The kernel half: luvmm's VFIO live-update handler in the bed's kernel, across a chain of
/// three real kexecs in one L1 (frozen in `reset`, then in `keep`, then into a kernel whose
/// handler fails to register), the handler's test faults making its failures and race
/// windows happen on demand. Two `edu` functions (no reset method), an NVMe controller (FLR), and a
/// second NVMe controller with SR-IOV (its VF must be refused; after the second kexec the
/// init moves it to the kernel's NVMe driver, so its retrieve fails). No
/// `vfio_pci.disable_idle_d3`: the handler holds a kept function in D0 itself.
#[test]
fn vfio_lu_handler_across_a_chain_of_kexecs() {
    let run = boot_scenario_appending(
        "nested-vfio-lu",
        "vfio-lu",
        "vfio_pci.luvmm_lu=reset",
        &[
            "edu",
            "edu",
            "nvme,serial=luvmm-nvme",
            // QEMU's SR-IOV NVMe needs a subsystem and flexible queue and interrupt resources.
            "nvme-subsys,id=luvmm-subsys",
            "nvme,serial=luvmm-sriov,subsys=luvmm-subsys,sriov_max_vfs=1,\
             sriov_vq_flexible=2,sriov_vi_flexible=1",
            // Two functions of one slot behind a root port: one device set, reset together.
            "pcie-root-port,id=lurp,chassis=1,slot=1",
            "edu,bus=lurp,addr=0.0,multifunction=on",
            "edu,bus=lurp,addr=0.1",
        ],
        &[PathBuf::from(env!("CARGO_BIN_EXE_vfio-lu"))],
    );
    require_no_failure(&run);
    let results = run.results();
    for stage in 1..=4 {
        if !results
            .iter()
            .any(|r| r.starts_with(&format!("boot stage={stage} ")))
        {
            fail(&run, &format!("the chain never reached stage {stage}"));
        }
    }
    if !results.contains(&"selftest liveupdate  ok") {
        fail(
            &run,
            "the kernel's own LUO selftest did not pass with the handler on",
        );
    }
    // Each kexec with the handler on brings an `edu` and the NVMe controller in, the first one
    // also the first function behind the root port, the second the other `edu`; the kernel
    // claims them for vfio-pci before its own NVMe driver probes, and the init finds them
    // there.
    let claimed = results
        .iter()
        .filter(|r| r.starts_with("on vfio-pci from boot "))
        .count();
    if claimed != 6 {
        fail(
            &run,
            &format!("{claimed} incoming functions were on vfio-pci from boot, expected 6"),
        );
    }
    // host-check finds the handler by probing, and its mode; with the handler unregistered in
    // the last kernel (its `register` fault), LUO is broken (the session held a file it could
    // not take back).
    let (code, report) = hostcheck(&run, 1);
    let lu = &report["liveupdate"];
    assert_eq!(lu["handlers"]["vfio_device"], "present", "{report}");
    assert_eq!(lu["vfio_handler_mode"], "reset", "{report}");
    assert_eq!(
        (code, &report["verdict"]),
        (0, &serde_json::json!("ready")),
        "{report}"
    );
    let (_, report) = hostcheck(&run, 4);
    let lu = &report["liveupdate"];
    assert_eq!(lu["luo"], "broken", "{report}");
    // Once, before any kexec.
    for name in [
        "preserve_group_enoent",
        "preserve_container_enoent",
        "preserve_group_device_enoent",
        "preserve_unbound_enoent",
        "preserve_bound",
        "preserve_twice_ebusy",
        "unbind_refused_while_preserved",
        "unpreserved_on_close",
        "unbind_after_close",
        "preserve_vf_enoent",
        "freeze_refused_with_msi",
        "freeze_refused_out_of_d0",
        "frozen_device_gives_eio",
        "unfrozen_device_works",
        "reopen_after_failed_kexec",
        "next_kernel_without_handler_eio",
        "reset_mode_nvme_disabled",
        "keep_mode_nvme_enabled",
        "keep_mode_bus_master_kept",
        "keep_mode_old_admin_queue",
        "retrieve_unbound_enodev",
        "retrieve_another_function_enodev",
        "failed_retrieve_stays_failed",
        "failed_retrieve_still_incoming",
        "finish_after_failed_retrieve_ebusy",
        "unbind_from_another_driver",
        "keep_mode_held_in_d0",
        "sibling_hot_reset_ebusy",
        "bridge_reset_ebusy",
        "sysfs_reset_ebusy",
        "represerve_retrieved",
        "frozen_refuses_changes",
        "unfrozen_accepts_changes",
        "failed_enable_keeps_adoption",
        "failed_registration_nothing_incoming",
    ] {
        if vfio_lu_oks(&run, name) != 1 {
            fail(&run, &format!("vfio_lu_{name}: expected one ok"));
        }
    }
    // After each of the two kexecs with the handler on.
    for name in [
        "cdev_open_ebusy",
        "group_get_device_fd_ebusy",
        "unbind_refused_while_incoming",
        "finish_before_retrieve_ebusy",
        "ioctl_before_bind_einval",
        "bind_attach_map_file",
        "edu_dma_and_msi",
        "finish",
        "normal_open_after_finish",
    ] {
        if vfio_lu_oks(&run, name) != 2 {
            fail(
                &run,
                &format!("vfio_lu_{name}: expected an ok after each kexec"),
            );
        }
    }
}
