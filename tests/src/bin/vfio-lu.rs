//! The kernel half's own tests: luvmm's VFIO live-update handler in the bed's kernel
//! (`tests/nested/patches/`), run inside L1 with two `edu` functions and a QEMU NVMe
//! controller bound to vfio-pci, and a second NVMe controller with SR-IOV. Every case prints
//! `LUVMM-L1 test vfio_lu_NAME ok` or `... FAIL why`, so each can be picked out alone. A case
//! that looks for a kernel log line looks only after a mark and for its own function.
//!
//! One L1 boot runs a chain of real kexecs; each stage runs in the kernel the previous one
//! loaded, with the handler mode that kernel was given (`vfio_pci.luvmm_lu`):
//! - `stage1` (`reset`): every preserve case without a kexec (a VF of the SR-IOV controller
//!   among them), the unbind refusal, the freeze refusal; then an `edu` and the NVMe
//!   controller (enabled, its admin queue in a preserved memfd) are preserved and the host
//!   kexecs into stage 2, in `keep`.
//! - `stage2` (`keep`): what a `reset` freeze left (the NVMe controller's decoding and Bus
//!   Master off, read from sysfs before anything opens it). Normal opens and the unbind
//!   refused, FINISH refused before the retrieve, the retrieved file unusable until bound;
//!   bound, attached and mapped at the same IOVA from the retrieved memfd, the `edu` does DMA
//!   and raises MSI; FINISH; normal opens work again. A refused kexec with the handler's
//!   `freeze-hold` fault: while the freezes hold, vfio-pci refuses to change the frozen
//!   devices. Then the same preparation, frozen in `keep`, with the retrieved memfd and NVMe
//!   file preserved again, the SR-IOV controller in a second session, and a kexec into stage
//!   3 (`reset`), whose init removes that controller and finds it again, so that the kernel's
//!   NVMe driver takes it.
//! - `stage3`: what a `keep` freeze left: the same checks, but the NVMe controller stayed in
//!   D0 unopened, kept Bus Master, survives a first bind that fails (the `enable` fault) and
//!   is still enabled with its admin queue registers unchanged, and a command on the old queue
//!   completes (so the files retrieved in stage 2 crossed a second kexec). The SR-IOV
//!   controller's retrieve fails with `ENODEV`, the NVMe driver lets it go, and the retrieve
//!   fails again once vfio-pci is bound. Then one `edu` is preserved and the host kexecs into
//!   stage 4, whose handler fails to register (the `register` fault).
//! - `stage4`: `/dev/liveupdate` fails with `EIO`, since a session holds a file no handler of
//!   this kernel knows (what a pre-flight must prevent), and the preserved `edu` opens the
//!   normal way: a handler that cannot start leaves nothing incoming.
//!
//! `edu` has no reset method, so only the NVMe controller (which has FLR) tells the modes
//! apart. `vfio-lu open BDF` prints what a normal open of a function's cdev gives, for the
//! bed's shell scenarios.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use luvmm::drill::bed::{self, InitrdFile};
use luvmm_devices::vfio::host::sysfs_dir;
use luvmm_liveupdate::luo::kexec::{self, KexecError};
use luvmm_liveupdate::luo::{IncomingSession, LiveUpdate, LuoError, OutgoingSession, SessionName};
use luvmm_tests::l1::{flag, line, Report};
use luvmm_tests::vfio_raw::{self, bind, open_bound, open_cdev, Device, Group, Iommu};
use vmm_sys_util::eventfd::EventFd;

/// Where the DMA memfd sits in every IOAS: below `edu`'s 28-bit DMA mask.
const IOVA: u64 = 0x10_0000;
const DMA_BYTES: u64 = 2 << 20;
/// The memfd's layout: `edu` source and destination, NVMe admin SQ, CQ, identify buffer.
const EDU_SRC: u64 = 0;
const EDU_DST: u64 = 0x1000;
const NVME_ASQ: u64 = 0x2000;
const NVME_ACQ: u64 = 0x3000;
const NVME_ID: u64 = 0x4000;
/// Admin queue depth, and the admin queue attributes it gives.
const NVME_QDEPTH: u32 = 8;
const NVME_AQA: u32 = (NVME_QDEPTH - 1) << 16 | (NVME_QDEPTH - 1);
/// The session carried across each kexec, and its tokens.
const SESSION: &str = "vfio-lu";
const TOKEN_MEMFD: u64 = 1;
const TOKEN_EDU: u64 = 2;
const TOKEN_NVME: u64 = 3;
const TOKEN_SPARE: u64 = 4;
const TOKEN_OTHER: u64 = 5;

/// `edu` registers (QEMU's `hw/misc/edu.c` interface).
const EDU_IRQ_STATUS: u64 = 0x24;
const EDU_IRQ_ACK: u64 = 0x64;
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_COUNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;
const EDU_BUFFER: u32 = 0x40000;
/// Bytes per DMA: half the device's 4 KiB buffer (QEMU aborts on a transfer that ends at its
/// last byte).
const EDU_BYTES: usize = 2048;
/// DMA command bits: start, to RAM, interrupt when done.
const EDU_CMD_START: u32 = 1;
const EDU_CMD_TO_RAM: u32 = 2;
const EDU_CMD_IRQ: u32 = 4;

/// NVMe controller registers.
const NVME_CAP: u64 = 0x0;
const NVME_CC: u64 = 0x14;
const NVME_CSTS: u64 = 0x1c;
const NVME_AQA_REG: u64 = 0x24;
const NVME_ASQ_REG: u64 = 0x28;
const NVME_ACQ_REG: u64 = 0x30;
/// PCI COMMAND bits: memory decode, Bus Master.
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;
/// CC: enable, 64-byte SQ entries, 16-byte CQ entries.
const NVME_CC_ENABLE: u32 = 1 | 6 << 16 | 4 << 20;

struct Bed {
    /// `edu` functions on the root bus, each a device set of its own.
    edu: Vec<String>,
    /// The two functions of one `edu` slot behind a PCIe root port: one device set, which a
    /// slot or bus reset resets whole.
    behind_bridge: Vec<String>,
    nvme: Option<String>,
    /// An NVMe PF with SR-IOV (QEMU's `sriov_max_vfs`), on vfio-pci or on no driver: the
    /// VF refusal's PF, and the device a retrieve finds unbound.
    sriov_pf: Option<String>,
}

