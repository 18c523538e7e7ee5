//! `luvmm drill`: rehearses a host live update in the nested bed and judges it by the guests'
//! own evidence.
//!
//! The host half (this module, `bed.rs`, `report/`) boots an L1 host under QEMU with the
//! `edu` devices the plan needs, passes the plan in L1's initramfs, follows L1's console
//! through every kexec and builds the report. The L1 half (`rehearsal.rs`, run as
//! `luvmm drill-l1`) is the operator inside: agent, VMs, prepare, kexec, restore, with the
//! open watcher (`watch.rs`) over both kernels' part of the update, each guest's checks
//! (`guest.rs`).

pub mod bed;
pub mod event;
pub mod guest;
pub mod judge;
pub mod rehearsal;
pub mod report;
pub mod watch;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use bed::{BedError, InitrdFile, L1Spec};
use report::{Collector, DrillReport};

/// The plan, in L1.
pub const L1_PLAN: &str = "/luvmm/drill.json";
/// The guest payload, in L1.
pub const L1_PAYLOAD: &str = "/luvmm/bin/payload.elf";
/// The kernel every kexec goes into, in L1.
pub const L1_NEXT_KERNEL: &str = "/boot/next-bzImage";
/// L1's initramfs without `/boot`, in L1: with the next kernel and itself added, it is the
/// next kernel's initramfs, which L1 builds before each kexec (`rehearsal.rs`).
pub const L1_STAGED_INITRD: &str = "/boot/staged-initrd";

/// Most VMs, devices per VM and rounds a drill takes (the bed has one L1 vCPU under TCG). The
/// guest payload drives up to 8 edu devices.
const MAX_VMS: u32 = 8;
const MAX_DEVICES: u32 = 8;
const MAX_ROUNDS: u32 = 10;
/// Most edu devices in L1: each needs its own slot on the q35 root bus (a bridge or a second
/// function would put devices in one IOMMU group, which only one VM can take), and of its 32
/// slots QEMU's host bridge, VGA, NIC and ICH9 functions hold 4.
const MAX_BED_DEVICES: u32 = 28;
/// Guest memory per VM, MiB.
const MEMORY_MIB: std::ops::RangeInclusive<u64> = 16..=1024;
/// The least a Linux guest boots and fills with its judge in (its kernel and initramfs take
/// about 40 MiB).
const LINUX_MIN_MEMORY_MIB: u64 = 128;
/// The Linux guest's judge drives one NVMe controller.
const LINUX_MAX_DEVICES: u32 = 1;
/// Each NVMe controller's namespace: a sparse file of this size on the host.
const NVME_NAMESPACE_BYTES: u64 = 64 << 20;
/// The Linux guest's kernel and initramfs, in L1.
pub const L1_GUEST_KERNEL: &str = "/luvmm/bin/guest-vmlinux";
pub const L1_GUEST_INITRD: &str = "/luvmm/bin/guest-initrd.cpio.gz";

/// The bed kernels' VFIO live-update handler (the project's kernel patch), on every kernel of
/// the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum VfioHandler {
    /// Stock 7.2: no device is preserved, every one is opened again (and reset by the open).
    Off,
    /// Every device preserved, and reset on its way to vfio-pci in the next kernel: the
    /// proposed upstream behaviour. `on` is its older name.
    #[value(alias = "on")]
    #[serde(alias = "on")]
    Reset,
    /// Every device preserved and kept as it ran (no reset, Bus Master left on).
    Keep,
}

impl VfioHandler {
    /// The kernel parameter that picks it, on every kernel of the chain.
    fn kernel_param(self) -> &'static str {
        match self {
            VfioHandler::Off => "vfio_pci.luvmm_lu=off",
            VfioHandler::Reset => "vfio_pci.luvmm_lu=reset",
            VfioHandler::Keep => "vfio_pci.luvmm_lu=keep",
        }
    }

    /// Devices come back reset under the guest's driver: the guest must find out and recover.
    pub fn resets_devices(self) -> bool {
        self != VfioHandler::Keep
    }
}

