//! The device model over a fake VFIO function and interrupt router (`vfio::testing`).

use super::*;
use crate::pci::msix::MSIX_ENABLE;
use crate::vfio::testing::{CallLog, FakeFunction, FakeRouter, Faults};
use luvmm_resources::state::MsiState;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

const EDU: u32 = 0x11e8_1234;

struct Mapper;

impl GuestMapper for Mapper {
    fn map(&self, _gpa: u64, _size: u64, _host: u64) -> Result<u32, HypervisorError> {
        Err(HypervisorError::Exhausted { what: "memslot" })
    }
    fn unmap(&self, _slot: u32) -> Result<(), HypervisorError> {
        Ok(())
    }
}

/// Where a test's device comes from: `None` for a fresh boot, else a saved state and the
/// eventfds handed over with it, if any.
type Restore<'a> = Option<(&'a PassthroughState, Option<InterruptFds>)>;

/// A device over a fake function; returns it with the function's and router's logs.
fn build(
    id: u32,
    restore: Restore<'_>,
) -> Result<(VfioPciDevice, CallLog, Arc<FakeRouter>), PassthroughError> {
    let (host, vfio, _) = fake_host(id, 2);
    let (device, router) = build_on(host, restore)?;
    Ok((device, vfio, router))
}

/// A device over `host`, with trapped BARs; returns it with the router's log.
fn build_on(
    host: HostDevice,
    restore: Restore<'_>,
) -> Result<(VfioPciDevice, Arc<FakeRouter>), PassthroughError> {
    let (args, router) = args();
    let device = match restore {
        None => VfioPciDevice::new(host, args)?,
        Some((saved, handed)) => VfioPciDevice::restore(host, args, saved, handed)?,
    };
    Ok((device, router))
}

/// A fake function of vendor:device `id` attached to HWPT `hwpt_id`, with its call log
/// and the switch that makes its file give EIO.
fn fake_host(id: u32, hwpt_id: u32) -> (HostDevice, CallLog, Arc<AtomicBool>) {
    let function = FakeFunction::new(id);
    let log = function.log.clone();
    let reset = function.reset_under_its_file.clone();
    let host = HostDevice {
        bdf: "0000:00:04.0".into(),
        function: Box::new(function),
        iommu: DeviceIommu::Iommufd { hwpt_id },
    };
    (host, log, reset)
}

/// A fake function of vendor:device `id` as `fake_host` makes it, with the switches that
/// make it refuse calls.
fn faulty_host(id: u32) -> (HostDevice, CallLog, Faults) {
    let function = FakeFunction::new(id);
    let (log, faults) = (function.log.clone(), function.faults.clone());
    let host = HostDevice {
        bdf: "0000:00:04.0".into(),
        function: Box::new(function),
        iommu: DeviceIommu::Iommufd { hwpt_id: 2 },
    };
    (host, log, faults)
}

/// A fresh device whose VM runs: its interrupts released, the logs cleared.
fn running() -> VfioPciDevice {
    let (mut device, vfio, router) = build(EDU, None).unwrap();
    device.hold_interrupts(false);
    vfio.take();
    router.take();
    device
}

fn write32(device: &mut VfioPciDevice, offset: usize, value: u32) {
    device.config_write(offset, &value.to_le_bytes());
}

/// The guest places BAR 0, turns memory and bus mastering on and programs MSI to
/// 0xfee00000/0x41; with `msix`, it then programs both MSI-X vectors (vector 1 masked)
/// and turns MSI-X on instead of MSI.
fn program(device: &mut VfioPciDevice, msix: bool) {
    write32(device, 0x10, 0xc000_0000);
    device.config_write(COMMAND, &0x6u16.to_le_bytes());
    write32(device, 0x44, 0xfee0_0000);
    write32(device, 0x48, 0);
    write32(device, 0x4c, 0x41);
    if !msix {
        device.config_write(0x42, &0x81u16.to_le_bytes());
        return;
    }
    for (vector, masked) in [(0u32, 0u32), (1, 1)] {
        let entry = 0x2000 + 16 * u64::from(vector);
        for (at, word) in [
            (0, 0xfee0_0000u32),
            (4, 0),
            (8, 0x50 + vector),
            (12, masked),
        ] {
            device.bar_write(0, entry + at, &word.to_le_bytes());
        }
    }
    device.config_write(0x52, &MSIX_ENABLE.to_le_bytes());
}

fn config_dwords(device: &mut VfioPciDevice) -> Vec<u32> {
    (0..256)
        .step_by(4)
        .map(|at| device.config_read(at))
        .collect()
}

fn bar_dwords(device: &mut VfioPciDevice, from: u64, count: u64) -> Vec<u32> {
    (0..count)
        .map(|i| {
            let mut word = [0u8; 4];
            device.bar_read(0, from + 4 * i, &mut word);
            u32::from_le_bytes(word)
        })
        .collect()
}