impl Bed {
    fn find() -> Bed {
        let mut bed = Bed {
            edu: Vec::new(),
            behind_bridge: Vec::new(),
            nvme: None,
            sriov_pf: None,
        };
        let mut bdfs: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        bdfs.sort();
        for bdf in bdfs {
            let dir = sysfs_dir(&bdf);
            let id = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            // VFs come and go with the VF refusal; they are none of the bed's devices.
            if dir.join("physfn").exists() {
                continue;
            }
            let bound = on_vfio_pci(&bdf).is_ok();
            let sriov = id("sriov_totalvfs").parse::<u32>().is_ok_and(|n| n > 0);
            match (id("vendor").as_str(), id("device").as_str()) {
                ("0x1234", "0x11e8") if bound && bdf.starts_with("0000:00:") => bed.edu.push(bdf),
                ("0x1234", "0x11e8") if bound => bed.behind_bridge.push(bdf),
                ("0x1b36", "0x0010") if sriov => bed.sriov_pf = Some(bdf),
                ("0x1b36", "0x0010") if bound => bed.nvme = Some(bdf),
                _ => {}
            }
        }
        bed
    }
}

/// Ok when vfio-pci drives `bdf`; otherwise the driver it is on, or why there is none.
fn on_vfio_pci(bdf: &str) -> Result<(), String> {
    let driver = std::fs::read_link(sysfs_dir(bdf).join("driver"))
        .map_err(|e| format!("{bdf} has no driver: {e}"))?;
    if driver.ends_with("vfio-pci") {
        Ok(())
    } else {
        Err(format!("{bdf} is on {}", driver.display()))
    }
}

/// The function's COMMAND register, read through sysfs, which opens no VFIO file.
fn sysfs_command(bdf: &str) -> Result<u16, String> {
    let config = File::open(sysfs_dir(bdf).join("config")).map_err(io_err("sysfs config"))?;
    let mut word = [0u8; 2];
    config
        .read_exact_at(&mut word, 4)
        .map_err(io_err("read COMMAND"))?;
    Ok(u16::from_le_bytes(word))
}

/// The function's PCI power state and its runtime PM status, as sysfs tells them (neither
/// read wakes it).
fn sysfs_power(bdf: &str) -> Result<(String, String), String> {
    let read = |f: &str| {
        std::fs::read_to_string(sysfs_dir(bdf).join(f))
            .map(|s| s.trim().to_string())
            .map_err(io_err("sysfs power"))
    };
    Ok((read("power_state")?, read("power/runtime_status")?))
}

fn name(s: &str) -> SessionName {
    SessionName::new(s).expect("the test's session names are valid")
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// `result` must be the error `errno`.
fn expect_errno<T>(what: &str, result: io::Result<T>, errno: i32) -> Result<(), String> {
    match result {
        Ok(_) => Err(format!("{what}: succeeded, expected errno {errno}")),
        Err(e) if errno_of(&e) == errno => Ok(()),
        Err(e) => Err(format!("{what}: {e}, expected errno {errno}")),
    }
}

fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn luo_err(what: &str) -> impl Fn(LuoError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Asks the handler for one of its faults for the bed's tests (`vfio_pci.luvmm_lu_fault`).
fn set_fault(fault: &str) -> Result<(), String> {
    std::fs::write("/sys/module/vfio_pci/parameters/luvmm_lu_fault", fault)
        .map_err(io_err("luvmm_lu_fault"))
}

/// Where the kernel's log stood (its last record's timestamp): a check reads only what the
/// kernel logged after it, about one function, so neither a line from before (host-check's
/// probe logs the same messages) nor one about another device can pass it.
struct LogMark(f64);

/// The kernel's log records, each with its timestamp in seconds.
fn kernel_log() -> Result<Vec<(f64, String)>, String> {
    let out = std::process::Command::new("dmesg")
        .output()
        .map_err(io_err("dmesg"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (ts, msg) = l.strip_prefix('[')?.split_once(']')?;
            Some((ts.trim().parse().ok()?, msg.trim().to_string()))
        })
        .collect())
}

impl LogMark {
    fn now() -> Result<LogMark, String> {
        Ok(LogMark(kernel_log()?.last().map_or(0.0, |(ts, _)| *ts)))
    }

    /// Since the mark, the kernel logged `needle` about function `bdf`.
    fn logged(&self, bdf: &str, needle: &str) -> Result<(), String> {
        if kernel_log()?
            .iter()
            .any(|(ts, msg)| *ts > self.0 && msg.contains(bdf) && msg.contains(needle))
        {
            Ok(())
        } else {
            Err(format!("the kernel did not log {needle:?} about {bdf}"))
        }
    }
}

fn memfd(label: &str) -> Result<File, String> {
    let cname = std::ffi::CString::new(label).map_err(|e| e.to_string())?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", io::Error::last_os_error()));
    }
    // SAFETY: the fd was just created and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(DMA_BYTES).map_err(io_err("ftruncate"))?;
    Ok(file)
}

fn pattern(seed: u64) -> Vec<u8> {
    (0..EDU_BYTES as u64 / 8)
        .flat_map(|i| (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes())
        .collect()
}

fn poll_until(what: &str, mut done: impl FnMut() -> io::Result<bool>) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if done().map_err(io_err(what))? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("{what}: timed out"))
}

/// One `edu` DMA round trip through the IOMMU: RAM to the device's buffer and back to another
/// page of RAM, the second with an interrupt, which must arrive as MSI on `msi`.
fn edu_round_trip(edu: &Device, ram: &File, msi: &EventFd, seed: u64) -> Result<(), String> {
    let sent = pattern(seed);
    ram.write_all_at(&sent, EDU_SRC).map_err(io_err("fill"))?;
    ram.write_all_at(&[0u8; EDU_BYTES], EDU_DST)
        .map_err(io_err("clear"))?;
    // Only the low halves of the DMA registers are written: every value is below edu's mask.
    let low = |value: u64| {
        u32::try_from(value).map_err(|_| format!("{value:#x} is beyond edu's DMA registers"))
    };
    let dma = |src: u64, dst: u64, cmd: u32| -> Result<(), String> {
        let (src, dst, count) = (low(src)?, low(dst)?, low(EDU_BYTES as u64)?);
        edu.write32(EDU_DMA_SRC, src)
            .and_then(|_| edu.write32(EDU_DMA_DST, dst))
            .and_then(|_| edu.write32(EDU_DMA_COUNT, count))
            .and_then(|_| edu.write32(EDU_DMA_CMD, cmd))
            .map_err(io_err("program the DMA"))?;
        poll_until("DMA", || Ok(edu.read32(EDU_DMA_CMD)? & EDU_CMD_START == 0))
    };
    dma(IOVA + EDU_SRC, u64::from(EDU_BUFFER), EDU_CMD_START)?;
    dma(
        u64::from(EDU_BUFFER),
        IOVA + EDU_DST,
        EDU_CMD_START | EDU_CMD_TO_RAM | EDU_CMD_IRQ,
    )?;
    let interrupted = vfio_raw::wait_event(msi, 5000);
    let status = edu.read32(EDU_IRQ_STATUS).map_err(io_err("IRQ status"))?;
    edu.write32(EDU_IRQ_ACK, status)
        .map_err(io_err("IRQ ack"))?;
    let mut back = vec![0u8; EDU_BYTES];
    ram.read_exact_at(&mut back, EDU_DST)
        .map_err(io_err("read back"))?;
    if back != sent {
        return Err("the bytes DMA'd back differ from those sent".into());
    }
    if !interrupted {
        return Err(format!("no MSI within 5 s (edu IRQ status {status:#x})"));
    }
    Ok(())
}

