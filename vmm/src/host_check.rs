//! `luvmm host-check`: what this host offers for a live update, as text or JSON.

use luvmm_devices::vfio::{host_vfio_devices, BoundCdev, HostVfioDevice};
use luvmm_liveupdate::probe::{probe, Candidate, HostCapabilities};
use serde::Serialize;

use crate::api::error_chain;

/// The report: LUO's capabilities and the VFIO devices that could be passed through.
#[derive(Debug, Serialize)]
pub struct HostReport {
    pub liveupdate: HostCapabilities,
    /// The VFIO path `--vfio-backend auto` takes here.
    pub vfio_backend: VfioPath,
    pub vfio_devices: Vec<HostVfioDevice>,
    /// Why no VFIO device could be bound for the handler probe, if one was tried.
    pub vfio_probe_error: Option<String>,
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
    HostReport {
        liveupdate,
        vfio_backend: vfio_path(),
        vfio_devices,
        vfio_probe_error,
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
        text
    }
}