/// The guest every VM of a drill runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    /// luvmm's test payload: fills and checks every page, drives each `edu` device by DMA.
    #[default]
    Payload,
    /// The bed's Linux guest (tests/nested/guest-kernel.sh) with its judge: its own kernel,
    /// its nvme driver on a passed-through NVMe controller, its clocks.
    Linux,
}

/// What a drill runs, as L1 reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub vms: u32,
    pub memory_mib: u64,
    /// `edu` devices (payload) or NVMe controllers (Linux) per VM.
    pub devices: u32,
    /// Only the first this many VMs have devices (all of them when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices_on: Option<u32>,
    pub rounds: u32,
    pub cancel_first: bool,
    pub vfio_handler: VfioHandler,
    #[serde(default)]
    pub guest: GuestKind,
    /// Guest RAM asks for transparent huge pages, and L1's shmem THP is `advise`.
    #[serde(default)]
    pub thp: bool,
    /// Test-only faults (`LUVMM_TEST_FAULTS`) for every restore, for the drill's own tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_faults: Option<String>,
}

impl Plan {
    pub(crate) fn load(path: &Path) -> Result<Plan, rehearsal::StepError> {
        let text = std::fs::read(path).map_err(|source| rehearsal::StepError::Plan {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| rehearsal::StepError::PlanFormat {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Refuses plans the bed cannot hold, naming the limit.
    fn validate(&self) -> Result<(), DrillError> {
        let bad = |what: String| Err(DrillError::Plan(what));
        if !(1..=MAX_VMS).contains(&self.vms) {
            return bad(format!("--vms must be 1 to {MAX_VMS}, not {}", self.vms));
        }
        if self.devices > MAX_DEVICES {
            return bad(format!(
                "--devices must be 0 to {MAX_DEVICES}, not {}",
                self.devices
            ));
        }
        if self.devices_on.is_some_and(|on| on > self.vms) {
            return bad(format!(
                "--devices-on must be at most --vms ({}), not {}",
                self.vms,
                self.devices_on.unwrap_or_default()
            ));
        }
        if self.device_count() > MAX_BED_DEVICES {
            return bad(format!(
                "--devices {} for {} VMs is {} edu devices, more than the {MAX_BED_DEVICES} \
                 free slots of L1's PCI bus",
                self.devices,
                self.vms_with_devices(),
                self.device_count()
            ));
        }
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return bad(format!(
                "--rounds must be 1 to {MAX_ROUNDS}, not {}",
                self.rounds
            ));
        }
        if self.guest == GuestKind::Linux && self.devices > LINUX_MAX_DEVICES {
            return bad(format!(
                "--devices must be 0 or {LINUX_MAX_DEVICES} with --guest linux (its judge \
                 drives one NVMe controller), not {}",
                self.devices
            ));
        }
        if self.guest == GuestKind::Linux && self.memory_mib < LINUX_MIN_MEMORY_MIB {
            return bad(format!(
                "--memory-mib must be at least {LINUX_MIN_MEMORY_MIB} with --guest linux, not {}",
                self.memory_mib
            ));
        }
        if !MEMORY_MIB.contains(&self.memory_mib) {
            return bad(format!(
                "--memory-mib must be {} to {}, not {}",
                MEMORY_MIB.start(),
                MEMORY_MIB.end(),
                self.memory_mib
            ));
        }
        Ok(())
    }

    /// How many VMs have devices.
    pub fn vms_with_devices(&self) -> u32 {
        self.devices_on.unwrap_or(self.vms).min(self.vms)
    }

    /// The devices of VM `index` (in boot order).
    pub fn devices_of(&self, index: usize) -> u32 {
        if index < self.vms_with_devices() as usize {
            self.devices
        } else {
            0
        }
    }

    /// The devices of the VM named `vm`.
    pub fn devices_of_vm(&self, vm: &str) -> u32 {
        vm_index(vm).map_or(0, |index| self.devices_of(index))
    }

    /// Every VM's devices together.
    pub fn device_count(&self) -> u32 {
        self.vms_with_devices() * self.devices
    }

    /// VM `index`'s share of `bdfs`: the first VMs' devices come first.
    pub fn share<'a>(&self, bdfs: &'a [String], index: usize) -> &'a [String] {
        let per_vm = self.devices as usize;
        let first = (index * per_vm).min(bdfs.len());
        let last = (first + self.devices_of(index) as usize).min(bdfs.len());
        &bdfs[first..last]
    }

    /// L1's memory: its own 2 GiB, and twice the guests' (their memfds and what LUO keeps).
    fn l1_memory_mib(&self) -> u64 {
        (2048 + 2 * u64::from(self.vms) * self.memory_mib).max(3072)
    }
}

/// The name of a drill's VM `index` (in boot order): `vm1` is the first.
pub fn vm_id(index: usize) -> String {
    format!("vm{}", index + 1)
}

/// The boot-order index of the drill's VM named `vm`, as [`vm_id`] names it.
pub fn vm_index(vm: &str) -> Option<usize> {
    vm.strip_prefix("vm")?.parse::<usize>().ok()?.checked_sub(1)
}

/// The drill could not run (a drill that ran and found a loss is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("{0}")]
    Plan(String),
    #[error(transparent)]
    Bed(#[from] BedError),
    #[error("cannot create the work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find this luvmm executable")]
    Exe(#[source] std::io::Error),
    #[error("cannot write the report")]
    Json(#[source] serde_json::Error),
}

/// The bed a drill runs on: L1's kernels and their VFIO handler, its base initramfs, its
/// shmem THP and the guest payload.
#[derive(Clone, Debug, clap::Args)]
pub struct BedArgs {
    /// L1's kernel (the bed's is what tests/nested/kernel.sh builds).
    #[arg(long)]
    pub kernel: PathBuf,
    /// The kernel each round kexecs into (default: --kernel): a pair to test before rollout.
    #[arg(long)]
    pub next_kernel: Option<PathBuf>,
    /// L1's base initramfs: busybox, the bed's /init and the shared libraries luvmm needs
    /// (tests/nested/initramfs.sh writes one as initrd-stage2.cpio.gz).
    #[arg(long)]
    pub initrd: PathBuf,
    /// The guest payload ELF (tests/guest/build.sh), for `--guest payload`.
    #[arg(long)]
    pub payload: Option<PathBuf>,
    /// The Linux guest's kernel and initramfs with its judge, for `--guest linux`: the
    /// `vmlinux` and `initrd.cpio.gz` in the directory tests/nested/guest-kernel.sh prints.
    #[arg(long)]
    pub guest_kernel: Option<PathBuf>,
    #[arg(long)]
    pub guest_initrd: Option<PathBuf>,
    /// The bed kernels' VFIO live-update handler.
    #[arg(long, value_enum, default_value_t = VfioHandler::Off)]
    pub vfio_handler: VfioHandler,
    /// Transparent huge pages for guest RAM, on by default (L1's shmem THP set to `advise`,
    /// `MADV_HUGEPAGE`): the report says how much of it was in huge pages before and after
    /// the update. `--thp off` leaves L1's setting alone and RAM in small pages.
    #[arg(long, value_name = "on|off", default_value = "on", num_args = 0..=1,
          default_missing_value = "on", value_parser = crate::cli::on_off)]
    pub thp: bool,
    /// Give up on L1 after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Keep L1's images and console log here (default: a temporary directory, removed after
    /// a passing drill).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// What the operator asked for.
#[derive(Clone, Debug, clap::Args)]
pub struct DrillArgs {
    #[command(flatten)]
    pub bed: BedArgs,
    /// The guest each VM runs.
    #[arg(long, value_enum, default_value_t = GuestKind::Payload)]
    pub guest: GuestKind,
    /// MicroVMs on the host.
    #[arg(long, default_value_t = 1)]
    pub vms: u32,
    /// Guest memory of each, MiB (the payload fills and checks every page, the Linux judge
    /// 40 %); default 64 for the payload, 256 for Linux.
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Devices passed through to each VM: `edu` devices for the payload, NVMe controllers
    /// for Linux.
    #[arg(long, default_value_t = 1)]
    pub devices: u32,
    /// Only the first N VMs get devices; the others have none [default: every VM].
    #[arg(long, value_name = "N")]
    pub devices_on: Option<u32>,
    /// Updates back to back.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Prepare, call the update off and check every guest, then update.
    #[arg(long)]
    pub cancel_first: bool,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write an SVG timeline of the phases per VM here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Test-only faults injected into every restore (`LUVMM_TEST_FAULTS`), to see the drill
    /// catch them.
    #[arg(long, hide = true)]
    pub test_faults: Option<String>,
}

impl DrillArgs {
    /// One update of `vms` payload VMs of `memory_mib`, with `devices` each on the first
    /// `devices_on` (all when `None`), as the benchmarks run it: no table, no picture.
    pub fn one_update(
        bed: &BedArgs,
        vms: u32,
        memory_mib: u64,
        devices: u32,
        devices_on: Option<u32>,
    ) -> DrillArgs {
        DrillArgs {
            bed: bed.clone(),
            guest: GuestKind::Payload,
            vms,
            memory_mib: Some(memory_mib),
            devices,
            devices_on,
            rounds: 1,
            cancel_first: false,
            json: false,
            svg: None,
            test_faults: None,
        }
    }

    fn plan(&self) -> Plan {
        let default_mib = match self.guest {
            GuestKind::Payload => 64,
            GuestKind::Linux => 256,
        };
        Plan {
            vms: self.vms,
            memory_mib: self.memory_mib.unwrap_or(default_mib),
            devices: self.devices,
            devices_on: self.devices_on,
            rounds: self.rounds,
            cancel_first: self.cancel_first,
            vfio_handler: self.bed.vfio_handler,
            guest: self.guest,
            thp: self.bed.thp,
            test_faults: self.test_faults.clone(),
        }
    }
}

/// Runs a drill and returns its report (its progress went to stderr, its SVG to `--svg`).
pub fn run(args: &DrillArgs) -> Result<DrillReport, DrillError> {
    let plan = args.plan();
    plan.validate()?;
    let (work, temporary) = match &args.bed.work_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("luvmm-drill-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work).map_err(|source| DrillError::WorkDir {
        path: work.clone(),
        source,
    })?;
    let initrd = work.join("initrd");
    write_initrd(&args.bed, &plan, &initrd)?;
    let (devices, drives) = l1_devices(&plan, &work)?;
    let append = format!("luvmm.scenario=drill {}", plan.vfio_handler.kernel_param());
    let spec = L1Spec {
        drives: &drives,
        kernel: &args.bed.kernel,
        initrd: &initrd,
        append: &append,
        devices: &devices,
        memory_mib: plan.l1_memory_mib(),
    };
    let mut collector = Collector::new(plan.clone());
    let mut progress = Progress::new();
    let console_path = work.join("console.log");
    let mut console = std::fs::File::create(&console_path).ok();
    let run = bed::run_l1(&spec, Duration::from_secs(args.bed.timeout), |line| {
        if let Some(file) = console.as_mut() {
            let _ = writeln!(file, "[{:9.3}] {}", line.at, line.text);
        }
        if let Some(text) = collector.feed(line) {
            progress.show(&text);
        }
    })?;
    progress.end();
    let report = collector.finish(&run, &console_path);
    if let Some(svg) = &args.svg {
        bed::write(svg, report.to_svg().as_bytes())?;
    }
    if report.ok && temporary {
        let _ = std::fs::remove_dir_all(&work);
    } else if !report.ok {
        eprintln!(
            "drill: L1's images and console log are in {}",
            work.display()
        );
    }
    Ok(report)
}

/// The guest's files on the host, by where they go in L1.
struct GuestFiles(Vec<(&'static str, Vec<u8>)>);

impl GuestFiles {
    /// Reads what `guest` needs, refusing (by flag) what is missing.
    fn of(args: &BedArgs, guest: GuestKind) -> Result<GuestFiles, DrillError> {
        let need = |path: &Option<PathBuf>, flag: &str| {
            path.clone().ok_or_else(|| {
                DrillError::Plan(format!("{flag} is needed with --guest {guest:?}").to_lowercase())
            })
        };
        let files = match guest {
            GuestKind::Payload => vec![(L1_PAYLOAD, need(&args.payload, "--payload")?)],
            GuestKind::Linux => vec![
                (L1_GUEST_KERNEL, need(&args.guest_kernel, "--guest-kernel")?),
                (L1_GUEST_INITRD, need(&args.guest_initrd, "--guest-initrd")?),
            ],
        };
        let mut read = Vec::new();
        for (to, from) in files {
            read.push((to, bed::read(&from)?));
        }
        Ok(GuestFiles(read))
    }
}

/// L1's QEMU devices and drives for the plan: an `edu` per payload device; an NVMe controller
/// per Linux device, each with a sparse namespace file in `work`.
fn l1_devices(plan: &Plan, work: &Path) -> Result<(Vec<String>, Vec<String>), DrillError> {
    let count = plan.device_count();
    if plan.guest == GuestKind::Payload {
        return Ok(((0..count).map(|_| "edu".to_string()).collect(), Vec::new()));
    }
    let (mut devices, mut drives) = (Vec::new(), Vec::new());
    for i in 0..count {
        let disk = work.join(format!("nvme-{i}.img"));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(NVME_NAMESPACE_BYTES))
            .map_err(|source| DrillError::WorkDir {
                path: disk.clone(),
                source,
            })?;
        drives.push(format!(
            "file={},if=none,id=nvm{i},format=raw",
            disk.display()
        ));
        devices.push(format!("nvme,serial=luvmm-nvme-{i},drive=nvm{i}"));
    }
    Ok((devices, drives))
}

/// The image L1 boots: the base with luvmm, the guest's files, the plan and the scenario hook
/// ("staged"), then the next kernel and the staged image itself, from which L1 builds the
/// next kernel's initramfs (this same image) before each kexec.
fn write_initrd(args: &BedArgs, plan: &Plan, out: &Path) -> Result<(), DrillError> {
    let base = bed::read(&args.initrd)?;
    let guest = GuestFiles::of(args, plan.guest)?;
    let exe = std::env::current_exe().map_err(DrillError::Exe)?;
    let luvmm = bed::read(&exe)?;
    let next_kernel = bed::read(args.next_kernel.as_deref().unwrap_or(&args.kernel))?;
    let plan_json = serde_json::to_vec(plan).map_err(DrillError::Json)?;
    // The bed's /init runs /luvmm/scenarios/<luvmm.scenario>.sh with the stage.
    let hook = b"#!/bin/sh\nexec /luvmm/bin/luvmm drill-l1 --stage \"$1\"\n";
    let mut files = vec![
        InitrdFile {
            path: "/luvmm/bin/luvmm",
            mode: 0o755,
            data: &luvmm,
        },
        InitrdFile {
            path: L1_PLAN,
            mode: 0o644,
            data: &plan_json,
        },
        InitrdFile {
            path: "/luvmm/scenarios/drill.sh",
            mode: 0o755,
            data: hook,
        },
    ];
    for (path, data) in &guest.0 {
        files.push(InitrdFile {
            path,
            mode: 0o644,
            data,
        });
    }
    let staged = bed::extend_initrd(&base, &files)?;
    Ok(bed::write(out, &with_boot(&staged, &next_kernel)?)?)
}

/// `staged` with `/boot` added: the next kernel and `staged` itself.
pub(crate) fn with_boot(staged: &[u8], next_kernel: &[u8]) -> Result<Vec<u8>, BedError> {
    bed::extend_initrd(
        staged,
        &[
            InitrdFile {
                path: L1_NEXT_KERNEL,
                mode: 0o644,
                data: next_kernel,
            },
            InitrdFile {
                path: L1_STAGED_INITRD,
                mode: 0o644,
                data: staged,
            },
        ],
    )
}

/// The live progress line: rewritten in place on a terminal, one line per step otherwise.
struct Progress {
    tty: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, text: &str) {
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{text}");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
    }

    fn end(&mut self) {
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            vms: 2,
            memory_mib: 64,
            devices: 2,
            devices_on: None,
            rounds: 1,
            cancel_first: false,
            vfio_handler: VfioHandler::Off,
            guest: GuestKind::Payload,
            thp: false,
            test_faults: None,
        }
    }