/// Disables, programs the admin queue at the memfd's IOVAs, and enables the controller.
fn nvme_enable(nvme: &Device, ram: &File) -> Result<(), String> {
    nvme.write32(NVME_CC, 0).map_err(io_err("CC"))?;
    // Empty queues, as a driver starts them: a memfd a session gave back still holds the last
    // kernel's completions, whose phase bits would read as new ones.
    ram.write_all_at(&[0u8; 0x2000], NVME_ASQ)
        .map_err(io_err("clear the admin queues"))?;
    poll_until("CSTS.RDY=0", || Ok(nvme.read32(NVME_CSTS)? & 1 == 0))?;
    nvme.write32(NVME_AQA_REG, NVME_AQA)
        .and_then(|_| nvme.write64(NVME_ASQ_REG, IOVA + NVME_ASQ))
        .and_then(|_| nvme.write64(NVME_ACQ_REG, IOVA + NVME_ACQ))
        .and_then(|_| nvme.write32(NVME_CC, NVME_CC_ENABLE))
        .map_err(io_err("program the admin queue"))?;
    poll_until("CSTS.RDY=1", || Ok(nvme.read32(NVME_CSTS)? & 1 == 1))
}

/// Identify Controller in admin SQ slot `slot`; its completion must come in CQ slot `slot`
/// with phase 1 and success, and the data must carry QEMU's PCI vendor id.
fn nvme_identify(nvme: &Device, ram: &File, slot: u32) -> Result<(), String> {
    let cid = slot + 1;
    let mut entry = [0u8; 64];
    entry[0..4].copy_from_slice(&(0x06 | cid << 16).to_le_bytes());
    entry[24..32].copy_from_slice(&(IOVA + NVME_ID).to_le_bytes());
    entry[40..44].copy_from_slice(&1u32.to_le_bytes());
    ram.write_all_at(&[0u8; 4096], NVME_ID)
        .map_err(io_err("clear"))?;
    ram.write_all_at(&entry, NVME_ASQ + u64::from(slot) * 64)
        .map_err(io_err("SQ entry"))?;
    let stride = 4u64 << ((nvme.read64(NVME_CAP).map_err(io_err("CAP"))? >> 32) & 0xf);
    nvme.write32(0x1000, slot + 1)
        .map_err(io_err("SQ doorbell"))?;
    let completion = NVME_ACQ + u64::from(slot) * 16;
    let mut dw3 = 0u32;
    poll_until("the completion", || {
        let mut b = [0u8; 4];
        ram.read_exact_at(&mut b, completion + 12)?;
        dw3 = u32::from_le_bytes(b);
        Ok(dw3 & 1 << 16 != 0)
    })?;
    nvme.write32(0x1000 + stride, slot + 1)
        .map_err(io_err("CQ doorbell"))?;
    if dw3 & 0xffff != cid || dw3 >> 17 != 0 {
        return Err(format!("completion dw3 {dw3:#x} for command {cid}"));
    }
    let mut vid = [0u8; 2];
    ram.read_exact_at(&mut vid, NVME_ID)
        .map_err(io_err("identify data"))?;
    if u16::from_le_bytes(vid) != 0x1b36 {
        return Err(format!(
            "identify data: vendor {:#x}",
            u16::from_le_bytes(vid)
        ));
    }
    Ok(())
}

/// The NVMe registers that tell a reset controller from a kept one.
#[derive(Debug, PartialEq)]
struct NvmeRegs {
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
}

fn nvme_regs(nvme: &Device) -> io::Result<NvmeRegs> {
    Ok(NvmeRegs {
        cc: nvme.read32(NVME_CC)?,
        csts: nvme.read32(NVME_CSTS)?,
        aqa: nvme.read32(NVME_AQA_REG)?,
        asq: nvme.read64(NVME_ASQ_REG)?,
        acq: nvme.read64(NVME_ACQ_REG)?,
    })
}

/// The next kernel's initramfs: the bed's stage image with `/boot` (the kernel and the stage
/// image itself) added again, so that every kernel of the chain can kexec once more.
fn next_initrd(kernel: &Path, stage_image: &Path) -> Result<PathBuf, String> {
    let base = bed::read(stage_image).map_err(|e| e.to_string())?;
    let kernel_image = bed::read(kernel).map_err(|e| e.to_string())?;
    let files = [
        InitrdFile {
            path: "/boot/bzImage",
            mode: 0o644,
            data: &kernel_image,
        },
        InitrdFile {
            path: "/boot/initrd-stage2.cpio.gz",
            mode: 0o644,
            data: &base,
        },
    ];
    let next = PathBuf::from("/tmp/vfio-lu-next-initrd");
    bed::extend_initrd(&base, &files)
        .and_then(|image| bed::write(&next, &image))
        .map_err(|e| e.to_string())?;
    Ok(next)
}

fn kexec_into(kernel: &Path, stage_image: &Path, words: &str) -> Result<(), String> {
    let cmdline = kexec::current_cmdline_with(words).map_err(|e| e.to_string())?;
    let initrd = next_initrd(kernel, stage_image)?;
    kexec::load(kernel, Some(&initrd), Some(&cmdline)).map_err(|e| format!("load: {e}"))?;
    line(&format!("kexec {words}"));
    match kexec::reboot_into_loaded() {
        Ok(never) => match never {},
        Err(e) => Err(format!("reboot: {e}")),
    }
}

/// PRESERVE_FD of `fd` must find no handler (`ENOENT`).
fn not_preservable(
    session: &OutgoingSession,
    what: &str,
    fd: BorrowedFd<'_>,
    token: u64,
) -> Result<(), String> {
    match session.preserve(fd, token) {
        Err(LuoError::NotPreservable { .. }) => Ok(()),
        other => Err(format!("{what}: {other:?}, expected ENOENT")),
    }
}

