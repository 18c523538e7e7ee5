//! What this kernel can preserve, found by trying in a scratch session that is closed (and so
//! unpreserves everything) before the probe returns.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use serde::Serialize;

use super::session::{LiveUpdate, LuoError, SessionName};

/// Whether `/dev/liveupdate` can be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LuoStatus {
    /// Opened: LUO is on and nobody else holds it.
    Available,
    /// No device node: LUO is off or missing.
    NotEnabled,
    /// Another process holds it; handlers cannot be probed now.
    Held,
    /// Opening fails with EIO: the previous kernel's sessions were lost.
    Broken,
    /// Some other failure.
    Error(String),
}

impl std::fmt::Display for LuoStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LuoStatus::Available => f.write_str("available"),
            LuoStatus::NotEnabled => {
                f.write_str("not enabled (boot with CONFIG_LIVEUPDATE and `liveupdate=on kho=on`)")
            }
            LuoStatus::Held => f.write_str("held by another process"),
            LuoStatus::Broken => f.write_str("broken (EIO: previous sessions lost)"),
            LuoStatus::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Whether a LUO file handler for one kind of file exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerStatus {
    /// PRESERVE_FD of such a file succeeded (and was undone).
    Present,
    /// PRESERVE_FD said ENOENT: no handler for this file type.
    Absent,
    /// Could not be tried; the reason says why.
    Unknown(String),
}

impl std::fmt::Display for HandlerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerStatus::Present => f.write_str("present"),
            HandlerStatus::Absent => f.write_str("absent (PRESERVE_FD: ENOENT)"),
            HandlerStatus::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// LUO file handlers, one per kind of file luvmm preserves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Handlers {
    pub memfd: HandlerStatus,
    pub iommufd: HandlerStatus,
    pub vfio_device: HandlerStatus,
}

/// What the host offers for a live update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostCapabilities {
    pub luo: LuoStatus,
    pub kho_enabled: bool,
    pub cmdline_liveupdate_on: bool,
    pub cmdline_kho_on: bool,
    pub iommufd_present: bool,
    pub vfio_cdev_present: bool,
    pub handlers: Handlers,
    /// The mode luvmm's own VFIO handler (the nested bed's kernel patch) was booted with:
    /// `off`, `reset` or `keep`; `None` on kernels without it.
    pub vfio_handler_mode: Option<String>,
}

/// Where luvmm's bed kernel shows its VFIO handler's mode.
const VFIO_HANDLER_MODE: &str = "/sys/module/vfio_pci/parameters/luvmm_lu";

/// A file offered to the probe to try preserving, e.g. a VFIO cdev fd the caller has bound to
/// an iommufd (an unbound one is refused even where the handler exists).
pub struct Candidate<'a> {
    pub fd: BorrowedFd<'a>,
    pub what: String,
}

/// Probes the host. `vfio_device` is a bound VFIO cdev fd, if the caller has one.
pub fn probe(vfio_device: Option<Candidate<'_>>) -> HostCapabilities {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let flag = |f: &str| cmdline.split_whitespace().any(|w| w == f);
    let iommufd_present = Path::new("/dev/iommu").exists();
    let vfio_cdev_present = std::fs::read_dir("/dev/vfio/devices")
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);

    let (luo, handlers) = match LiveUpdate::open() {
        Ok(device) => (LuoStatus::Available, probe_handlers(&device, vfio_device)),
        Err(e) => {
            let status = match e {
                LuoError::NotEnabled => LuoStatus::NotEnabled,
                LuoError::Busy => LuoStatus::Held,
                LuoError::Deserialize => LuoStatus::Broken,
                other => LuoStatus::Error(other.to_string()),
            };
            let why = HandlerStatus::Unknown(format!("/dev/liveupdate is {status}"));
            (
                status,
                Handlers {
                    memfd: why.clone(),
                    iommufd: why.clone(),
                    vfio_device: why,
                },
            )
        }
    };
    // LUO registers its device only when KHO is on; otherwise KHO's debugfs tells.
    let kho_enabled = matches!(
        luo,
        LuoStatus::Available | LuoStatus::Held | LuoStatus::Broken
    ) || Path::new("/sys/kernel/debug/kho/out").exists();
    HostCapabilities {
        luo,
        kho_enabled,
        cmdline_liveupdate_on: flag("liveupdate=on"),
        cmdline_kho_on: flag("kho=on"),
        iommufd_present,
        vfio_cdev_present,
        handlers,
        vfio_handler_mode: std::fs::read_to_string(VFIO_HANDLER_MODE)
            .ok()
            .map(|m| m.trim().to_string()),
    }
}

