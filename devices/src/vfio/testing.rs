//! Fakes of what a passthrough device talks to (the VMM's interrupt router and the host's
//! VFIO function), recording what was asked of them, for the device model's unit tests.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vfio_ioctls::VfioError;
use vmm_sys_util::eventfd::EventFd;

use crate::vfio::function::{RegionInfo, VfioFunction};
use crate::vfio::irq::{HypervisorError, IrqRouter};

/// A shared log of calls.
#[derive(Clone, Default)]
pub struct CallLog(Arc<Mutex<Vec<String>>>);

impl CallLog {
    /// Everything logged since the last `take`.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }
}

/// An interrupt router that hands out GSIs from 24 and INTx lines from 16.
#[derive(Default)]
pub struct FakeRouter {
    next_gsi: Mutex<u32>,
    next_line: Mutex<u32>,
    pub log: CallLog,
}

impl FakeRouter {
    /// Everything asked since the last `take`.
    pub fn take(&self) -> Vec<String> {
        self.log.take()
    }

    fn push(&self, what: String) -> Result<(), HypervisorError> {
        self.log.push(what);
        Ok(())
    }
}

impl IrqRouter for FakeRouter {
    fn allocate_gsi(&self, saved: Option<u32>) -> Result<u32, HypervisorError> {
        if let Some(gsi) = saved {
            self.push(format!("claim {gsi}"))?;
            return Ok(gsi);
        }
        let mut next = self.next_gsi.lock().unwrap();
        *next += 1;
        Ok(23 + *next)
    }
    fn allocate_intx_line(&self, saved: Option<u32>) -> Result<u32, HypervisorError> {
        if let Some(line) = saved {
            self.push(format!("claim line {line}"))?;
            return Ok(line);
        }
        let mut next = self.next_line.lock().unwrap();
        *next += 1;
        Ok(15 + *next)
    }
    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), HypervisorError> {
        self.push(format!("route {gsi} {address:#x} {data:#x}"))
    }
    fn register_irqfd(&self, _evt: &EventFd, gsi: u32) -> Result<(), HypervisorError> {
        self.push(format!("attach {gsi}"))
    }
    fn unregister_irqfd(&self, _evt: &EventFd, gsi: u32) -> Result<(), HypervisorError> {
        self.push(format!("detach {gsi}"))
    }
    fn register_resample_irqfd(
        &self,
        _trigger: &EventFd,
        _resample: &EventFd,
        gsi: u32,
    ) -> Result<(), HypervisorError> {
        self.push(format!("attach line {gsi}"))
    }
}

/// What a test makes a `FakeFunction` refuse, switched after the function is handed to the
/// device (clones share the switches).
#[derive(Clone, Default)]
pub struct Faults {
    /// IRQ indices (INTx 0, MSI 1, MSI-X 2) whose enable and disable calls fail.
    irq_set: Arc<Mutex<Vec<u32>>>,
    /// Configuration reads fail (the infallible `read` then leaves its buffer as it was, as
    /// vfio-ioctls' `region_read` does).
    config_reads: Arc<AtomicBool>,
}

impl Faults {
    /// Makes VFIO's enable and disable calls at IRQ index `index` fail (`fail`), or not.
    pub fn irq_set(&self, index: u32, fail: bool) {
        let mut failing = self.irq_set.lock().unwrap();
        failing.retain(|&i| i != index);
        if fail {
            failing.push(index);
        }
    }

    /// Makes configuration reads fail (`fail`), or not.
    pub fn config_reads(&self, fail: bool) {
        self.config_reads.store(fail, Ordering::Relaxed);
    }

    fn irq_set_fails(&self, index: u32) -> bool {
        self.irq_set.lock().unwrap().contains(&index)
    }
}

/// A function with a 16 KiB memory BAR 0 (MSI-X table at 0x2000, pending bits at 0x3000), a
/// 64-bit MSI capability at 0x40, a two-vector MSI-X capability at 0x50, a power-management
/// capability at 0x60 (in D0) and INTx pin A.
pub struct FakeFunction {
    pub config: Mutex<[u8; 256]>,
    pub log: CallLog,
    /// Its file gives EIO, as after a live-update freeze in reset mode.
    pub reset_under_its_file: Arc<AtomicBool>,
    pub faults: Faults,
    /// Stands in for the device fd.
    fd: EventFd,
}

/// Configuration region index (VFIO_PCI_CONFIG_REGION_INDEX).
const CONFIG: u32 = 7;

impl FakeFunction {
    /// The function as after reset, with vendor:device `id`.
    pub fn new(id: u32) -> FakeFunction {
        let mut config = [0u8; 256];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &id.to_le_bytes());
        put(0x06, &0x10u16.to_le_bytes()); // status: capability list
        put(0x34, &[0x40]);
        put(0x3d, &[1]); // INTx pin A
        put(0x40, &[0x05, 0x50]);
        put(0x42, &0x0080u16.to_le_bytes()); // MSI: 64-bit
        put(0x50, &[0x11, 0x60]);
        put(0x52, &1u16.to_le_bytes()); // MSI-X: 2 vectors
        put(0x54, &0x2000u32.to_le_bytes());
        put(0x58, &0x3000u32.to_le_bytes());
        put(0x60, &[0x01, 0x00]); // power management; PMCSR at 0x64: D0
        FakeFunction {
            config: Mutex::new(config),
            log: CallLog::default(),
            reset_under_its_file: Arc::default(),
            faults: Faults::default(),
            fd: EventFd::new(0).unwrap(),
        }
    }
}

impl VfioFunction for FakeFunction {
    fn region(&self, index: u32) -> RegionInfo {
        match index {
            0 => RegionInfo {
                size: 0x4000,
                offset: 0,
                mmap: true,
            },
            CONFIG => RegionInfo {
                size: 256,
                offset: 0x7000,
                mmap: false,
            },
            _ => RegionInfo::default(),
        }
    }
    fn irq_count(&self, index: u32) -> u32 {
        match index {
            0 | 1 => 1,
            2 => 2,
            _ => 0,
        }
    }
    fn read(&self, index: u32, data: &mut [u8], offset: u64) {
        if index == CONFIG {
            // A refused read leaves `data` as it was.
            let _ = self.read_config(data, offset);
        } else {
            data.fill(0);
        }
    }
    fn read_config(&self, data: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.reset_under_its_file.load(Ordering::Relaxed)
            || self.faults.config_reads.load(Ordering::Relaxed)
        {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let config = self.config.lock().unwrap();
        let at = usize::try_from(offset).unwrap();
        data.copy_from_slice(&config[at..at + data.len()]);
        Ok(())
    }
    fn write(&self, index: u32, data: &[u8], offset: u64) {
        self.log
            .push(format!("write region {index} at {offset:#x}: {data:02x?}"));
    }
    fn enable_irq(&self, index: u32, triggers: &[&EventFd]) -> Result<(), VfioError> {
        if self.faults.irq_set_fails(index) {
            return Err(VfioError::VfioDeviceEnableIrq);
        }
        self.log
            .push(format!("enable irq {index} x{}", triggers.len()));
        Ok(())
    }
    fn set_intx_resample(&self, _resample: &EventFd) -> Result<(), VfioError> {
        self.log.push("intx resample".to_string());
        Ok(())
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        if self.faults.irq_set_fails(index) {
            return Err(VfioError::VfioDeviceDisableIrq);
        }
        self.log.push(format!("disable irq {index}"));
        Ok(())
    }
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the eventfd is owned by `self`, which outlives the borrow.
        Some(unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) })
    }
}