/// Every preserve case without a kexec, the unbind refusal, and unpreserve on close.
fn without_kexec(report: &mut Report, luo: &LiveUpdate, a: &str) -> Result<(), String> {
    // The group path first: a group-opened device cannot be bound as a cdev meanwhile.
    let session = luo
        .create_session(&name("vfio-lu-checks"))
        .map_err(luo_err("create"))?;
    let group = Group::open(a).map_err(io_err("group"))?;
    report.check(
        "preserve_group_enoent",
        not_preservable(&session, "group fd", group.group.as_fd(), 10),
    );
    report.check(
        "preserve_container_enoent",
        not_preservable(&session, "container fd", group.container.as_fd(), 11),
    );
    match group.device(a) {
        Ok(device) => report.check(
            "preserve_group_device_enoent",
            not_preservable(&session, "group-obtained device fd", device.as_fd(), 12),
        ),
        Err(e) => report.check(
            "preserve_group_device_enoent",
            Err(format!("GET_DEVICE_FD: {e}")),
        ),
    }
    drop(group);

    let unbound = open_cdev(a).map_err(io_err("cdev"))?;
    report.check(
        "preserve_unbound_enoent",
        not_preservable(&session, "unbound cdev", unbound.as_fd(), 13),
    );
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    bind(&unbound, &iommu).map_err(io_err("bind"))?;
    let bound = unbound;
    let mark = LogMark::now()?;
    report.check(
        "preserve_bound",
        session
            .preserve(bound.as_fd(), 14)
            .map_err(luo_err("bound cdev"))
            .and_then(|_| {
                mark.logged(a, "luvmm-lu: will be preserved across the next live update")
            }),
    );
    report.check(
        "preserve_twice_ebusy",
        match session.preserve(bound.as_fd(), 15) {
            Err(LuoError::AlreadyPreserved { .. }) => Ok(()),
            other => Err(format!("second preserve: {other:?}, expected EBUSY")),
        },
    );

    let unbind = |bdf: &str| std::fs::write("/sys/bus/pci/drivers/vfio-pci/unbind", bdf);
    report.check(
        "unbind_refused_while_preserved",
        expect_errno("unbind", unbind(a), libc::EBUSY).and_then(|_| {
            if sysfs_dir(a).join("driver").exists() {
                Ok(())
            } else {
                Err("unbound anyway".into())
            }
        }),
    );
    let mark = LogMark::now()?;
    session.cancel();
    report.check(
        "unpreserved_on_close",
        mark.logged(a, "luvmm-lu: no longer preserved")
            .and_then(|_| {
                let again = luo
                    .create_session(&name("vfio-lu-again"))
                    .map_err(luo_err("create"))?;
                again
                    .preserve(bound.as_fd(), 16)
                    .map_err(luo_err("preserve after the close"))?;
                again.cancel();
                Ok(())
            }),
    );
    drop(bound);
    report.check(
        "unbind_after_close",
        unbind(a)
            .map_err(io_err("unbind"))
            .and_then(|_| std::fs::write("/sys/bus/pci/drivers_probe", a).map_err(io_err("probe")))
            .and_then(|_| on_vfio_pci(a)),
    );
    Ok(())
}

/// The SR-IOV VF token the PF sets and its VF shows; any value does, both sides are ours.
const VF_TOKEN: [u8; 16] = *b"luvmm-vfio-lu-vf";

/// A VF is refused (`ENOENT`) though bound and attached like any accepted device, while its
/// PF, in the same session, is accepted. The VF is created and removed here.
fn vf_refusal(report: &mut Report, luo: &LiveUpdate, pf: &str) -> Result<(), String> {
    std::fs::write("/sys/module/vfio_pci/parameters/enable_sriov", "1")
        .map_err(io_err("vfio_pci enable_sriov"))?;
    let numvfs = sysfs_dir(pf).join("sriov_numvfs");
    std::fs::write(&numvfs, "1").map_err(io_err("sriov_numvfs=1"))?;
    let refused = vf_preserve_refused(luo, pf);
    let removed = std::fs::write(&numvfs, "0").map_err(io_err("sriov_numvfs=0"));
    report.check("preserve_vf_enoent", refused.and(removed));
    Ok(())
}

fn vf_preserve_refused(luo: &LiveUpdate, pf: &str) -> Result<(), String> {
    let vf = std::fs::read_link(sysfs_dir(pf).join("virtfn0")).map_err(io_err("virtfn0"))?;
    let vf = vf
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("virtfn0 names no function")?
        .to_string();
    // vfio-pci hands the VFs of its PFs to itself.
    on_vfio_pci(&vf)?;
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    let pf_file = open_cdev(pf).map_err(io_err("PF cdev"))?;
    vfio_raw::bind_with_vf_token(&pf_file, &iommu, &VF_TOKEN).map_err(io_err("bind the PF"))?;
    let vf_file = open_cdev(&vf).map_err(io_err("VF cdev"))?;
    vfio_raw::bind_with_vf_token(&vf_file, &iommu, &VF_TOKEN)
        .and_then(|_| vfio_raw::attach(&vf_file, &iommu))
        .map_err(io_err("bind and attach the VF"))?;
    let session = luo
        .create_session(&name("vfio-lu-vf"))
        .map_err(luo_err("create"))?;
    session
        .preserve(pf_file.as_fd(), 1)
        .map_err(luo_err("preserve the PF"))?;
    not_preservable(&session, &format!("VF {vf}"), vf_file.as_fd(), 2)?;
    session.cancel();
    Ok(())
}

/// The session that holds the SR-IOV PF across the second kexec, which the next kernel's
/// init moves to the NVMe driver (`luvmm.nobind=`).
const SPARE_SESSION: &str = "vfio-lu-unbound";
/// The session that holds the first function behind the root port across the first kexec.
const SIBLING_SESSION: &str = "vfio-lu-sibling";

/// Preserves `bdf` (bound, idle) as `token` in a session of its own, named `session`; the
/// session must stay open until the kexec.
fn preserve_alone(
    luo: &LiveUpdate,
    bdf: &str,
    (session, token): (&str, u64),
) -> Result<(OutgoingSession, Device, Iommu), String> {
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    let device = open_bound(bdf, &iommu).map_err(io_err("open"))?;
    let session = luo
        .create_session(&name(session))
        .map_err(luo_err("create"))?;
    session
        .preserve(device.fd(), token)
        .map_err(luo_err("preserve"))?;
    Ok((session, device, iommu))
}

/// Nothing resets an incoming function before its retrieve: not a hot reset of its device set
/// through its sibling (the two functions behind the root port share a slot), not a secondary
/// bus reset of the root port above it, not a sysfs reset of the incoming NVMe controller
/// (which has FLR). Then the sibling session is retrieved and finished, as a VMM would.
fn no_reset_while_incoming(
    report: &mut Report,
    luo: &LiveUpdate,
    (kept, sibling): (&str, &str),
    nvme: &str,
) -> Result<(), String> {
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    let other = open_bound(sibling, &iommu).map_err(io_err("open the sibling"))?;
    report.check(
        "sibling_hot_reset_ebusy",
        expect_errno("HOT_RESET", vfio_raw::hot_reset(&other.file), libc::EBUSY),
    );
    drop(other);
    drop(iommu);
    let bridge = std::fs::canonicalize(sysfs_dir(kept))
        .map_err(io_err("sysfs"))?
        .parent()
        .map(|p| p.join("reset_subordinate"))
        .ok_or("no bridge above the sibling")?;
    report.check(
        "bridge_reset_ebusy",
        expect_errno(
            "reset_subordinate",
            std::fs::write(&bridge, "1"),
            libc::EBUSY,
        ),
    );
    report.check(
        "sysfs_reset_ebusy",
        expect_errno(
            "reset",
            std::fs::write(sysfs_dir(nvme).join("reset"), "1"),
            libc::EBUSY,
        ),
    );
    let session = luo
        .retrieve_session(&name(SIBLING_SESSION))
        .map_err(luo_err("retrieve the sibling session"))?;
    let file = File::from(session.retrieve(1).map_err(luo_err("sibling"))?);
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    vfio_raw::bind(&file, &iommu).map_err(io_err("bind the sibling"))?;
    session
        .finish()
        .map_err(luo_err("FINISH the sibling session"))
}

