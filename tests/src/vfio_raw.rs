//! Raw VFIO cdev, group and iommufd steps for the kernel-half tests in L1 (`vfio-lu`). Each
//! returns the kernel's errno as it is, because that errno is what those tests check;
//! vfio-ioctls' `VfioDevice` logs and swallows region errors and unwraps in `Drop`, which a
//! device file the kernel froze (`EIO`) would turn into a panic.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use iommufd_bindings::iommufd::{iommu_ioas_alloc, iommu_ioas_map_file};
use iommufd_ioctls::IommuFd;
use luvmm_devices::vfio::{host_vfio_devices, HostVfioDevice};
use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_info, vfio_pci_hot_reset, vfio_region_info,
    VFIO_TYPE1v2_IOMMU, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE, VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE, VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE, VFIO_BASE + 6);
ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE, VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE, VFIO_BASE + 10);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE, VFIO_BASE + 11);
ioctl_io_nr!(VFIO_DEVICE_PCI_HOT_RESET, VFIO_TYPE, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE, VFIO_BASE + 18);
ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 19);

/// `size_of::<T>()` as the `u32` `argsz`/`size` field of a VFIO or iommufd ioctl argument;
/// the compile-time assert makes the cast exact.
#[allow(clippy::cast_possible_truncation)]
const fn argsz<T>() -> u32 {
    const { assert!(size_of::<T>() <= u32::MAX as usize) };
    size_of::<T>() as u32
}

/// The errno of the last failed call, as an `io::Error`, when `ret` says it failed.
fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// What the project's own device listing says of `bdf` (it must be bound to vfio-pci).
fn host_device(bdf: &str) -> io::Result<HostVfioDevice> {
    host_vfio_devices()
        .into_iter()
        .find(|d| d.bdf == bdf)
        .ok_or_else(|| io::Error::other(format!("{bdf}: not bound to vfio-pci")))
}

/// `/dev/vfio/devices/vfioN` of a function bound to vfio-pci.
pub fn cdev_path(bdf: &str) -> io::Result<PathBuf> {
    host_device(bdf)?
        .cdev
        .ok_or_else(|| io::Error::other(format!("{bdf}: no vfio cdev")))
}

