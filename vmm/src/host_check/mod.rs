//! `luvmm host-check`: what this host offers for a live update, as text or JSON.

use luvmm_devices::vfio::{host_vfio_devices, BoundCdev, HostVfioDevice};
use luvmm_liveupdate::luo::probe::{probe, Candidate, HandlerStatus, HostCapabilities, LuoStatus};
use serde::Serialize;

use luvmm_resources::errors::error_chain;

pub use kvm_tsc::KvmTsc;

mod kvm_tsc;

/// The report: LUO's capabilities and the VFIO devices that could be passed through.
#[derive(Debug, Serialize)]
pub struct HostReport {
    pub liveupdate: HostCapabilities,
    /// The VFIO path `--vfio-backend auto` takes here.
    pub vfio_backend: VfioPath,
    pub vfio_devices: Vec<HostVfioDevice>,
    /// Why no VFIO device could be bound for the handler probe, if one was tried.
    pub vfio_probe_error: Option<String>,
    /// Who holds the VMs' sessions through a kexec on this host.
    pub session_holder: SessionHolder,
    /// KVM's TSC rate for new vCPUs against the TSC's own; `null` without `/dev/kvm`.
    pub kvm_tsc: Option<KvmTsc>,
    /// What all of the above allows.
    pub verdict: Verdict,
    /// Why the verdict is not `ready`, one reason each.
    pub blockers: Vec<String>,
    /// What does not stop an update but harms the guests here.
    pub warnings: Vec<String>,
}

/// Who holds the VMs' sessions through a kexec: systemd (PID 1, 261 or later, keeps each
/// `luvmm@` service's session in its fd store) or luvmm's agent (everywhere else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum SessionHolder {
    Systemd {
        version: u32,
    },
    Agent {
        #[serde(skip_serializing_if = "Option::is_none")]
        systemd: Option<u32>,
    },
}

impl SessionHolder {
    /// This host's, from PID 1.
    pub fn of_host() -> SessionHolder {
        use luvmm_liveupdate::fdstore::{host_systemd, preserves_fd_stores};
        match host_systemd() {
            Some(version) if preserves_fd_stores(Some(version)) => {
                SessionHolder::Systemd { version }
            }
            systemd => SessionHolder::Agent { systemd },
        }
    }
}

/// What a live update on this host would keep; `host-check` exits with its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Guest memory and every vfio-pci device here can be preserved.
    Ready,
    /// Guest memory can be preserved; the passthrough devices here cannot.
    MemoryOnly,
    /// Nothing can be preserved: LUO, KHO or the memfd handler is missing.
    Unavailable,
}

impl Verdict {
    /// The exit code of `luvmm host-check` (1 is left for errors, 2 for usage).
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Ready => 0,
            Verdict::Unavailable => 3,
            Verdict::MemoryOnly => 4,
        }
    }
}

/// Weighs what was found: memory needs LUO, KHO, `liveupdate=on` and the memfd handler; a
/// vfio-pci device needs the iommufd path and the VFIO device handler. An iommufd handler is
/// not needed: luvmm binds a preserved device to a new iommufd after the kexec and maps guest
/// RAM again at the same IOVAs from the retrieved memfds.
fn verdict(
    caps: &HostCapabilities,
    path: VfioPath,
    devices: &[HostVfioDevice],
) -> (Verdict, Vec<String>) {
    let mut memory = Vec::new();
    if caps.luo != LuoStatus::Available {
        memory.push(format!("/dev/liveupdate is {}", caps.luo));
    }
    if !caps.kho_enabled {
        memory.push("KHO is not enabled".to_string());
    }
    if !caps.cmdline_liveupdate_on {
        memory.push("the kernel command line lacks liveupdate=on".to_string());
    }
    if caps.handlers.memfd != HandlerStatus::Present {
        memory.push(format!("memfd handler: {}", caps.handlers.memfd));
    }
    if !memory.is_empty() {
        return (Verdict::Unavailable, memory);
    }
    let mut devices_blocked = Vec::new();
    if !devices.is_empty() {
        if path != VfioPath::Iommufd {
            devices_blocked.push(format!("the VFIO path is {path}, not iommufd"));
        }
        if caps.handlers.vfio_device != HandlerStatus::Present {
            devices_blocked.push(format!(
                "VFIO device handler: {}",
                caps.handlers.vfio_device
            ));
        }
    }
    if devices_blocked.is_empty() {
        (Verdict::Ready, devices_blocked)
    } else {
        (Verdict::MemoryOnly, devices_blocked)
    }
}