/// A retrieve of a device that vfio-pci does not drive (the init removed it and found it again,
/// so the kernel's NVMe driver took it) fails with `ENODEV`, and keeps failing once vfio-pci
/// is bound (LUO's rule): the device stays incoming and FINISH stays refused. The other
/// driver may let go of it: only vfio-pci is held to an incoming device.
fn unbound_retrieve(
    report: &mut Report,
    luo: &LiveUpdate,
    (pf, other): (&str, &str),
) -> Result<(), String> {
    let session = luo
        .retrieve_session(&name(SPARE_SESSION))
        .map_err(luo_err("retrieve the session"))?;
    report.check(
        "retrieve_another_function_enodev",
        another_function(&session, other),
    );
    let enodev = |what: &str| retrieve_enodev(&session, TOKEN_SPARE, what);
    let driver = sysfs_dir(pf).join("driver");
    let mark = LogMark::now()?;
    report.check(
        "retrieve_unbound_enodev",
        if on_vfio_pci(pf).is_ok() {
            Err(format!("{pf} is on vfio-pci"))
        } else {
            enodev("retrieve off vfio-pci")
                .and_then(|_| mark.logged(pf, "luvmm-lu: cannot retrieve: not bound to vfio-pci"))
        },
    );
    report.check(
        "unbind_from_another_driver",
        if driver.exists() {
            std::fs::write(driver.join("unbind"), pf).map_err(io_err("unbind"))
        } else {
            Ok(())
        },
    );
    std::fs::write(sysfs_dir(pf).join("driver_override"), "vfio-pci")
        .and_then(|_| std::fs::write("/sys/bus/pci/drivers_probe", pf))
        .map_err(io_err("bind vfio-pci"))?;
    report.check(
        "failed_retrieve_stays_failed",
        on_vfio_pci(pf).and_then(|_| enodev("retrieve once on vfio-pci")),
    );
    report.check(
        "failed_retrieve_still_incoming",
        expect_errno("cdev open", open_cdev(pf), libc::EBUSY),
    );
    report.check(
        "finish_after_failed_retrieve_ebusy",
        match session.finish() {
            Err(LuoError::FinishBusy { .. }) => Ok(()),
            other => Err(format!("FINISH: {other:?}, expected EBUSY")),
        },
    );
    Ok(())
}

/// A retrieve of `token` that must fail with `ENODEV`.
fn retrieve_enodev(session: &IncomingSession, token: u64, what: &str) -> Result<(), String> {
    match session.retrieve(token) {
        Err(LuoError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
            Ok(())
        }
        other => Err(format!("{what}: {:?}, expected ENODEV", other.map(|_| ()))),
    }
}

/// The handler's `ids` fault gives the incoming entry at `bdf`'s address another device ID,
/// as if another function had taken the preserved one's place across the kexec: its retrieve
/// must fail (`ENODEV`, said in the kernel log for that function), and the function found
/// there is no longer held back from a normal open.
fn another_function(session: &IncomingSession, bdf: &str) -> Result<(), String> {
    expect_errno("cdev open while incoming", open_cdev(bdf), libc::EBUSY)?;
    let mark = LogMark::now()?;
    set_fault("ids")?;
    let refused = retrieve_enodev(session, TOKEN_OTHER, "retrieve with another device ID");
    set_fault("none")?;
    refused?;
    mark.logged(
        bdf,
        "luvmm-lu: cannot retrieve: not the function that was preserved",
    )?;
    open_cdev(bdf)
        .map(|_| ())
        .map_err(io_err("a normal open of the other function"))
}

/// Loads the next kernel and asks for the kexec, which a preserved file's freeze must refuse
/// (`EINVAL`); should it go through anyway, the next kernel boots into a stage that fails.
fn reboot_refused(kernel: &Path, initrd: &Path) -> Result<Result<(), String>, String> {
    let cmdline =
        kexec::current_cmdline_with("luvmm.stage=unexpected").map_err(|e| e.to_string())?;
    kexec::load(kernel, Some(initrd), Some(&cmdline)).map_err(|e| format!("load: {e}"))?;
    Ok(match kexec::reboot_into_loaded() {
        Ok(never) => match never {},
        Err(KexecError::Failed { source, .. }) if errno_of(&source) == libc::EINVAL => Ok(()),
        Err(e) => Err(format!("reboot: {e}, expected EINVAL")),
    })
}

/// `reboot()` fails while a preserved device still has MSI on; in `reset` mode the device
/// frozen before it (freeze runs in preservation order) is left giving EIO.
fn freeze_refusal(
    report: &mut Report,
    luo: &LiveUpdate,
    (a, b): (&str, &str),
    (kernel, initrd): (&Path, &Path),
) -> Result<(), String> {
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    let healthy = open_bound(a, &iommu).map_err(io_err("open a"))?;
    let noisy = open_bound(b, &iommu).map_err(io_err("open b"))?;
    let msi = EventFd::new(0).map_err(io_err("eventfd"))?;
    noisy.set_msi(Some(&msi)).map_err(io_err("MSI on"))?;
    let session = luo
        .create_session(&name("vfio-lu-freeze"))
        .map_err(luo_err("create"))?;
    session
        .preserve(healthy.fd(), 1)
        .and_then(|_| session.preserve(noisy.fd(), 2))
        .map_err(luo_err("preserve"))?;
    let mark = LogMark::now()?;
    let refused = reboot_refused(kernel, initrd)?;
    report.check(
        "freeze_refused_with_msi",
        refused
            .and_then(|_| mark.logged(b, "luvmm-lu: cannot freeze: a VFIO interrupt is enabled")),
    );
    report.check(
        "frozen_device_gives_eio",
        expect_errno("GET_INFO", vfio_raw::info(&healthy.file), libc::EIO)
            .and_then(|_| expect_errno("BAR read", healthy.read32(0), libc::EIO)),
    );
    report.check(
        "unfrozen_device_works",
        vfio_raw::info(&noisy.file)
            .map(|_| ())
            .map_err(io_err("GET_INFO of the device whose freeze failed")),
    );
    noisy.set_msi(None).map_err(io_err("MSI off"))?;
    session.cancel();
    kexec::unload().map_err(|e| e.to_string())?;
    // The frozen file still closes: release is never gated.
    drop(healthy);
    drop(noisy);
    report.check(
        "reopen_after_failed_kexec",
        open_bound(a, &Iommu::new().map_err(io_err("iommufd"))?)
            .and_then(|d| vfio_raw::info(&d.file))
            .map(|_| ())
            .map_err(io_err("open the reset device again")),
    );
    Ok(())
}