fn probe_handlers(device: &LiveUpdate, vfio_device: Option<Candidate<'_>>) -> Handlers {
    let memfd = match scratch_memfd() {
        Ok(file) => try_preserve(device, file.as_fd()),
        Err(e) => HandlerStatus::Unknown(format!("memfd_create: {e}")),
    };
    let iommufd = match File::options().read(true).write(true).open("/dev/iommu") {
        Ok(file) => try_preserve(device, file.as_fd()),
        Err(e) => HandlerStatus::Unknown(format!("/dev/iommu: {e}")),
    };
    let vfio_device = match vfio_device {
        Some(candidate) => {
            log::debug!("probing the VFIO handler with {}", candidate.what);
            try_preserve(device, candidate.fd)
        }
        None => HandlerStatus::Unknown("no VFIO device bound to an iommufd to try".into()),
    };
    Handlers {
        memfd,
        iommufd,
        vfio_device,
    }
}

/// The scratch session's name: with a dot, which no VM's session (`luvmm-<vm id>`, ids without
/// dots) ever has, so a VM can never hold the name and block every probe.
pub fn scratch_session_name() -> String {
    format!("luvmm.probe-{}", std::process::id())
}

/// Whether this kernel has a LUO handler for `fd`'s kind of file: preserves it in a fresh
/// scratch session, then closes the session, which unpreserves it.
pub fn try_preserve(device: &LiveUpdate, fd: BorrowedFd<'_>) -> HandlerStatus {
    let name = scratch_session_name();
    let session = match SessionName::new(&name).and_then(|n| device.create_session(&n)) {
        Ok(session) => session,
        Err(e) => return HandlerStatus::Unknown(e.to_string()),
    };
    let status = match session.preserve(fd, 1) {
        Ok(()) => HandlerStatus::Present,
        Err(LuoError::NotPreservable { .. }) => HandlerStatus::Absent,
        Err(e) => HandlerStatus::Unknown(e.to_string()),
    };
    session.cancel();
    status
}

/// A small memfd to offer the memfd handler.
pub fn scratch_memfd() -> std::io::Result<File> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let file = File::from(memfd_create("luvmm-probe", MFdFlags::MFD_CLOEXEC)?);
    file.set_len(4096)?;
    Ok(file)
}

impl HostCapabilities {
    /// A human-readable report, one fact per line.
    pub fn to_text(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let handler = |h: &HandlerStatus| h.to_string();
        let luo = self.luo.to_string();
        format!(
            "LUO (/dev/liveupdate):    {luo}\n\
             KHO enabled:              {}\n\
             cmdline liveupdate=on:    {}\n\
             cmdline kho=on:           {}\n\
             iommufd (/dev/iommu):     {}\n\
             VFIO cdev devices:        {}\n\
             memfd handler:            {}\n\
             iommufd handler:          {}\n\
             VFIO device handler:      {}{}\n",
            yes(self.kho_enabled),
            yes(self.cmdline_liveupdate_on),
            yes(self.cmdline_kho_on),
            yes(self.iommufd_present),
            yes(self.vfio_cdev_present),
            handler(&self.handlers.memfd),
            handler(&self.handlers.iommufd),
            handler(&self.handlers.vfio_device),
            match &self.vfio_handler_mode {
                Some(mode) => format!(" (luvmm's bed handler, mode {mode})"),
                None => String::new(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_matches_the_device_node() {
        let caps = probe(None);
        if Path::new("/dev/liveupdate").exists() {
            assert_ne!(caps.luo, LuoStatus::NotEnabled);
            return;
        }
        // This development machine and CI have no /dev/liveupdate; the nested bed checks the
        // other branch against a real LUO kernel.
        assert_eq!(caps.luo, LuoStatus::NotEnabled);
        assert!(matches!(caps.handlers.memfd, HandlerStatus::Unknown(_)));
        let text = caps.to_text();
        assert!(text.contains("not enabled"), "{text}");
        let json = serde_json::to_value(&caps).unwrap();
        assert_eq!(json["luo"], "not_enabled");
    }
}