    #[test]
    fn each_guest_needs_its_own_files_by_flag() {
        let args = BedArgs {
            kernel: PathBuf::from("/k"),
            next_kernel: None,
            initrd: PathBuf::from("/i"),
            payload: Some(PathBuf::from("/p")),
            guest_kernel: None,
            guest_initrd: None,
            vfio_handler: VfioHandler::Keep,
            thp: false,
            timeout: 1,
            work_dir: None,
        };
        let refused = |guest, args: &BedArgs| match GuestFiles::of(args, guest) {
            Err(DrillError::Plan(why)) => why,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("taken without its files"),
        };
        assert_eq!(
            refused(GuestKind::Linux, &args),
            "--guest-kernel is needed with --guest linux"
        );
        let args = BedArgs {
            payload: None,
            ..args
        };
        assert_eq!(
            refused(GuestKind::Payload, &args),
            "--payload is needed with --guest payload"
        );
    }

    #[test]
    fn devices_on_gives_the_first_vms_their_devices_and_the_others_none() {
        let plan = Plan {
            vms: 4,
            devices: 2,
            devices_on: Some(2),
            ..plan()
        };
        let bdfs: Vec<String> = (0..4).map(|i| format!("0000:00:0{}.0", i + 3)).collect();
        assert_eq!(plan.device_count(), 4);
        assert_eq!(plan.share(&bdfs, 0), &bdfs[0..2]);
        assert_eq!(plan.share(&bdfs, 1), &bdfs[2..4]);
        assert!(plan.share(&bdfs, 2).is_empty() && plan.share(&bdfs, 3).is_empty());
        assert_eq!(
            ["vm1", "vm2", "vm3", "vm4", "nonsense"].map(|vm| plan.devices_of_vm(vm)),
            [2, 2, 0, 0, 0]
        );
        assert_eq!(
            Plan {
                devices_on: None,
                ..plan
            }
            .device_count(),
            8
        );
    }