/// `reboot()` fails while a preserved device is out of D0 (here the NVMe controller, put in
/// D3hot through its PM capability); back in D0 and unpreserved, it works.
fn freeze_refusal_d3(
    report: &mut Report,
    luo: &LiveUpdate,
    nvme: &str,
    (kernel, initrd): (&Path, &Path),
) -> Result<(), String> {
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    let n = open_bound(nvme, &iommu).map_err(io_err("open NVMe"))?;
    n.set_d3hot(true).map_err(io_err("D3hot"))?;
    let session = luo
        .create_session(&name("vfio-lu-d3"))
        .map_err(luo_err("create"))?;
    session.preserve(n.fd(), 1).map_err(luo_err("preserve"))?;
    let mark = LogMark::now()?;
    let refused = reboot_refused(kernel, initrd)?;
    report.check(
        "freeze_refused_out_of_d0",
        refused.and_then(|_| mark.logged(nvme, "luvmm-lu: cannot freeze: not in D0")),
    );
    session.cancel();
    kexec::unload().map_err(|e| e.to_string())?;
    n.set_d3hot(false).map_err(io_err("D0"))?;
    Ok(())
}

/// In `keep` mode a frozen device stays as the freeze checked it until the kexec or the
/// unfreeze. The handler's `freeze-hold` fault holds each freeze that succeeds for three
/// seconds with the locks let go, the window in which another thread used to get through:
/// there, with an `edu` and the NVMe controller frozen, vfio-pci must refuse MSI, a COMMAND
/// write, a reset and D3hot. A third device with MSI on then refuses the kexec, and after the
/// unfreeze the `edu` takes MSI again.
fn frozen_refusals(
    report: &mut Report,
    luo: &LiveUpdate,
    (a, b): (&str, &str),
    (nvme, n): (&str, &Device),
    (kernel, initrd): (&Path, &Path),
) -> Result<(), String> {
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    let held = open_bound(b, &iommu).map_err(io_err("open b"))?;
    let noisy = open_bound(a, &iommu).map_err(io_err("open a"))?;
    let msi = EventFd::new(0).map_err(io_err("eventfd"))?;
    noisy.set_msi(Some(&msi)).map_err(io_err("MSI on"))?;
    let session = luo
        .create_session(&name("vfio-lu-hold"))
        .map_err(luo_err("create"))?;
    session
        .preserve(held.fd(), 1)
        .and_then(|_| session.preserve(n.fd(), 2))
        .and_then(|_| session.preserve(noisy.fd(), 3))
        .map_err(luo_err("preserve"))?;
    set_fault("freeze-hold")?;
    let mark = LogMark::now()?;
    let (refused, tried) = std::thread::scope(|s| {
        let tried = s.spawn(|| try_while_frozen(&mark, (b, &held), (nvme, n)));
        let refused = reboot_refused(kernel, initrd);
        (refused, tried.join())
    });
    set_fault("none")?;
    let tried = tried.unwrap_or_else(|_| Err("the thread that tried panicked".into()));
    report.check("frozen_refuses_changes", refused?.and(tried));
    report.check(
        "unfrozen_accepts_changes",
        held.set_msi(Some(&msi))
            .and_then(|_| held.set_msi(None))
            .and_then(|_| n.set_d3hot(false))
            .map_err(io_err("after the unfreeze")),
    );
    noisy.set_msi(None).map_err(io_err("MSI off"))?;
    session.cancel();
    kexec::unload().map_err(|e| e.to_string())
}

/// Once the NVMe controller's freeze holds (the `edu`'s came before it), everything that would
/// change either device must fail.
fn try_while_frozen(
    mark: &LogMark,
    (b, held): (&str, &Device),
    (nvme, n): (&str, &Device),
) -> Result<(), String> {
    poll_until("the NVMe controller's freeze", || {
        Ok(mark.logged(nvme, "luvmm-lu: frozen; held").is_ok())
    })?;
    mark.logged(b, "luvmm-lu: frozen; held")?;
    let msi = EventFd::new(0).map_err(io_err("eventfd"))?;
    expect_errno(
        "edu SET_IRQS (MSI on)",
        held.set_msi(Some(&msi)),
        libc::EBUSY,
    )?;
    expect_errno("edu COMMAND write", held.enable_dma(), libc::EBUSY)?;
    expect_errno("NVMe DEVICE_RESET", n.reset(), libc::EBUSY)?;
    // A PM control write is taken, but the power state must not change.
    n.set_d3hot(true).map_err(io_err("NVMe PM control"))?;
    match sysfs_power(nvme)? {
        (state, _) if state == "D0" => Ok(()),
        (state, _) => Err(format!("the frozen NVMe controller went to {state}")),
    }
}

/// An enable of a kept function that fails (the handler's `enable` fault, on the first bind)
/// leaves it adopted and running: Bus Master still on, and the next bind adopts it without a
/// reset, which `keep_mode_nvme_enabled` then checks.
fn failed_enable(bdf: &str, file: &File, iommu: &Iommu) -> Result<(), String> {
    set_fault("enable")?;
    let first = vfio_raw::bind(file, iommu);
    set_fault("none")?;
    expect_errno("the first bind", first, libc::EIO)?;
    match sysfs_command(bdf)? {
        c if c & PCI_COMMAND_MASTER != 0 => Ok(()),
        c => Err(format!(
            "COMMAND {c:#x} after the failed enable: Bus Master off"
        )),
    }
}

/// The handler failed to register at boot (its `register` fault): what the previous kernel
/// preserved is this kernel's like any other function, not gated.
fn nothing_incoming(bdf: &str) -> Result<(), String> {
    if !kernel_log()?
        .iter()
        .any(|(_, msg)| msg.contains("luvmm-lu: cannot register: -EIO"))
    {
        return Err("the kernel did not log the failed registration".into());
    }
    open_cdev(bdf)
        .map(|_| ())
        .map_err(io_err("a normal open of the preserved edu"))
}

/// The DMA memfd, the iommufd it is mapped in at `IOVA` and the NVMe controller bound to it.
struct DmaBed {
    ram: File,
    iommu: Iommu,
    nvme: Device,
}

impl DmaBed {
    fn open(nvme: &str) -> Result<DmaBed, String> {
        let iommu = Iommu::new().map_err(io_err("iommufd"))?;
        let ram = memfd("vfio-lu-dma")?;
        iommu
            .map_file(ram.as_fd(), IOVA, DMA_BYTES)
            .map_err(io_err("MAP_FILE"))?;
        let nvme = open_bound(nvme, &iommu).map_err(io_err("open NVMe"))?;
        Ok(DmaBed { ram, iommu, nvme })
    }
}