/// What a handover sends of the device's eventfds, as the target gets them.
fn hand_over(device: &VfioPciDevice, saved: &PassthroughState) -> InterruptFds {
    let fds: Vec<OwnedFd> = device
        .interrupt_fds()
        .into_iter()
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect();
    InterruptFds::from_fds(saved, &mut fds.into_iter()).unwrap()
}

#[test]
fn a_fresh_device_turns_intx_on_and_takes_new_numbers() {
    let (mut device, vfio, router) = build(EDU, None).unwrap();
    assert_eq!(vfio.take(), ["enable irq 0 x1", "intx resample"]);
    // Nothing reaches KVM before the VM runs.
    assert_eq!(router.take(), Vec::<String>::new());
    device.hold_interrupts(false);
    assert_eq!(router.take(), ["attach line 16"]);
    let saved = device.save(4);
    assert_eq!(saved.msi.map(|m| m.gsi), Some(24));
    assert_eq!(saved.intx.map(|i| (i.line, i.enabled)), Some((16, true)));
    assert_eq!(saved.config[0x3c], 16, "the guest is told its INTx line");
    assert_eq!(saved.hwpt_id, Some(2));
}

#[test]
fn a_handed_over_device_comes_back_as_saved_without_asking_vfio() {
    let mut device = running();
    program(&mut device, false);
    let saved = device.save(4);
    let before = config_dwords(&mut device);
    let handed = hand_over(&device, &saved);
    let (mut restored, vfio, router) = build(EDU, Some((&saved, Some(handed)))).unwrap();
    assert_eq!(config_dwords(&mut restored), before);
    assert_eq!(restored.save(4), saved);
    // The saved numbers and the MSI route; no irqfd until the VM runs (a signal waiting in
    // an eventfd would be taken before the vCPUs exist); nothing of VFIO.
    assert_eq!(
        router.take(),
        ["claim 24", "claim line 16", "route 24 0xfee00000 0x41"]
    );
    restored.hold_interrupts(false);
    assert_eq!(router.take(), ["attach 24", "attach line 16"]);
    assert_eq!(vfio.take(), Vec::<String>::new());
}

#[test]
fn a_device_opened_anew_is_armed_again_from_its_state() {
    let mut device = running();
    program(&mut device, false);
    let saved = device.save(4);
    let (mut restored, vfio, _) = build(EDU, Some((&saved, None))).unwrap();
    assert_eq!(restored.save(4), saved);
    // A new fd has no interrupt on: MSI is armed as saved, INTx (off when saved) is not.
    assert_eq!(
        vfio.take(),
        ["write region 7 at 0x4: [06, 00]", "enable irq 1 x1"]
    );
    assert_eq!(restored.config_read(0x10), 0xc000_0000);
}

#[test]
fn msix_table_and_pending_bits_survive_a_handover() {
    let mut device = running();
    program(&mut device, true);
    // Vector 1 is masked: a message for it waits, and shows in the pending bits.
    device
        .interrupts
        .msix
        .as_ref()
        .unwrap()
        .vectors_trigger(1)
        .write(1)
        .unwrap();
    assert_eq!(bar_dwords(&mut device, 0x3000, 1), [0b10]);
    let saved = device.save(4);
    let msix = saved.msix.as_ref().unwrap();
    assert!(msix.enabled);
    assert_eq!(msix.gsis, [25, 26]);
    let table = bar_dwords(&mut device, 0x2000, 8);
    let handed = hand_over(&device, &saved);
    assert_eq!(handed.waiting(), 1);
    let (mut restored, vfio, router) = build(EDU, Some((&saved, Some(handed)))).unwrap();
    assert_eq!(bar_dwords(&mut restored, 0x2000, 8), table);
    assert_eq!(bar_dwords(&mut restored, 0x3000, 1), [0b10]);
    assert_eq!(restored.save(4), saved);
    assert_eq!(
        router.take(),
        ["claim 24", "claim 25", "claim 26", "claim line 16"]
    );
    restored.hold_interrupts(false);
    // Only the unmasked vector is attached; the pending one waits for its unmask.
    assert_eq!(
        router.take(),
        ["route 25 0xfee00000 0x50", "attach 25", "attach line 16"]
    );
    assert_eq!(vfio.take(), Vec::<String>::new());
    restored.bar_write(0, 0x2000 + 16 + 12, &0u32.to_le_bytes());
    assert_eq!(router.take(), ["route 26 0xfee00000 0x51", "attach 26"]);
}

