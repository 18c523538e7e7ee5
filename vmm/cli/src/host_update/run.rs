//! `luvmm update run`: the host-wide update in one command. The pre-flight for the host and
//! every VM; every VM staged, then prepared together (`barrier.rs`); the kexec. Any failure
//! calls the update off for everyone. Progress goes to stderr as it happens; the report to
//! stdout at the end (JSON with `--json`), and the exit status says how it went
//! ([`Outcome::exit_code`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use luvmm_liveupdate::agent::ledger::now_ms;
use luvmm_liveupdate::agent::{AgentClient, DEFAULT_AGENT_SOCKET};
use luvmm_liveupdate::luo::kexec;

use crate::preflight::HostHolder;
use luvmm_resources::config::VmConfig;
use luvmm_resources::errors::error_chain;
use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::update::check::Blocker;
use serde::{Deserialize, Serialize};

use super::barrier::{stage_and_prepare, BarrierOptions, HostVm, Progress, VmRun};
use crate::cli::{absolute_path, VM_CONFIG_DIR};
use crate::preflight::{self, CheckArgs, CheckReport};

/// `luvmm update run` flags.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The next kernel's image.
    #[arg(long, value_name = "FILE")]
    pub kernel: PathBuf,
    /// The next kernel's initramfs.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Words appended to this kernel's command line for the next one.
    #[arg(long)]
    pub append: Option<String>,
    /// Seconds from the start for every VM to be prepared; after them the update is called
    /// off for everyone, each guest left as it was.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub deadline: u64,
    /// A VM to update, as ID=API_SOCKET (its session is luvmm-ID); repeatable. Added to the
    /// VMs found in --vm-dir.
    #[arg(long = "vm", value_name = "ID=SOCKET", value_parser = host_vm)]
    pub vms: Vec<HostVm>,
    /// Every VM config here (ID.json, as `luvmm start --vm ID` boots it) whose API socket
    /// answers is updated too [default: /etc/luvmm].
    #[arg(long, value_name = "DIR")]
    pub vm_dir: Option<PathBuf>,
    /// The agent's socket.
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// Who holds the sessions through the kexec: the agent (asked to kexec), or systemd (each
    /// VM's service keeps its session in its fd store; this command loads the kernel and runs
    /// `systemctl kexec`); auto: systemd where PID 1 is systemd 261 or later and no agent
    /// answers.
    #[arg(long, value_enum, default_value_t = HostHolder::Auto)]
    pub holder: HostHolder,
    /// The next kernel is known to carry the LUO file handlers this one has (the pre-flight
    /// blocks otherwise).
    #[arg(long)]
    pub known_good_kernel: bool,
    /// Call the update off if a passthrough device cannot be preserved.
    #[arg(long)]
    pub require_preserved_devices: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Draw the run's timeline into this SVG file, before the kexec is asked for (and again
    /// if the update is called off).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

fn host_vm(text: &str) -> Result<HostVm, String> {
    match text.split_once('=') {
        Some((vm, socket)) if !vm.is_empty() && !socket.is_empty() => Ok(HostVm {
            vm: vm.to_string(),
            socket: absolute_path(socket)?,
        }),
        _ => Err(format!("{text:?}: say ID=API_SOCKET")),
    }
}

/// How the update went, as the exit status tells a fleet tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every VM is prepared and the agent is kexecing: exit 0.
    Kexec,
    /// The pre-flight found a blocker; nothing was touched: exit 3.
    Blocked,
    /// Called off; every guest is back as it was, in place: exit 4.
    CalledOff,
    /// Called off, and some guest is not known to be back (see its `left`), or nothing could
    /// be started: exit 1.
    Failed,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Kexec => 0,
            Outcome::Blocked => 3,
            Outcome::CalledOff => 4,
            Outcome::Failed => 1,
        }
    }
}

/// What `update run --json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub outcome: Outcome,
    /// Why it did not go, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub kernel: PathBuf,
    pub preflight: CheckReport,
    /// When the run started, in ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Milliseconds the pre-flight took (it loads and unloads the next kernel).
    pub preflight_ms: f64,
    /// When the agent was asked for the kexec, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kexec_asked_at_ms: Option<u64>,
    /// Milliseconds the agent took to load the next kernel and answer, before its kexec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kexec_load_ms: Option<f64>,
    /// Who held the sessions: `agent` or `systemd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    pub vms: Vec<VmRun>,
}

