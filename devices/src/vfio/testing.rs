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

/// A function with a 16 KiB memory BAR 0 (MSI-X table at 0x2000, pending bits at 0x3000), a
/// 64-bit MSI capability at 0x40, a two-vector MSI-X capability at 0x50 and INTx pin A.
pub struct FakeFunction {
    pub config: Mutex<[u8; 256]>,
    pub log: CallLog,
    /// Its file gives EIO, as after a live-update freeze in reset mode.
    pub reset_under_its_file: Arc<AtomicBool>,
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
        put(0x50, &[0x11, 0x00]);
        put(0x52, &1u16.to_le_bytes()); // MSI-X: 2 vectors
        put(0x54, &0x2000u32.to_le_bytes());
        put(0x58, &0x3000u32.to_le_bytes());
        FakeFunction {
            config: Mutex::new(config),
            log: CallLog::default(),
            reset_under_its_file: Arc::default(),
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
            let config = self.config.lock().unwrap();
            let at = usize::try_from(offset).unwrap();
            data.copy_from_slice(&config[at..at + data.len()]);
        } else {
            data.fill(0);
        }
    }
    fn write(&self, index: u32, data: &[u8], offset: u64) {
        self.log
            .push(format!("write region {index} at {offset:#x}: {data:02x?}"));
    }
    fn enable_irq(&self, index: u32, triggers: &[&EventFd]) -> Result<(), VfioError> {
        self.log
            .push(format!("enable irq {index} x{}", triggers.len()));
        Ok(())
    }
    fn set_intx_resample(&self, _resample: &EventFd) -> Result<(), VfioError> {
        self.log.push("intx resample".to_string());
        Ok(())
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        self.log.push(format!("disable irq {index}"));
        Ok(())
    }
    fn probe(&self) -> std::io::Result<()> {
        if self.reset_under_its_file.load(Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the eventfd is owned by `self`, which outlives the borrow.
        Some(unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) })
    }
}