/// `/dev/vfio/N`, the group of a function.
pub fn group_path(bdf: &str) -> io::Result<PathBuf> {
    let group = host_device(bdf)?
        .iommu_group
        .ok_or_else(|| io::Error::other(format!("{bdf}: no IOMMU group")))?;
    Ok(PathBuf::from(format!("/dev/vfio/{group}")))
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Opens the function's cdev the normal way.
pub fn open_cdev(bdf: &str) -> io::Result<File> {
    open_rw(&cdev_path(bdf)?)
}

/// A group with a type1 container set, the legacy way to reach a device.
pub struct Group {
    pub group: File,
    pub container: File,
}

impl Group {
    pub fn open(bdf: &str) -> io::Result<Group> {
        let container = open_rw(Path::new("/dev/vfio/vfio"))?;
        let group = open_rw(&group_path(bdf)?)?;
        let fd = container.as_raw_fd();
        // SAFETY: GROUP_SET_CONTAINER reads one int, the container fd, from the pointer.
        check(unsafe { ioctl_with_ref(&group, VFIO_GROUP_SET_CONTAINER(), &fd) })?;
        // SAFETY: SET_IOMMU takes the IOMMU type by value.
        check(unsafe {
            ioctl_with_val(
                &container,
                VFIO_SET_IOMMU(),
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        })?;
        Ok(Group { group, container })
    }

    /// `VFIO_GROUP_GET_DEVICE_FD`: the device file of `bdf` through this group.
    pub fn device(&self, bdf: &str) -> io::Result<File> {
        let name = std::ffi::CString::new(bdf).map_err(io::Error::other)?;
        // SAFETY: GET_DEVICE_FD reads a NUL-terminated name and returns a new fd or -1.
        let fd = check(unsafe {
            libc::ioctl(
                self.group.as_raw_fd(),
                VFIO_GROUP_GET_DEVICE_FD() as _,
                name.as_ptr(),
            )
        })?;
        // SAFETY: the kernel just installed this fd for us.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

/// A new iommufd with one IOAS.
pub struct Iommu {
    pub fd: IommuFd,
    pub ioas: u32,
}

impl Iommu {
    pub fn new() -> io::Result<Iommu> {
        let fd = IommuFd::new().map_err(io::Error::other)?;
        let mut alloc = iommu_ioas_alloc {
            size: argsz::<iommu_ioas_alloc>(),
            ..Default::default()
        };
        fd.alloc_iommu_ioas(&mut alloc).map_err(io::Error::other)?;
        Ok(Iommu {
            fd,
            ioas: alloc.out_ioas_id,
        })
    }

    /// `IOMMU_IOAS_MAP_FILE`: `len` bytes of `memfd` from 0 at `iova`.
    pub fn map_file(&self, memfd: BorrowedFd<'_>, iova: u64, len: u64) -> io::Result<()> {
        use iommufd_bindings::iommufd::{
            iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as FIXED,
            iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as READ,
            iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as WRITE,
        };
        let map = iommu_ioas_map_file {
            size: argsz::<iommu_ioas_map_file>(),
            flags: READ | WRITE | FIXED,
            ioas_id: self.ioas,
            fd: memfd.as_raw_fd(),
            start: 0,
            length: len,
            iova,
        };
        self.fd.map_iommu_ioas_file(&map).map_err(io::Error::other)
    }

    fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// `struct vfio_device_bind_iommufd` of the 7.2 uAPI: vfio-bindings 0.7 predates its
/// `token_uuid_ptr`, which a VF whose PF is on vfio-pci needs.
#[repr(C)]
#[derive(Default)]
struct BindIommufd {
    argsz: u32,
    flags: u32,
    iommufd: i32,
    out_devid: u32,
    token_uuid_ptr: u64,
}

/// `VFIO_DEVICE_BIND_FLAG_TOKEN`: `token_uuid_ptr` points at the SR-IOV VF token.
const BIND_FLAG_TOKEN: u32 = 1;

/// `VFIO_DEVICE_BIND_IOMMUFD`; returns the iommufd device id.
pub fn bind(device: &File, iommu: &Iommu) -> io::Result<u32> {
    bind_with(device, iommu, None)
}

/// `VFIO_DEVICE_BIND_IOMMUFD` with an SR-IOV VF token: on a PF without VFs in use it sets
/// the token, on a VF it must match its PF's.
pub fn bind_with_vf_token(device: &File, iommu: &Iommu, token: &[u8; 16]) -> io::Result<u32> {
    bind_with(device, iommu, Some(token))
}

fn bind_with(device: &File, iommu: &Iommu, token: Option<&[u8; 16]>) -> io::Result<u32> {
    let mut bind = BindIommufd {
        argsz: argsz::<BindIommufd>(),
        iommufd: iommu.raw(),
        ..Default::default()
    };
    if let Some(token) = token {
        bind.flags = BIND_FLAG_TOKEN;
        bind.token_uuid_ptr = token.as_ptr() as u64;
    }
    // SAFETY: BIND_IOMMUFD reads and writes a vfio_device_bind_iommufd whose argsz says so,
    // and reads 16 bytes at token_uuid_ptr only with the flag set, from `token`, which
    // outlives the call.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_BIND_IOMMUFD(), &mut bind) })?;
    Ok(bind.out_devid)
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` to the IOAS.
pub fn attach(device: &File, iommu: &Iommu) -> io::Result<()> {
    let mut attach = vfio_device_attach_iommufd_pt {
        argsz: argsz::<vfio_device_attach_iommufd_pt>(),
        pt_id: iommu.ioas,
        ..Default::default()
    };
    // SAFETY: ATTACH_IOMMUFD_PT reads and writes the struct whose argsz says so.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &mut attach) })?;
    Ok(())
}

/// `VFIO_DEVICE_GET_INFO`, the simplest proof that a device file is usable.
pub fn info(device: &File) -> io::Result<u32> {
    let mut info = vfio_device_info {
        argsz: argsz::<vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: GET_INFO writes a vfio_device_info whose argsz says how much room it has.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) })?;
    Ok(info.num_regions)
}

/// `VFIO_DEVICE_PCI_HOT_RESET` of a cdev bound to an iommufd: the slot or bus reset of its
/// whole device set (no group fds: every device of the set is the iommufd's).
pub fn hot_reset(device: &File) -> io::Result<()> {
    let reset = vfio_pci_hot_reset {
        argsz: argsz::<vfio_pci_hot_reset>(),
        ..Default::default()
    };
    // SAFETY: HOT_RESET reads a vfio_pci_hot_reset of argsz bytes and, with count 0, no
    // group fd after it.
    check(unsafe { ioctl_with_ref(device, VFIO_DEVICE_PCI_HOT_RESET(), &reset) })?;
    Ok(())
}

/// The offset of region `index` (BAR n, or the config space) in the device file.
pub fn region_offset(device: &File, index: u32) -> io::Result<u64> {
    let mut region = vfio_region_info {
        argsz: argsz::<vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: GET_REGION_INFO writes a vfio_region_info whose argsz says so.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_REGION_INFO(), &mut region) })?;
    Ok(region.offset)
}

/// A bound device file with its BAR 0 and config space offsets.
pub struct Device {
    pub file: File,
    bar0: u64,
    config: u64,
}

impl Device {
    /// Wraps a bound device file.
    pub fn new(file: File) -> io::Result<Device> {
        let bar0 = region_offset(&file, 0)?;
        let config = region_offset(&file, VFIO_PCI_CONFIG_REGION_INDEX)?;
        Ok(Device { file, bar0, config })
    }

    pub fn read32(&self, offset: u64) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.file.read_exact_at(&mut b, self.bar0 + offset)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn write32(&self, offset: u64, value: u32) -> io::Result<()> {
        self.file
            .write_all_at(&value.to_le_bytes(), self.bar0 + offset)
    }

    pub fn read64(&self, offset: u64) -> io::Result<u64> {
        Ok(u64::from(self.read32(offset)?) | u64::from(self.read32(offset + 4)?) << 32)
    }

    pub fn write64(&self, offset: u64, value: u64) -> io::Result<()> {
        // The low half goes to the first register, the high half to the next one.
        #[allow(clippy::cast_possible_truncation)]
        let low = value as u32;
        self.write32(offset, low)?;
        self.write32(offset + 4, (value >> 32) as u32)
    }

    /// The PCI COMMAND register, as vfio-pci shows it.
    pub fn command(&self) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.file.read_exact_at(&mut b, self.config + 4)?;
        Ok(u16::from_le_bytes(b))
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, self.config + offset)
    }

    /// Puts the function in D3hot (`true`) or back in D0 through its PM capability's control
    /// register, which vfio-pci carries out.
    pub fn set_d3hot(&self, d3hot: bool) -> io::Result<()> {
        let mut b = [0u8; 1];
        self.config_read(0x34, &mut b)?;
        let mut cap = u64::from(b[0]);
        while cap != 0 {
            let mut header = [0u8; 2];
            self.config_read(cap, &mut header)?;
            if header[0] == 0x01 {
                let mut control = [0u8; 2];
                self.config_read(cap + 4, &mut control)?;
                let state = u16::from(d3hot) * 3;
                let value = (u16::from_le_bytes(control) & !3) | state;
                return self
                    .file
                    .write_all_at(&value.to_le_bytes(), self.config + cap + 4);
            }
            cap = u64::from(header[1]);
        }
        Err(io::Error::other("no PCI power-management capability"))
    }

    /// `VFIO_DEVICE_RESET`: the function's own reset (FLR here).
    pub fn reset(&self) -> io::Result<()> {
        // SAFETY: DEVICE_RESET takes no argument.
        check(unsafe { ioctl(&self.file, VFIO_DEVICE_RESET()) })?;
        Ok(())
    }

    /// Turns on memory decoding and Bus Master, which DMA needs.
    pub fn enable_dma(&self) -> io::Result<()> {
        let command = self.command()? | 0x6;
        self.file
            .write_all_at(&command.to_le_bytes(), self.config + 4)
    }

    /// MSI vector 0 to `trigger`, or MSI off with `None`.
    pub fn set_msi(&self, trigger: Option<&EventFd>) -> io::Result<()> {
        #[repr(C)]
        struct IrqSet {
            argsz: u32,
            flags: u32,
            index: u32,
            start: u32,
            count: u32,
            fd: i32,
        }
        let (flags, count) = match trigger {
            Some(_) => (VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 1),
            None => (VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0),
        };
        let set = IrqSet {
            argsz: argsz::<IrqSet>(),
            flags,
            index: VFIO_PCI_MSI_IRQ_INDEX,
            start: 0,
            count,
            fd: trigger.map_or(-1, |e| e.as_raw_fd()),
        };
        // SAFETY: SET_IRQS reads a vfio_irq_set header followed by `count` eventfds; argsz
        // covers the header and the one fd.
        check(unsafe { ioctl_with_ref(&self.file, VFIO_DEVICE_SET_IRQS(), &set) })?;
        Ok(())
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Opens `bdf`'s cdev, binds it to `iommu` and attaches it to its IOAS.
pub fn open_bound(bdf: &str, iommu: &Iommu) -> io::Result<Device> {
    let file = open_cdev(bdf)?;
    bind(&file, iommu)?;
    attach(&file, iommu)?;
    Device::new(file)
}

/// Waits up to `ms` for `event` to fire; true if it did.
pub fn wait_event(event: &EventFd, ms: i32) -> bool {
    let mut poll = libc::pollfd {
        fd: event.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut poll, 1, ms) };
    ready > 0 && event.read().is_ok()
}