/// Runs the update; the report, to print, and its outcome.
pub fn run(args: &RunArgs) -> RunReport {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.deadline);
    let mut report = RunReport {
        outcome: Outcome::Failed,
        reason: None,
        kernel: args.kernel.clone(),
        preflight: CheckReport::default(),
        started_at_ms: now_ms(),
        preflight_ms: 0.0,
        kexec_asked_at_ms: None,
        kexec_load_ms: None,
        holder: None,
        vms: Vec::new(),
    };
    let vms = match host_vms(args) {
        Ok(vms) if vms.is_empty() => {
            report.reason = Some(
                "no VM to update: none named with --vm, and no config in the VM directory \
                 whose API socket answers"
                    .into(),
            );
            return report;
        }
        Ok(vms) => vms,
        Err(reason) => {
            report.reason = Some(reason);
            return report;
        }
    };
    let cmdline = match args.append.as_deref().map(kexec::current_cmdline_with) {
        Some(Err(e)) => {
            report.reason = Some(error_chain(&e));
            return report;
        }
        Some(Ok(line)) => Some(line),
        None => None,
    };
    report.vms = vms.iter().map(VmRun::of).collect();
    let systemd = args.holder.is_systemd(&args.agent_socket);
    report.holder = Some(if systemd { "systemd" } else { "agent" }.to_string());
    say(&format!(
        "pre-flight: the host and {} VM(s): {}",
        vms.len(),
        vms.iter()
            .map(|v| v.vm.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.preflight = preflight::run(&CheckArgs {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: cmdline.clone(),
        append: None,
        agent_socket: args.agent_socket.clone(),
        vms: vms.iter().map(|v| v.socket.clone()).collect(),
        known_good_kernel: args.known_good_kernel,
        holder: if systemd {
            HostHolder::Systemd
        } else {
            HostHolder::Agent
        },
    });
    report.preflight_ms = start.elapsed().as_secs_f64() * 1e3;
    for w in &report.preflight.warnings {
        say(&format!("warning: {w}"));
    }
    if !report.preflight.blockers.is_empty() {
        report.outcome = Outcome::Blocked;
        report.reason = Some(Blocker::join(&report.preflight.blockers));
        draw(args, &report);
        return report;
    }
    let barrier = stage_and_prepare(
        &vms,
        &BarrierOptions {
            agent_socket: &args.agent_socket,
            require_preserved_devices: args.require_preserved_devices,
            deadline,
        },
        &tell,
    );
    report.vms = barrier.vms;
    if let Err(why) = barrier.result {
        report.reason = Some(why.to_string());
        report.outcome = if barrier.all_in_place {
            Outcome::CalledOff
        } else {
            Outcome::Failed
        };
        draw(args, &report);
        return report;
    }
    say(&format!(
        "every VM is prepared: kexec into {}",
        args.kernel.display()
    ));
    // The picture comes first: a kexec that goes ends this process.
    report.kexec_asked_at_ms = Some(now_ms());
    report.outcome = Outcome::Kexec;
    draw(args, &report);
    let asked = Instant::now();
    let kexec = if systemd {
        systemd_kexec(args, cmdline.as_deref())
    } else {
        AgentClient::new(&args.agent_socket)
            .update(
                &args.kernel,
                args.initrd.as_deref(),
                cmdline.as_deref(),
                None,
            )
            .map_err(|e| format!("the agent did not kexec: {}", error_chain(&e)))
    };
    match kexec {
        Ok(()) => report.kexec_load_ms = Some(asked.elapsed().as_secs_f64() * 1e3),
        Err(reason) => {
            // The kernel did not load or the kexec was refused: the update is off for everyone.
            tell(Progress::CallingOff { reason: &reason });
            report.reason = Some(reason);
            let in_place = super::barrier::call_off_all(&mut report.vms, &tell);
            report.outcome = if in_place {
                Outcome::CalledOff
            } else {
                Outcome::Failed
            };
            draw(args, &report);
        }
    }
    report
}

/// With systemd holding the sessions: loads the next kernel, then asks systemd to kexec into
/// it. systemd stops the VMs' services (each VM is prepared: its session, in its fd store,
/// has everything), preserves the fd stores and kexecs.
fn systemd_kexec(args: &RunArgs, cmdline: Option<&str>) -> Result<(), String> {
    let line = match cmdline {
        Some(line) => line.to_string(),
        None => kexec::current_cmdline().map_err(|e| error_chain(&e))?,
    };
    kexec::load(&args.kernel, args.initrd.as_deref(), Some(&line))
        .map_err(|e| format!("the next kernel did not load: {}", error_chain(&e)))?;
    let status = std::process::Command::new("systemctl")
        .arg("kexec")
        .status()
        .map_err(|e| format!("cannot run systemctl kexec: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        if let Err(e) = kexec::unload() {
            say(&format!("the loaded kernel did not unload: {e}"));
        }
        Err(format!("systemctl kexec failed ({status})"))
    }
}

/// Writes the timeline with `--svg`; a failure to is said, and changes nothing else.
fn draw(args: &RunArgs, report: &RunReport) {
    if let Some(path) = &args.svg {
        if let Err(e) = std::fs::write(path, report.to_svg()) {
            say(&format!("cannot write {}: {e}", path.display()));
        }
    }
}

/// The VMs to update: those named, then those whose config is in the VM directory and whose
/// API socket answers, each id once.
fn host_vms(args: &RunArgs) -> Result<Vec<HostVm>, String> {
    let mut vms = args.vms.clone();
    let dir = args
        .vm_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(VM_CONFIG_DIR));
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        // No such directory: only the VMs named.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && args.vm_dir.is_none() => {
            return Ok(vms)
        }
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut configs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    configs.sort();
    for path in configs {
        let Some(vm) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if vms.iter().any(|v| v.vm == vm) {
            continue;
        }
        match running_socket(&path) {
            Ok(socket) => vms.push(HostVm {
                vm: vm.to_string(),
                socket,
            }),
            Err(why) => say(&format!("{vm}: left out: {why}")),
        }
    }
    Ok(vms)
}

