//! The `luvmm` command line: one subcommand per job.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use luvmm_devices::guest_control::GuestRequest;
use luvmm_liveupdate::agent::DEFAULT_AGENT_SOCKET;
use luvmm_resources::config::{
    memory_from_mib, BarMode, BootProtocol, CpuTemplate, SerialOutput, VfioBackendChoice, VmConfig,
};
use luvmm_vmm::api::{PrepareBody, ShutdownBody, VmmAction};
use luvmm_vmm::seccomp::SeccompMode;
use serde::de::DeserializeOwned;

/// luvmm: a microVM monitor whose VMs survive a host kernel live update.
#[derive(Debug, Parser)]
#[command(name = "luvmm", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a microVM from a config file and/or flags.
    Run(RunArgs),
    /// Rebuild a saved microVM in this process from its memfds and state, and resume it.
    Restore(RestoreArgs),
    /// Start VM ID as its systemd unit (luvmm@ID.service) does: restored from its LUO session
    /// when one waits for it after a host live update, booted from its config otherwise.
    Start(StartArgs),
    /// Talk to a running luvmm through its API socket.
    Ctl(CtlArgs),
    /// Measure luvmm.
    Bench(BenchArgs),
    /// The live-update agent: the one holder of /dev/liveupdate for every VMM on the host.
    Agent(AgentArgs),
    /// The host live update, host-wide.
    #[command(subcommand)]
    Update(UpdateCommand),
    /// Rehearse a host live update in the nested bed: boot an L1 host, run microVMs with
    /// passthrough devices in it, update its kernel for real and judge by the guests' checks.
    ///
    /// Exit status: 0 every guest kept everything and every device works, 1 otherwise.
    Drill(crate::drill::DrillArgs),
    /// The drill's half inside L1 (run by the bed's /init).
    #[command(hide = true)]
    DrillL1 {
        #[arg(long)]
        stage: u32,
    },
    /// Report what this host offers for a live update (LUO, KHO, handlers, VFIO).
    ///
    /// Exit status: 0 ready (guest memory and every vfio-pci device can be preserved), 3 nothing
    /// can be preserved (no LUO, KHO, liveupdate=on or memfd handler), 4 memory only (the
    /// vfio-pci devices cannot be preserved), 1 error, 2 usage.
    HostCheck {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// JSON config file; flags below override its fields.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Guest kernel: an ELF (vmlinux, or luvmm's test payload) or a bzImage.
    #[arg(long = "kernel", visible_alias = "payload", value_name = "FILE")]
    pub payload: Option<PathBuf>,
    /// Initramfs for a Linux guest, loaded high in RAM.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// RAM in MiB, laid out from GPA 0 around the MMIO hole (one memfd per region)
    /// [default: 64, or the config's].
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Number of vCPUs: at most KVM's limit; more than the host's CPUs is allowed, with a
    /// warning [default: 1, or the config's].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest command line [default: "console=ttyS0", or the config's].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Boot protocol: auto (from the kernel file's format), linux64 or pvh [default: auto].
    #[arg(long, value_parser = config_word::<BootProtocol>)]
    pub boot: Option<BootProtocol>,
    /// The guest's CPU model: host (everything KVM offers) or baseline (x86-64-v2, XSAVE
    /// with x87 and SSE state only).
    #[arg(long, value_parser = config_word::<CpuTemplate>)]
    pub cpu_template: Option<CpuTemplate>,
    /// Pass this host PCI function (bound to vfio-pci) through; repeatable.
    #[arg(long)]
    pub vfio: Vec<String>,
    /// Trap every passthrough BAR access instead of mapping BARs into the guest.
    #[arg(long)]
    pub vfio_trap_bars: bool,
    /// IOMMU path for passthrough devices: auto (iommufd if present), iommufd, legacy.
    #[arg(long, value_parser = config_word::<VfioBackendChoice>)]
    pub vfio_backend: Option<VfioBackendChoice>,
    /// Transparent huge pages for guest RAM: on (the default: MADV_HUGEPAGE and RAM filled at
    /// boot, where the host's shmem THP is `advise` or `always`) or off.
    #[arg(long, value_name = "on|off", num_args = 0..=1, default_missing_value = "on",
          value_parser = on_off)]
    pub thp: Option<bool>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Guest serial output: stdout, none, or a file path containing a '/' (appended)
    /// [default: stdout].
    #[arg(long, value_parser = SerialOutput::from_flag)]
    pub serial: Option<SerialOutput>,
    /// Control API socket to create (mode 0600; a stale one left by a dead luvmm is
    /// replaced) [default: none, no API].
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Run each thread under its seccomp filter (on), or without (off, for debugging).
    #[arg(long, default_value = "on", value_name = "on|off")]
    pub seccomp: SeccompMode,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!("{text:?} is not a number of seconds in (0, 86400]")),
    }
}