    #[test]
    fn plans_outside_the_bed_are_refused_by_name() {
        assert!(plan().validate().is_ok());
        for (vms, devices) in [(1, 8), (3, 8), (7, 4)] {
            let plan = Plan {
                vms,
                devices,
                ..plan()
            };
            assert!(plan.validate().is_ok(), "{vms} VMs x {devices}");
        }
        for (bad, flag) in [
            (Plan { vms: 0, ..plan() }, "--vms"),
            (Plan { vms: 9, ..plan() }, "--vms"),
            (
                Plan {
                    devices: 9,
                    ..plan()
                },
                "--devices",
            ),
            (
                Plan {
                    vms: 4,
                    devices: 8,
                    ..plan()
                },
                "--devices",
            ),
            (
                Plan {
                    rounds: 0,
                    ..plan()
                },
                "--rounds",
            ),
            (
                Plan {
                    devices_on: Some(3),
                    ..plan()
                },
                "--devices-on",
            ),
            (
                Plan {
                    memory_mib: 8,
                    ..plan()
                },
                "--memory-mib",
            ),
            (
                Plan {
                    memory_mib: 4096,
                    ..plan()
                },
                "--memory-mib",
            ),
        ] {
            let e = bad.validate().expect_err("refused").to_string();
            assert!(e.starts_with(flag), "{e}");
        }
        // Devices on some VMs only fit where devices on all would not.
        let some = Plan {
            vms: 8,
            devices: 7,
            devices_on: Some(4),
            ..plan()
        };
        assert!(some.validate().is_ok());
        assert_eq!(plan().l1_memory_mib(), 3072);
        assert_eq!(
            Plan {
                vms: 2,
                memory_mib: 1024,
                ..plan()
            }
            .l1_memory_mib(),
            6144
        );
    }
}