/// The VFIO path passthrough devices take on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VfioPath {
    /// `/dev/iommu` and VFIO cdevs: what live update needs.
    Iommufd,
    /// Only `/dev/vfio/vfio`: groups in a type1 container, DMA by address; nothing of it can be
    /// preserved through LUO.
    LegacyContainer,
    /// No VFIO at all.
    None,
}

impl std::fmt::Display for VfioPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VfioPath::Iommufd => "iommufd",
            VfioPath::LegacyContainer => "the legacy container",
            VfioPath::None => "none",
        })
    }
}

fn vfio_path() -> VfioPath {
    if std::path::Path::new("/dev/iommu").exists() {
        VfioPath::Iommufd
    } else if std::path::Path::new("/dev/vfio/vfio").exists() {
        VfioPath::LegacyContainer
    } else {
        VfioPath::None
    }
}

/// Probes the host. The first vfio-pci device with a cdev is bound to an iommufd and offered to
/// the LUO probe, since only a bound cdev can be preserved; it is released before returning.
pub fn run() -> HostReport {
    let vfio_devices = host_vfio_devices();
    let bound = vfio_devices
        .iter()
        .find(|d| d.cdev.is_some())
        .map(BoundCdev::bind);
    let (candidate, vfio_probe_error) = match &bound {
        Some(Ok(cdev)) => (
            Some(Candidate {
                fd: cdev.fd(),
                what: format!("VFIO cdev of {}", cdev.bdf),
            }),
            None,
        ),
        Some(Err(e)) => (None, Some(error_chain(e))),
        None => (None, None),
    };
    let liveupdate = probe(candidate);
    let vfio_backend = vfio_path();
    let (verdict, blockers) = verdict(&liveupdate, vfio_backend, &vfio_devices);
    let kvm_tsc = KvmTsc::of_host();
    let warnings = kvm_tsc.iter().filter_map(KvmTsc::warning).collect();
    HostReport {
        liveupdate,
        vfio_backend,
        vfio_devices,
        vfio_probe_error,
        session_holder: SessionHolder::of_host(),
        kvm_tsc,
        verdict,
        blockers,
        warnings,
    }
}