/// The API socket of the VM booted from the config at `path`, if its VMM answers on it.
fn running_socket(path: &Path) -> Result<PathBuf, String> {
    let config = VmConfig::from_json_file(path).map_err(|e| error_chain(&e))?;
    let socket = config
        .api_socket
        .ok_or_else(|| format!("{} names no api_socket", path.display()))?;
    VmmClient::new(&socket)
        .with_timeout(Duration::from_secs(5))
        .status()
        .map_err(|e| format!("not running ({})", error_chain(&e)))?;
    Ok(socket)
}

/// A line of progress on stderr.
fn say(line: &str) {
    eprintln!("update run: {line}");
}

fn tell(progress: Progress<'_>) {
    match progress {
        Progress::Staged(run) => {
            let ms = run
                .stage
                .as_ref()
                .and_then(|s| s.phases_ms.get("preserve_ram").copied())
                .unwrap_or_default();
            let mib = run.stage.as_ref().map(|s| s.ram_mib).unwrap_or_default();
            say(&format!(
                "{}: staged: {mib} MiB of RAM preserved in {ms:.1} ms; the guest runs on",
                run.vm
            ));
        }
        Progress::Prepared(run) => {
            let paused: f64 = run
                .prepare
                .as_ref()
                .map(|p| {
                    p.phases_ms
                        .iter()
                        .filter(|(phase, _)| phase.as_str() != "preserve_ram")
                        .map(|(_, ms)| ms)
                        .sum()
                })
                .unwrap_or_default();
            say(&format!(
                "{}: prepared: paused, devices and state preserved in {paused:.1} ms",
                run.vm
            ));
        }
        Progress::Preparing(_) => {}
        Progress::Failed(run) => say(&format!(
            "{}: failed: {}",
            run.vm,
            run.error.as_deref().unwrap_or("")
        )),
        Progress::CallingOff { reason } => {
            say(&format!("calling the update off for every VM: {reason}"))
        }
        Progress::LeftInPlace(run) => say(&format!(
            "{}: called off, the guest is {}",
            run.vm,
            run.left.as_deref().unwrap_or("unknown")
        )),
    }
}

impl RunReport {
    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for b in &self.preflight.blockers {
            text.push_str(&format!("blocker: {b}\n"));
        }
        for vm in &self.vms {
            let step = |key: &str| vm.times_ms.get(key).copied();
            let span = |from: &str, to: &str| match (step(from), step(to)) {
                (Some(a), Some(b)) => format!("{} ms", b.saturating_sub(a)),
                _ => "-".into(),
            };
            text.push_str(&format!(
                "{}: stage {}, prepare {}{}\n",
                vm.vm,
                span("stage", "staged"),
                span("prepare", "prepared"),
                vm.left
                    .as_ref()
                    .map(|left| format!(", called off: {left}"))
                    .unwrap_or_default()
            ));
        }
        text.push_str(&self.verdict_line());
        text.push('\n');
        text
    }

    /// The outcome in a line, with its reason.
    pub fn verdict_line(&self) -> String {
        let verdict = match self.outcome {
            Outcome::Kexec => format!(
                "every VM prepared ({}); the host is kexecing",
                self.vms.len()
            ),
            Outcome::Blocked => "blocked by the pre-flight; nothing was touched".to_string(),
            Outcome::CalledOff => "called off; every guest is back as it was".to_string(),
            Outcome::Failed => "failed".to_string(),
        };
        match &self.reason {
            Some(reason) => format!("luvmm update run: {verdict} ({reason})"),
            None => format!("luvmm update run: {verdict}"),
        }
    }
}