/// Brings an `edu` and the NVMe controller of `bed` up (DMA and MSI through the `edu`, an
/// admin command on the NVMe), quiesces their interrupts, preserves the DMA memfd and both in
/// `SESSION`, and kexecs with `words` added to the command line. Returns only on failure.
fn prepare_and_kexec(
    luo: &LiveUpdate,
    edu: &str,
    bed: DmaBed,
    seed: u64,
    (kernel, initrd, words): (&Path, &Path, &str),
) -> Result<(), String> {
    let DmaBed {
        ram,
        iommu,
        nvme: n,
    } = bed;
    let e = open_bound(edu, &iommu).map_err(io_err("open edu"))?;
    e.enable_dma().map_err(io_err("edu COMMAND"))?;
    let msi = EventFd::new(0).map_err(io_err("eventfd"))?;
    e.set_msi(Some(&msi)).map_err(io_err("edu MSI"))?;
    edu_round_trip(&e, &ram, &msi, seed)?;
    e.set_msi(None).map_err(io_err("edu MSI off"))?;
    n.enable_dma().map_err(io_err("NVMe COMMAND"))?;
    nvme_enable(&n, &ram)?;
    nvme_identify(&n, &ram, 0)?;
    let regs = nvme_regs(&n).map_err(io_err("NVMe registers"))?;
    line(&format!("nvme before kexec {regs:?}"));
    let session = luo
        .create_session(&name(SESSION))
        .map_err(luo_err("create"))?;
    session
        .preserve(ram.as_fd(), TOKEN_MEMFD)
        .and_then(|_| session.preserve(e.fd(), TOKEN_EDU))
        .and_then(|_| session.preserve(n.fd(), TOKEN_NVME))
        .map_err(luo_err("preserve"))?;
    kexec_into(kernel, initrd, words)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Frozen {
    Reset,
    Keep,
}

/// What the previous kernel's freeze left, and the session's whole way back. Returns the
/// retrieved DMA memfd, the iommufd and the retrieved NVMe controller, for a next update to
/// preserve again as a VMM does.
fn after_kexec(
    report: &mut Report,
    luo: &LiveUpdate,
    bed: (&str, &str),
    frozen: Frozen,
) -> Result<DmaBed, String> {
    let (edu, nvme) = bed;
    // The controller's power state first: a config read would bring it back to D0.
    let power = sysfs_power(nvme);
    line(&format!(
        "nvme power before the retrieve ({frozen:?}) {power:?}"
    ));
    if frozen == Frozen::Keep {
        report.check(
            "keep_mode_held_in_d0",
            match &power {
                Ok((state, runtime)) if state == "D0" && runtime == "active" => Ok(()),
                other => Err(format!("unopened, the kept controller is {other:?}")),
            },
        );
    }
    // What the freeze left, read before anything in this kernel opens the controller (the
    // bind of a device that was not kept resets it anyway).
    let command = sysfs_command(nvme);
    line(&format!(
        "nvme COMMAND before the retrieve ({frozen:?}) {command:?}"
    ));
    report.check(
        "cdev_open_ebusy",
        expect_errno("edu cdev", open_cdev(edu), libc::EBUSY)
            .and_then(|_| expect_errno("NVMe cdev", open_cdev(nvme), libc::EBUSY)),
    );
    report.check(
        "group_get_device_fd_ebusy",
        Group::open(edu)
            .map_err(io_err("group"))
            .and_then(|g| expect_errno("GET_DEVICE_FD", g.device(edu), libc::EBUSY)),
    );
    report.check(
        "unbind_refused_while_incoming",
        expect_errno(
            "unbind",
            std::fs::write("/sys/bus/pci/drivers/vfio-pci/unbind", nvme),
            libc::EBUSY,
        )
        .and_then(|_| on_vfio_pci(nvme)),
    );
    let session = luo
        .retrieve_session(&name(SESSION))
        .map_err(luo_err("retrieve the session"))?;
    report.check(
        "finish_before_retrieve_ebusy",
        match session.finish() {
            Err(LuoError::FinishBusy { .. }) => Ok(()),
            other => Err(format!("FINISH: {other:?}, expected EBUSY")),
        },
    );
    let ram = File::from(session.retrieve(TOKEN_MEMFD).map_err(luo_err("memfd"))?);
    let edu_file = File::from(session.retrieve(TOKEN_EDU).map_err(luo_err("edu"))?);
    report.check(
        "ioctl_before_bind_einval",
        expect_errno("GET_INFO", vfio_raw::info(&edu_file), libc::EINVAL),
    );
    let iommu = Iommu::new().map_err(io_err("iommufd"))?;
    let bound = vfio_raw::bind(&edu_file, &iommu)
        .and_then(|_| vfio_raw::attach(&edu_file, &iommu))
        .and_then(|_| iommu.map_file(ram.as_fd(), IOVA, DMA_BYTES))
        .and_then(|_| Device::new(edu_file));
    report.check(
        "bind_attach_map_file",
        bound.as_ref().map(|_| ()).map_err(|e| format!("{e}")),
    );
    let edu_dev = bound.map_err(io_err("edu"))?;
    report.check("edu_dma_and_msi", {
        let msi = EventFd::new(0).map_err(io_err("eventfd"))?;
        edu_dev.enable_dma().map_err(io_err("COMMAND"))?;
        edu_dev.set_msi(Some(&msi)).map_err(io_err("MSI"))?;
        let done = edu_round_trip(&edu_dev, &ram, &msi, 0x5eed);
        edu_dev.set_msi(None).map_err(io_err("MSI off"))?;
        done
    });

    let nvme_file = File::from(session.retrieve(TOKEN_NVME).map_err(luo_err("NVMe"))?);
    if frozen == Frozen::Keep {
        report.check(
            "failed_enable_keeps_adoption",
            failed_enable(nvme, &nvme_file, &iommu),
        );
    }
    let nvme_dev = vfio_raw::bind(&nvme_file, &iommu)
        .and_then(|_| vfio_raw::attach(&nvme_file, &iommu))
        .and_then(|_| Device::new(nvme_file))
        .map_err(io_err("NVMe"))?;
    let regs = nvme_regs(&nvme_dev).map_err(io_err("NVMe registers"))?;
    line(&format!("nvme after kexec ({frozen:?}) {regs:?}"));
    match frozen {
        Frozen::Reset => report.check(
            "reset_mode_nvme_disabled",
            match command {
                Ok(c) if c & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER) == 0 => Ok(()),
                other => Err(format!(
                    "COMMAND before the retrieve {other:x?}: decoding or DMA on"
                )),
            },
        ),
        Frozen::Keep => {
            let kept = NvmeRegs {
                cc: NVME_CC_ENABLE,
                csts: regs.csts,
                aqa: NVME_AQA,
                asq: IOVA + NVME_ASQ,
                acq: IOVA + NVME_ACQ,
            };
            report.check(
                "keep_mode_nvme_enabled",
                if regs == kept && regs.csts & 1 == 1 {
                    Ok(())
                } else {
                    Err(format!("{regs:?}, expected {kept:?} and ready"))
                },
            );
            report.check(
                "keep_mode_bus_master_kept",
                match (command, nvme_dev.command()) {
                    (Ok(before), Ok(after)) if before & after & PCI_COMMAND_MASTER != 0 => Ok(()),
                    other => Err(format!(
                        "COMMAND before the retrieve and after the bind {other:x?}"
                    )),
                },
            );
            report.check(
                "keep_mode_old_admin_queue",
                nvme_identify(&nvme_dev, &ram, 1),
            );
        }
    }
    let mark = LogMark::now()?;
    report.check(
        "finish",
        session
            .finish()
            .map_err(luo_err("FINISH"))
            .and_then(|_| mark.logged(edu, "luvmm-lu: finished its live update"))
            .and_then(|_| mark.logged(nvme, "luvmm-lu: finished its live update")),
    );
    drop(edu_dev);
    drop(session);
    report.check(
        "normal_open_after_finish",
        Iommu::new()
            .and_then(|iommu| open_bound(edu, &iommu))
            .and_then(|d| vfio_raw::info(&d.file))
            .map(|_| ())
            .map_err(io_err("open the edu the normal way")),
    );
    Ok(DmaBed {
        ram,
        iommu,
        nvme: nvme_dev,
    })
}