#[test]
fn an_update_turns_vfio_interrupts_off_and_a_cancel_back_on() {
    let (mut device, vfio, _) = build(EDU, None).unwrap();
    device.hold_interrupts(false);
    program(&mut device, false);
    vfio.take();
    device.quiesce_interrupts(true).unwrap();
    assert_eq!(vfio.take(), ["disable irq 1"]);
    device.quiesce_interrupts(false).unwrap();
    assert_eq!(vfio.take(), ["enable irq 1 x1"]);
    // The guest's view did not change.
    assert!(device.save(4).msi.is_some_and(|m| m.enabled));
    assert!(device.in_d0());
}

#[test]
fn paused_devices_hold_their_interrupts_in_the_eventfds() {
    let (mut device, _, router) = build(EDU, None).unwrap();
    device.hold_interrupts(false);
    program(&mut device, false);
    router.take();
    device.hold_interrupts(true);
    assert_eq!(router.take(), ["detach 24", "detach 16"]);
    device.hold_interrupts(true);
    assert!(router.take().is_empty());
    device.hold_interrupts(false);
    assert_eq!(router.take(), ["attach 24", "attach line 16"]);
}

#[test]
fn a_state_of_another_device_or_short_of_eventfds_is_refused() {
    let (device, _, _) = build(EDU, None).unwrap();
    let saved = device.save(4);
    assert!(matches!(
        build(0x0010_1b36, Some((&saved, None))),
        Err(PassthroughError::NotTheSavedDevice {
            saved: EDU,
            found: 0x0010_1b36,
            ..
        })
    ));
    let one: Vec<OwnedFd> = vec![device.interrupt_fds()[0].try_clone_to_owned().unwrap()];
    assert!(matches!(
        InterruptFds::from_fds(&saved, &mut one.into_iter()),
        Err(PassthroughError::InterruptFds {
            expected: 3,
            got: 1,
            ..
        })
    ));
}

#[test]
fn a_function_reset_under_its_file_is_replaced_under_the_same_guest_view() {
    let (host, _, reset) = fake_host(EDU, 2);
    let (mut device, router) = build_on(host, None).unwrap();
    device.hold_interrupts(false);
    program(&mut device, false);
    device.quiesce_interrupts(true).unwrap();
    assert!(!device.lost_to_reset());
    reset.store(true, Ordering::Relaxed);
    assert!(device.lost_to_reset());
    let before = device.save(4);
    router.take();

    drop(device.release_function());
    // Unplugged: the guest's view stays, the hardware reads all-ones, nothing is handed on.
    assert_eq!(device.config_read(0x10), 0xc000_0000);
    assert_eq!(bar_dwords(&mut device, 0, 1), [0xffff_ffff]);
    assert!(device.device_fd().is_none());
    assert!(!device.lost_to_reset());

    let (other, _, _) = fake_host(0x0010_1b36, 3);
    assert!(matches!(
        device.adopt_function(other),
        Err(PassthroughError::NotTheSavedDevice {
            found: 0x0010_1b36,
            ..
        })
    ));
    let (again, vfio, _) = fake_host(EDU, 3);
    device.adopt_function(again).unwrap();
    // Decoding and mastering as the guest had them, MSI armed on the same eventfd, and one
    // interrupt in it for whatever the reset lost; no route or number changed.
    assert_eq!(
        vfio.take(),
        ["write region 7 at 0x4: [06, 00]", "enable irq 1 x1"]
    );
    assert!(router.take().is_empty());
    assert_eq!(
        device
            .interrupts
            .msi
            .as_ref()
            .unwrap()
            .trigger
            .read()
            .unwrap(),
        1
    );
    let after = device.save(4);
    assert_eq!(after.hwpt_id, Some(3));
    assert_eq!(
        PassthroughState {
            hwpt_id: Some(2),
            ..after
        },
        before
    );
    // Interrupts are on: a cancel's re-arm has nothing left to do.
    device.quiesce_interrupts(false).unwrap();
    assert!(vfio.take().is_empty());
}

/// The router and mapper a test device is given, with the router's log.
fn args() -> (PassthroughArgs, Arc<FakeRouter>) {
    let router = Arc::new(FakeRouter::default());
    let args = PassthroughArgs {
        router: router.clone(),
        mapper: Arc::new(Mapper),
        bar_access: BarMode::Trapped,
    };
    (args, router)
}

#[test]
fn restore_refuses_another_device_before_touching_it() {
    let (device, _, _) = build(EDU, None).unwrap();
    let saved = device.save(4);
    let (host, vfio, _) = fake_host(0x0010_1b36, 2);
    let (args, router) = args();
    assert!(matches!(
        VfioPciDevice::restore(host, args, &saved, None),
        Err(PassthroughError::NotTheSavedDevice {
            saved: EDU,
            found: 0x0010_1b36,
            ..
        })
    ));
    // Nothing written to the function, no interrupt armed, no GSI or line claimed.
    assert_eq!(vfio.take(), Vec::<String>::new());
    assert_eq!(router.take(), Vec::<String>::new());
}