/// Makes a path absolute against this process's directory: the VMM that receives it runs
/// elsewhere, and would otherwise resolve it against its own.
pub(crate) fn absolute_path(text: &str) -> Result<PathBuf, String> {
    std::path::absolute(text).map_err(|e| format!("{text:?}: {e}"))
}

/// Parses a flag's value with the config file's own words (the serde names), so a word means
/// the same on the command line and in JSON.
fn config_word<T: DeserializeOwned>(word: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(word.to_string())).map_err(|e| e.to_string())
}

/// `on` or `off`, for switches whose default is on.
pub fn on_off(word: &str) -> Result<bool, String> {
    match word {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: say on or off")),
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from_socket", "state", "state_fd", "session"])))]
pub struct RestoreArgs {
    /// After a host live update: claim VM ID's session (luvmm-ID) from the agent and restore
    /// from what it holds.
    #[arg(long, value_name = "VM_ID", conflicts_with_all = ["state", "state_fd", "memory_fd", "from_socket"])]
    pub session: Option<String>,
    /// The agent's socket, with --session.
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// With --session: how long to wait, in seconds, for an agent that is not listening yet.
    /// A restore started beside the agent asks KVM what it needs meanwhile.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        requires = "session"
    )]
    pub agent_wait: u64,
    /// Take the VM over from the luvmm serving this API socket (fds via SCM_RIGHTS). Its path
    /// may also be this one's --api-socket: it is taken once the source let the VM go. If
    /// this restore fails first, the VM goes back to the source, which resumes it.
    #[arg(long, conflicts_with_all = ["state", "state_fd", "memory_fd"])]
    pub from_socket: Option<PathBuf>,
    /// Saved state in a file (from `ctl save --export`).
    #[arg(long, conflicts_with = "state_fd", requires = "memory_fd")]
    pub state: Option<PathBuf>,
    /// Saved state in an inherited memfd.
    #[arg(long, requires = "memory_fd")]
    pub state_fd: Option<RawFd>,
    /// Inherited RAM memfd, once per region in layout order.
    #[arg(long)]
    pub memory_fd: Vec<RawFd>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent's socket: the one `serve` creates (mode 0600), or the one the other
    /// commands talk to.
    #[arg(long, global = true, default_value = DEFAULT_AGENT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub action: AgentAction,
}