fn run(stage: &str, args: &[String], report: &mut Report) -> Result<(), String> {
    let bed = Bed::find();
    let (Some(a), Some(b), Some(nvme), Some(sriov_pf), [fn0, fn1]) = (
        bed.edu.first(),
        bed.edu.get(1),
        bed.nvme.as_deref(),
        bed.sriov_pf.as_deref(),
        bed.behind_bridge.as_slice(),
    ) else {
        return Err(format!(
            "the bed needs two edu on the root bus and two behind a root port, one NVMe on \
             vfio-pci, and an SR-IOV NVMe: {:?} {:?} {:?} {:?}",
            bed.edu, bed.behind_bridge, bed.nvme, bed.sriov_pf
        ));
    };
    let sibling = (fn0.clone(), fn1.clone());
    let image = || -> Result<(&Path, &Path), String> {
        let kernel = flag(args, "--kernel").ok_or("--kernel is needed")?;
        let initrd = flag(args, "--initrd").ok_or("--initrd is needed")?;
        Ok((Path::new(kernel), Path::new(initrd)))
    };
    if stage == "stage4" {
        report.check(
            "next_kernel_without_handler_eio",
            match LiveUpdate::open() {
                Err(LuoError::Deserialize) => Ok(()),
                other => Err(format!(
                    "open /dev/liveupdate: {:?}, expected EIO",
                    other.map(|_| ())
                )),
            },
        );
        report.check("failed_registration_nothing_incoming", nothing_incoming(a));
        return Ok(());
    }
    let luo = LiveUpdate::open().map_err(luo_err("/dev/liveupdate"))?;
    let (kernel, initrd) = image()?;
    match stage {
        "stage1" => {
            without_kexec(report, &luo, a)?;
            vf_refusal(report, &luo, sriov_pf)?;
            freeze_refusal(report, &luo, (a, b), (kernel, initrd))?;
            freeze_refusal_d3(report, &luo, nvme, (kernel, initrd))?;
            let _sibling = preserve_alone(&luo, &sibling.0, (SIBLING_SESSION, 1))?;
            prepare_and_kexec(
                &luo,
                a,
                DmaBed::open(nvme)?,
                1,
                (kernel, initrd, "vfio_pci.luvmm_lu=keep luvmm.stage=2"),
            )
        }
        "stage2" => {
            // The retrieved controller and memfd go into the next update: a file that came
            // through a session is preserved again as any other.
            no_reset_while_incoming(report, &luo, (&sibling.0, &sibling.1), nvme)?;
            let retrieved = after_kexec(report, &luo, (a, nvme), Frozen::Reset)?;
            frozen_refusals(
                report,
                &luo,
                (a, b),
                (nvme, &retrieved.nvme),
                (kernel, initrd),
            )?;
            let spare = preserve_alone(&luo, sriov_pf, (SPARE_SESSION, TOKEN_SPARE))?;
            // In the same session an `edu` that stage 3 finds with another device ID.
            let other = open_bound(b, &spare.2).map_err(io_err("open b"))?;
            spare
                .0
                .preserve(other.fd(), TOKEN_OTHER)
                .map_err(luo_err("preserve b"))?;
            let words = format!("vfio_pci.luvmm_lu=reset luvmm.stage=3 luvmm.nobind={sriov_pf}");
            prepare_and_kexec(&luo, a, retrieved, 2, (kernel, initrd, &words))
        }
        "stage3" => {
            // Stage 2 preserved the memfd and controller its own retrieve gave: here they
            // came back through a second kexec.
            let retrieved = after_kexec(report, &luo, (a, nvme), Frozen::Keep);
            report.check(
                "represerve_retrieved",
                retrieved.as_ref().map(|_| ()).map_err(Clone::clone),
            );
            drop(retrieved?);
            unbound_retrieve(report, &luo, (sriov_pf, b))?;
            // A session with a VFIO file, into a kernel whose handler cannot register.
            let iommu = Iommu::new().map_err(io_err("iommufd"))?;
            let e = open_bound(a, &iommu).map_err(io_err("open edu"))?;
            let session = luo
                .create_session(&name("vfio-lu-lost"))
                .map_err(luo_err("create"))?;
            session.preserve(e.fd(), 1).map_err(luo_err("preserve"))?;
            kexec_into(
                kernel,
                initrd,
                "vfio_pci.luvmm_lu=reset vfio_pci.luvmm_lu_fault=register luvmm.stage=4",
            )
        }
        other => Err(format!("unknown stage {other}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stage = args.first().cloned().unwrap_or_default();
    // `vfio-lu open BDF`: what a normal open of the function's cdev gives, for scenarios.
    if stage == "open" {
        let bdf = args.get(1).map(String::as_str).unwrap_or_default();
        match open_cdev(bdf) {
            Ok(_) => println!("open {bdf} ok"),
            Err(e) => println!("open {bdf} errno={}", errno_of(&e)),
        }
        return;
    }
    let number = stage.trim_start_matches("stage").parse().unwrap_or(0);
    let mut report = Report::new("vfio_lu_");
    if let Err(why) = run(&stage, &args, &mut report) {
        report.check(&format!("stage{number}"), Err(why));
    }
    std::process::exit(report.done(number));
}