#[test]
fn restore_refuses_capabilities_the_function_does_not_have() {
    let (device, _, _) = build(EDU, None).unwrap();
    let saved = device.save(4);
    let moved_msi = PassthroughState {
        msi: saved.msi.map(|m| MsiState { offset: 0x60, ..m }),
        ..saved.clone()
    };
    let mut longer_table = saved.clone();
    if let Some(msix) = longer_table.msix.as_mut() {
        msix.table.extend([0; 4]);
    }
    for (state, capability) in [(moved_msi, "MSI"), (longer_table, "MSI-X")] {
        let (host, vfio, _) = fake_host(EDU, 2);
        let (args, router) = args();
        let refused = VfioPciDevice::restore(host, args, &state, None);
        assert!(
            matches!(refused, Err(PassthroughError::CapabilityMismatch { capability: c, .. }) if c == capability),
            "{capability}"
        );
        assert_eq!(vfio.take(), Vec::<String>::new());
        assert_eq!(router.take(), Vec::<String>::new());
    }
}

#[test]
fn new_and_restore_of_the_same_function_give_the_same_guest_view() {
    let (mut fresh, _, _) = build(EDU, None).unwrap();
    let saved = fresh.save(4);
    let (mut restored, vfio, router) = build(EDU, Some((&saved, None))).unwrap();
    assert_eq!(config_dwords(&mut restored), config_dwords(&mut fresh));
    assert_eq!(
        bar_dwords(&mut restored, 0x2000, 8),
        bar_dwords(&mut fresh, 0x2000, 8)
    );
    assert_eq!(restored.save(4), saved);
    // The fresh device's numbers, claimed again; VFIO's INTx armed again as it was.
    assert_eq!(router.take(), ["claim 24", "claim line 16"]);
    assert_eq!(
        vfio.take(),
        [
            "write region 7 at 0x4: [00, 00]",
            "enable irq 0 x1",
            "intx resample"
        ]
    );
}

#[test]
fn msix_turns_intx_off_while_on() {
    let (mut device, vfio, _) = build(EDU, None).unwrap();
    device.hold_interrupts(false);
    vfio.take();
    program(&mut device, true);
    let calls = vfio.take();
    assert_eq!(
        calls[calls.len() - 2..],
        ["disable irq 0", "enable irq 2 x2"]
    );
    device.config_write(0x52, &0u16.to_le_bytes());
    assert_eq!(
        vfio.take(),
        ["disable irq 2", "enable irq 0 x1", "intx resample"]
    );
}

/// IRQ indices, as VFIO numbers them.
const MSI: u32 = 1;
const MSIX: u32 = 2;

#[test]
fn nothing_lost_a_restore_that_cannot_arm_msi_or_msix_again_fails() {
    for (msix, index, what) in [(false, MSI, "MSI"), (true, MSIX, "MSI-X")] {
        let mut device = running();
        program(&mut device, msix);
        let saved = device.save(4);
        let (host, _, faults) = faulty_host(EDU);
        faults.irq_set(index, true);
        let (args, _) = args();
        let restored = VfioPciDevice::restore(host, args, &saved, None);
        assert!(
            matches!(&restored, Err(PassthroughError::Rearm { what: w, .. }) if *w == what),
            "{what}: {:?}",
            restored.err()
        );
    }
}

#[test]
fn nothing_lost_a_cancel_undoes_a_quiesce_that_stopped_halfway() {
    let (host, vfio, faults) = faulty_host(EDU);
    let (mut device, _) = build_on(host, None).unwrap();
    device.hold_interrupts(false);
    program(&mut device, true);
    // The guest has MSI on as well as MSI-X: the quiesce turns MSI off first.
    device.config_write(0x42, &0x81u16.to_le_bytes());
    vfio.take();
    faults.irq_set(MSIX, true);
    assert!(matches!(
        device.quiesce_interrupts(true),
        Err(PassthroughError::Vfio {
            op: "MSI-X off for the update",
            ..
        })
    ));
    faults.irq_set(MSIX, false);
    device.quiesce_interrupts(false).unwrap();
    // MSI went off and is on again; MSI-X never went off.
    assert_eq!(vfio.take(), ["disable irq 1", "enable irq 1 x1"]);
    // Nothing is left recorded as off: a second cancel has nothing to do.
    device.quiesce_interrupts(false).unwrap();
    assert!(vfio.take().is_empty());
}

#[test]
fn nothing_lost_a_function_whose_power_state_cannot_be_read_is_not_in_d0() {
    let (host, _, faults) = faulty_host(EDU);
    let (device, _) = build_on(host, None).unwrap();
    assert!(device.in_d0());
    faults.config_reads(true);
    assert!(!device.in_d0());
}