#[derive(Debug, Subcommand)]
pub enum AgentAction {
    /// Open /dev/liveupdate, take over the previous kernel's ledger if there is one (or, for an
    /// agent started again after the kexec, the copy kept beside its socket), and serve VMMs
    /// until the kexec.
    Serve {
        /// Only when the previous kernel's ledger cannot be read: the VMs whose sessions wait
        /// in the kernel (LUO cannot list them), handed out as the ledger would have.
        #[arg(long, value_name = "VM[,VM...]", value_delimiter = ',')]
        rebuild_ledger: Vec<String>,
        /// Serve under the agent's seccomp filter (on), or without (off, for debugging).
        #[arg(long, default_value = "on", value_name = "on|off")]
        seccomp: SeccompMode,
    },
    /// Keep copies of the sessions the agent retrieves after a kexec, on the socket beside
    /// the agent's, for an agent started again (the agent starts it; it exits once it keeps
    /// nothing).
    Hold {
        /// Serve under the agent's seccomp filter (on), or without (off, for debugging).
        #[arg(long, default_value = "on", value_name = "on|off")]
        seccomp: SeccompMode,
    },
    /// Print the agent's ledger (VMs, sessions, phases and their times) as JSON.
    Status,
    /// Kexec the host into KERNEL once every subscribed VM is ready (refused otherwise).
    Update {
        /// The kernel to kexec into (a bzImage), loaded with kexec_file_load.
        #[arg(long, value_name = "FILE")]
        kernel: PathBuf,
        /// Its initramfs, if it needs one.
        #[arg(long, value_name = "FILE")]
        initrd: Option<PathBuf>,
        /// Words appended to this kernel's command line for the next one.
        #[arg(long)]
        append: Option<String>,
        /// Wait up to this many seconds for every VM to be ready, then call the update off for
        /// everyone (each VM resumes in place); without it, refuse at once if one is not.
        #[arg(long, value_name = "SECONDS")]
        deadline: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UpdateCommand {
    /// The pre-flight: blockers and warnings for an update into KERNEL, before anything is
    /// touched.
    ///
    /// Exit status: 0 the update may go, 3 it is blocked, 1 error, 2 usage.
    Check {
        #[command(flatten)]
        args: crate::preflight::CheckArgs,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The whole host's update: the pre-flight, every VM staged while its guest runs, then all
    /// prepared together, then the kexec; any failure or the deadline calls it off for every
    /// VM.
    ///
    /// Exit status: 0 the host is kexecing, 3 blocked by the pre-flight (nothing touched), 4
    /// called off with every guest back as it was, 1 failed (some guest's whereabouts unknown,
    /// or nothing could start), 2 usage.
    Run(crate::host_update::run::RunArgs),
    /// After the kexec: whether every VM of the last update is back, and when, or which is not
    /// and why (from the agent's ledger; where systemd held the sessions, from each VM's unit
    /// and VMM).
    ///
    /// Exit status: 0 every VM back (or no update on record), 3 some VM not back or an update
    /// under way, 1 the agent does not answer.
    Status {
        /// The agent's socket.
        #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
        agent_socket: PathBuf,
        /// Who held the sessions (see `update run --holder`).
        #[arg(long, value_enum, default_value_t = crate::preflight::HostHolder::Auto)]
        holder: crate::preflight::HostHolder,
        /// Where systemd held them: the VMs are those configured here (ID.json, run as
        /// luvmm@ID.service).
        #[arg(long, value_name = "DIR", default_value = VM_CONFIG_DIR)]
        vm_dir: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// After the kexec, for a VM that will not be restored: finish VM ID's session without
    /// restoring it, so that the devices it preserved can be opened again (until then the
    /// kernel refuses every normal open of them with EBUSY). Guest RAM is dropped.
    Release {
        /// The VM's id: its session is luvmm-<id>.
        #[arg(long, value_name = "VM_ID")]
        session: String,
        /// The agent's socket.
        #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
        agent_socket: PathBuf,
    },
}

/// Who holds a VM's session across a host update (`luvmm start --holder`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionHolder {
    Auto,
    Agent,
    FdStore,
}

/// Where `luvmm start` finds a VM's config when none is named.
pub const VM_CONFIG_DIR: &str = "/etc/luvmm";

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The VM's id: its session is luvmm-<id>.
    #[arg(long, value_name = "VM_ID")]
    pub vm: String,
    /// Its JSON config, for a boot [default: /etc/luvmm/<id>.json].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The agent's socket.
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// On a host with /dev/liveupdate: how long to wait, in seconds, for the agent to answer
    /// whether a session waits for the VM.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub agent_wait: u64,
    /// Who holds the VM's session across a host update: the agent; systemd's fd store of
    /// this service (systemd 261 or later, the unit with FileDescriptorStoreMax= and
    /// FileDescriptorStorePreserve=yes); or auto: the fd store where systemd preserves it
    /// and this process has one, the agent elsewhere.
    #[arg(long, value_enum, default_value_t = SessionHolder::Auto)]
    pub holder: SessionHolder,
    /// With the fd store as the holder: seconds a staged or prepared update may wait for its
    /// kexec before this VMM calls it off by itself and resumes its guest (no agent does it
    /// there, should the command driving the update die).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub update_limit: u64,
    /// Run each thread under its seccomp filter (on), or without (off, for debugging).
    #[arg(long, default_value = "on", value_name = "on|off")]
    pub seccomp: SeccompMode,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// API socket of the luvmm to talk to.
    #[arg(long)]
    pub socket: PathBuf,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    pub timeout: f64,
    #[command(subcommand)]
    pub request: CtlRequest,
}

#[derive(Debug, Subcommand)]
pub enum CtlRequest {
    /// Print the VM's phase, vCPUs and memory layout.
    Status,
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// Pause and save the state into a memfd (and a file with --export); the VM stays paused
    /// until `resume`.
    Save {
        /// Also write the state to this file, for `luvmm restore --state FILE` with the
        /// guest's RAM memfds: a regular file (replaced) or a new one; a relative path is
        /// taken from this directory. A VM with passthrough devices is restored only by a
        /// handover (`--from-socket`), which brings their fds.
        #[arg(long, value_parser = absolute_path, value_name = "FILE")]
        export: Option<PathBuf>,
    },
    /// Ask the guest (luvmm's test payload) to verify its memory and print a LUVMM-CHECK line
    /// on its serial; a paused guest answers once it is resumed.
    Check,
    /// Ask the guest (luvmm's test payload) for something through the guest-control port:
    /// check, devices (drive every passthrough device again), irq_in_flight (leave device
    /// interrupts in flight, then ask to be paused), irq_landed (check they arrived).
    Guest {
        /// check, devices, irq_in_flight or irq_landed.
        #[arg(value_parser = config_word::<GuestRequest>)]
        request: GuestRequest,
    },
    /// Stop the VMM.
    Shutdown {
        /// Also while a handover waits for its target's confirmation: the VMM exits and
        /// leaves the VM to that target, which takes it over once it sees this VMM gone.
        #[arg(long)]
        force: bool,
    },
    /// The host live update, from this VM's side.
    #[command(subcommand)]
    Update(UpdateRequest),
}

impl CtlRequest {
    /// The API action this request asks for.
    pub fn into_action(self) -> VmmAction {
        match self {
            CtlRequest::Status => VmmAction::Status,
            CtlRequest::Pause => VmmAction::Pause,
            CtlRequest::Resume => VmmAction::Resume,
            CtlRequest::Save { export } => VmmAction::Save {
                export_path: export,
            },
            CtlRequest::Check => VmmAction::Check,
            CtlRequest::Guest { request } => VmmAction::GuestRequest(request),
            CtlRequest::Shutdown { force } => VmmAction::Shutdown(ShutdownBody { force }),
            CtlRequest::Update(UpdateRequest::Stage(target)) => {
                VmmAction::StageUpdate(target.into_body())
            }
            CtlRequest::Update(UpdateRequest::Prepare(target)) => {
                VmmAction::PrepareUpdate(target.into_body())
            }
            CtlRequest::Update(UpdateRequest::Cancel) => VmmAction::CancelUpdate,
        }
    }
}

/// Which VM's update, through which agent (`ctl update stage` and `prepare`).
#[derive(Debug, Args)]
pub struct UpdateTarget {
    /// The VM's id: its session is luvmm-<id>.
    #[arg(long)]
    vm_id: String,
    /// The agent's socket (not asked by a VMM whose service keeps its session in its fd
    /// store: `luvmm start` where systemd holds the sessions).
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    agent_socket: PathBuf,
    /// Refuse, and call the update off, if a passthrough device cannot be preserved.
    #[arg(long)]
    require_preserved_devices: bool,
}

impl UpdateTarget {
    fn into_body(self) -> PrepareBody {
        PrepareBody {
            vm_id: self.vm_id,
            agent_socket: self.agent_socket,
            require_preserved_devices: self.require_preserved_devices,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum UpdateRequest {
    /// Stage the VM's update while its guest runs on: the pre-flight, its session, its RAM
    /// preserved; a later `prepare` with the same id pauses it and preserves the rest.
    Stage(UpdateTarget),
    /// Preserve the VM into its LUO session through the agent (RAM while it runs, then pause,
    /// devices, state) and tell the agent it is ready; it stays paused until the kexec.
    Prepare(UpdateTarget),
    /// Call a staged or prepared update off: the session is released and the guest runs on
    /// in place.
    Cancel,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchKind,
}

#[derive(Debug, Subcommand)]
pub enum BenchKind {
    /// Blackout of a process handover (the target built ahead while the guest runs), for
    /// several guest sizes.
    Restore {
        /// Guest payload ELF.
        #[arg(long)]
        payload: PathBuf,
        /// Guest sizes in MiB, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
        sizes: Vec<u64>,
        /// Passthrough devices per guest, one row per count: the first functions bound to
        /// vfio-pci, so more than 0 needs them (the nested bed's `edu` devices with --kernel).
        #[arg(long, value_delimiter = ',', default_value = "0")]
        devices: Vec<u32>,
        /// Measured rounds per size and device count (after one not counted); the median and
        /// the extremes are reported.
        #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u32).range(1..=999))]
        rounds: u32,
        /// Run it inside the nested bed's L1 booted from this kernel (tests/nested/kernel.sh),
        /// with as many `edu` devices as the largest count asks.
        #[arg(long, requires = "initrd")]
        kernel: Option<PathBuf>,
        /// The bed's base initramfs (tests/nested/initramfs.sh), with --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The phases of a host live update for several guest sizes and device counts: one drill
    /// in the nested bed each.
    Update(crate::bench::update::UpdateBenchArgs),
}

/// Builds the VM config from `--config` and the flags that override it.
pub fn vm_config(args: &RunArgs) -> Result<VmConfig, luvmm_resources::config::ConfigError> {
    let mut config = match &args.config {
        Some(path) => VmConfig::from_json_file(path)?,
        // One vCPU and 64 MiB; the flags below override it.
        None => VmConfig::default(),
    };
    if let Some(thp) = args.thp {
        config.memory_thp = thp;
    }
    if let Some(backend) = args.vfio_backend {
        config.vfio_backend = backend;
    }
    if args.vfio_trap_bars {
        config.vfio_bars = BarMode::Trapped;
    }
    if !args.vfio.is_empty() {
        config.vfio = args.vfio.clone();
    }
    if let Some(payload) = &args.payload {
        config.payload = payload.clone();
    }
    if let Some(mib) = args.memory_mib {
        config.memory = memory_from_mib(mib)?;
    }
    if let Some(vcpus) = args.vcpus {
        config.vcpus = vcpus;
    }
    if let Some(initrd) = &args.initrd {
        config.initrd = Some(initrd.clone());
    }
    if let Some(cmdline) = &args.cmdline {
        config.cmdline = cmdline.clone();
    }
    if let Some(template) = args.cpu_template {
        config.cpu_template = template;
    }
    if let Some(boot) = args.boot {
        config.boot = boot;
    }
    if let Some(serial) = &args.common.serial {
        config.serial = serial.clone();
    }
    if args.common.api_socket.is_some() {
        config.api_socket = args.common.api_socket.clone();
    }
    Ok(config)
}

/// Turns `restore` flags into a restore source. clap has already refused incomplete
/// combinations; the last arm is for callers that build `RestoreArgs` themselves.
pub fn restore_source(
    args: &RestoreArgs,
) -> Result<luvmm_vmm::restore::RestoreSource, luvmm_vmm::restore::RestoreError> {
    use luvmm_vmm::restore::{RestoreError, RestoreSource, StateSource};
    if let Some(socket) = &args.from_socket {
        return Ok(RestoreSource::Socket(socket.clone()));
    }
    if let Some(vm_id) = &args.session {
        return Ok(RestoreSource::Session {
            vm_id: vm_id.clone(),
            holder: luvmm_vmm::update::holder::Holder::agent(
                &args.agent_socket,
                std::time::Duration::from_secs(args.agent_wait),
            ),
        });
    }
    let state = match (&args.state, args.state_fd) {
        (Some(path), None) => StateSource::File(path.clone()),
        (None, Some(fd)) => StateSource::Fd(fd),
        _ => return Err(RestoreError::NoSource),
    };
    Ok(RestoreSource::Inherited {
        state,
        memory_fds: args.memory_fd.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctl(words: &[&str]) -> VmmAction {
        let args = ["luvmm", "ctl", "--socket", "/run/vm.sock"]
            .iter()
            .chain(words);
        match Cli::try_parse_from(args)
            .expect("a ctl command line")
            .command
        {
            Command::Ctl(args) => args.request.into_action(),
            other => panic!("not ctl: {other:?}"),
        }
    }

    #[test]
    fn each_ctl_request_asks_for_its_action_with_its_flags() {
        assert_eq!(ctl(&["status"]), VmmAction::Status);
        assert_eq!(ctl(&["update", "cancel"]), VmmAction::CancelUpdate);
        assert_eq!(
            ctl(&["update", "stage", "--vm-id", "vm1"]),
            VmmAction::StageUpdate(PrepareBody {
                vm_id: "vm1".into(),
                agent_socket: PathBuf::from(DEFAULT_AGENT_SOCKET),
                require_preserved_devices: false,
            })
        );
        assert_eq!(ctl(&["save"]), VmmAction::Save { export_path: None });
        assert_eq!(
            ctl(&["save", "--export", "/tmp/vm.state"]),
            VmmAction::Save {
                export_path: Some(PathBuf::from("/tmp/vm.state"))
            }
        );
        assert_eq!(
            ctl(&["save", "--export", "vm.state"]),
            VmmAction::Save {
                export_path: Some(std::env::current_dir().unwrap().join("vm.state"))
            },
            "nothing_lost: a relative export is the caller's, not the VMM's"
        );
        assert_eq!(
            ctl(&["shutdown", "--force"]),
            VmmAction::Shutdown(ShutdownBody { force: true })
        );
        assert_eq!(
            ctl(&["guest", "irq_in_flight"]),
            VmmAction::GuestRequest(GuestRequest::IrqInFlight)
        );
        assert_eq!(
            ctl(&[
                "update",
                "prepare",
                "--vm-id",
                "a",
                "--require-preserved-devices"
            ]),
            VmmAction::PrepareUpdate(PrepareBody {
                vm_id: "a".into(),
                agent_socket: PathBuf::from(DEFAULT_AGENT_SOCKET),
                require_preserved_devices: true,
            })
        );
    }

    #[test]
    fn seccomp_is_on_unless_turned_off_for_the_vmm_and_the_agent() {
        let parse = |words: &[&str]| Cli::try_parse_from(words).expect("a command line").command;
        let run = ["luvmm", "run", "--payload", "/p.elf"];
        let Command::Run(args) = parse(&run) else {
            panic!("not run")
        };
        assert_eq!(args.common.seccomp, SeccompMode::On);
        let Command::Run(args) = parse(&[&run[..], &["--seccomp", "off"]].concat()) else {
            panic!("not run")
        };
        assert_eq!(args.common.seccomp, SeccompMode::Off);
        let restore = ["luvmm", "restore", "--session", "vm1", "--seccomp", "off"];
        let Command::Restore(args) = parse(&restore) else {
            panic!("not restore")
        };
        assert_eq!(args.common.seccomp, SeccompMode::Off);
        for (words, mode) in [
            (&["luvmm", "agent", "serve"][..], SeccompMode::On),
            (
                &["luvmm", "agent", "serve", "--seccomp", "off"][..],
                SeccompMode::Off,
            ),
        ] {
            let Command::Agent(AgentArgs {
                action: AgentAction::Serve { seccomp, .. },
                ..
            }) = parse(words)
            else {
                panic!("not agent serve")
            };
            assert_eq!(seccomp, mode);
        }
        assert!(Cli::try_parse_from([&run[..], &["--seccomp", "maybe"]].concat()).is_err());
    }

    #[test]
    fn run_without_a_config_starts_from_the_default_vm() {
        let args = ["luvmm", "run", "--payload", "/boot/payload.elf"];
        let Command::Run(run) = Cli::try_parse_from(args)
            .expect("a run command line")
            .command
        else {
            panic!("not run");
        };
        let config = vm_config(&run).expect("a config");
        // What `--memory-mib 64` gives, so the flag and its absence agree.
        assert_eq!(config.memory, memory_from_mib(64).unwrap());
        assert_eq!(
            config,
            VmConfig {
                payload: PathBuf::from("/boot/payload.elf"),
                ..VmConfig::default()
            }
        );
    }

    #[test]
    fn huge_pages_are_on_unless_turned_off() {
        let thp = |words: &[&str]| {
            let args = [&["luvmm", "run", "--payload", "/p.elf"][..], words].concat();
            let Command::Run(run) = Cli::try_parse_from(args).expect("a command line").command
            else {
                panic!("not run")
            };
            vm_config(&run).expect("a config").memory_thp
        };
        assert!(thp(&[]));
        assert!(thp(&["--thp"]));
        assert!(thp(&["--thp", "on"]));
        assert!(!thp(&["--thp", "off"]));
        assert!(!thp(&["--thp=off"]));
        let typo = [
            &["luvmm", "run", "--payload", "/p.elf"][..],
            &["--thp", "of"],
        ]
        .concat();
        assert!(Cli::try_parse_from(typo).is_err());
    }
}