impl HostReport {
    /// One fact per line.
    pub fn to_text(&self) -> String {
        let mut text = self.liveupdate.to_text();
        text.push_str(&format!(
            "VFIO path:                {}\n",
            match self.vfio_backend {
                VfioPath::Iommufd => "iommufd + VFIO cdev",
                VfioPath::LegacyContainer =>
                    "legacy group/container only (no iommufd: cannot be preserved)",
                VfioPath::None => "none",
            }
        ));
        if self.vfio_devices.is_empty() {
            text.push_str("vfio-pci devices:         none\n");
        }
        for dev in &self.vfio_devices {
            text.push_str(&format!(
                "vfio-pci device:          {} (cdev {}, IOMMU group {})\n",
                dev.bdf,
                dev.cdev
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string()),
                dev.iommu_group
                    .map_or("none".to_string(), |g| g.to_string()),
            ));
        }
        if let Some(e) = &self.vfio_probe_error {
            text.push_str(&format!("VFIO probe:               {e}\n"));
        }
        text.push_str(&format!(
            "session holder:           {}\n",
            match self.session_holder {
                SessionHolder::Systemd { version } => format!(
                    "systemd {version} (each luvmm@ service keeps its session in its fd store; \
                     no agent may hold /dev/liveupdate)"
                ),
                SessionHolder::Agent { systemd: Some(v) } => format!(
                    "the luvmm agent (systemd {v} does not preserve fd stores; 261 or later does)"
                ),
                SessionHolder::Agent { systemd: None } => "the luvmm agent".to_string(),
            }
        ));
        text.push_str(&format!(
            "KVM TSC rate:             {}\n",
            match &self.kvm_tsc {
                Some(tsc) => format!(
                    "{} kHz for new vCPUs; the TSC ticks at {} kHz ({} ppm apart)",
                    tsc.kvm_khz, tsc.measured_khz, tsc.ppm
                ),
                None => "unknown (no usable /dev/kvm)".to_string(),
            }
        ));
        text.push_str(&format!(
            "verdict:                  {}\n",
            match self.verdict {
                Verdict::Ready => "ready: guest memory and passthrough devices can be preserved",
                Verdict::MemoryOnly => "memory only: passthrough devices cannot be preserved",
                Verdict::Unavailable => "unavailable: nothing can be preserved",
            }
        ));
        for blocker in &self.blockers {
            text.push_str(&format!("blocker:                  {blocker}\n"));
        }
        for warning in &self.warnings {
            text.push_str(&format!("warning:                  {warning}\n"));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luvmm_liveupdate::luo::probe::Handlers;

    fn caps(memfd: HandlerStatus, vfio: HandlerStatus) -> HostCapabilities {
        HostCapabilities {
            luo: LuoStatus::Available,
            kho_enabled: true,
            cmdline_liveupdate_on: true,
            cmdline_kho_on: true,
            iommufd_present: true,
            vfio_cdev_present: true,
            handlers: Handlers {
                memfd,
                iommufd: vfio.clone(),
                vfio_device: vfio,
            },
            vfio_handler_mode: None,
        }
    }

    fn edu() -> Vec<HostVfioDevice> {
        vec![HostVfioDevice {
            bdf: "0000:00:03.0".into(),
            cdev: Some("/dev/vfio/devices/vfio0".into()),
            iommu_group: Some(3),
        }]
    }

    #[test]
    fn the_verdict_and_its_exit_code_follow_what_can_be_preserved() {
        use HandlerStatus::{Absent, Present};
        let ready = verdict(&caps(Present, Present), VfioPath::Iommufd, &edu());
        assert_eq!(ready, (Verdict::Ready, vec![]));
        assert_eq!(Verdict::Ready.exit_code(), 0);

        // Linux 7.2: memfds only.
        let (v, why) = verdict(&caps(Present, Absent), VfioPath::Iommufd, &edu());
        assert_eq!(v, Verdict::MemoryOnly);
        assert_eq!(why, ["VFIO device handler: absent (PRESERVE_FD: ENOENT)"]);
        assert_eq!(v.exit_code(), 4);
        // The bed's kernel with luvmm's VFIO handler: no iommufd handler is needed.
        let mut bed = caps(Present, Present);
        bed.handlers.iommufd = Absent;
        assert_eq!(
            verdict(&bed, VfioPath::Iommufd, &edu()),
            (Verdict::Ready, vec![])
        );
        // Without devices there is nothing else to preserve.
        assert_eq!(
            verdict(&caps(Present, Absent), VfioPath::Iommufd, &[]).0,
            Verdict::Ready
        );
        // The legacy container cannot be preserved even with handlers.
        let (v, why) = verdict(&caps(Present, Present), VfioPath::LegacyContainer, &edu());
        assert_eq!(v, Verdict::MemoryOnly);
        assert!(why[0].contains("the legacy container"), "{why:?}");

        let mut off = caps(Present, Present);
        off.luo = LuoStatus::NotEnabled;
        off.cmdline_liveupdate_on = false;
        let (v, why) = verdict(&off, VfioPath::Iommufd, &edu());
        assert_eq!((v, why.len()), (Verdict::Unavailable, 2), "{why:?}");
        // In words a person reads, not Rust's Debug text.
        assert!(
            why[0].starts_with("/dev/liveupdate is not enabled (boot with"),
            "{why:?}"
        );
        assert_eq!(v.exit_code(), 3);
    }
}
