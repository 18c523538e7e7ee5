//! `luvmm`: see `luvmm --help`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use luvmm::cli::{self, AgentAction, Cli, Command, UpdateCommand};
use luvmm::{bench, drill};
use luvmm_liveupdate::agent::{holder, Agent, AgentClient, AgentClientError, AgentError};
use luvmm_liveupdate::fdstore::{FdStore, FdStoreError};
use luvmm_liveupdate::luo::kexec::KexecError;
use luvmm_resources::config::{ConfigError, LaunchRecord, SerialOutput};
use luvmm_resources::errors::error_chain;
use luvmm_vmm::api::client::{ClientError, VmmClient};
use luvmm_vmm::api::server::{ApiSocket, ApiSocketError};
use luvmm_vmm::api::{Endpoint, VmmAction};
use luvmm_vmm::builder::BuildError;
use luvmm_vmm::outputs::{self, OutputError};
use luvmm_vmm::restore::{RestoreError, RestoreSource};
use luvmm_vmm::runtime::RuntimeError;
use luvmm_vmm::seccomp::{self, SeccompError, SeccompMode, ThreadKind};
use luvmm_vmm::takeover::{self, TakeoverError, VmFate};
use luvmm_vmm::update::before_claim::{launch_record, wait_for_agent, BeforeClaim};
use luvmm_vmm::update::finish::FinishError;
use luvmm_vmm::update::holder::Holder;
use luvmm_vmm::update::release::ReleaseError;
use luvmm_vmm::vmm::{VmPhase, Vmm};
use luvmm_vmm::vstate::vm::VmError;
use luvmm_vmm::{builder, host_check, logger, restore, runtime, update, vstate};

/// Why a command failed. Every exit status other than 1 comes from a report (`update check`,
/// `host-check`, a failed drill) or from clap (2, usage), never from here.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot find this program, to start the agent's holder with it")]
    SelfExe(#[source] std::io::Error),
    #[error("cannot build the VM config")]
    Config(#[from] ConfigError),
    #[error("--holder fd-store")]
    FdStore(#[from] FdStoreError),
    #[error("the VMs' configs: {0}")]
    VmDir(String),
    #[error("cannot use KVM")]
    Kvm(#[from] VmError),
    #[error("cannot block SIGINT and SIGTERM for the event loop")]
    Signals(#[source] nix::Error),
    #[error("cannot install the vCPU kick signal")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot build the VM")]
    Build(#[from] BuildError),
    #[error("cannot restore the VM")]
    Restore(#[from] RestoreError),
    #[error("cannot serve the API")]
    ApiSocket(#[from] ApiSocketError),
    /// A restore from a handover failed before it confirmed: the VM is the source's.
    #[error("cannot take the VM over; {fate}")]
    NotTaken {
        fate: VmFate,
        #[source]
        source: Box<CommandError>,
    },
    #[error("cannot take the VM over")]
    Takeover(#[from] TakeoverError),
    #[error("refused before anything was taken")]
    Outputs(#[from] OutputError),
    #[error("the VM's event loop failed")]
    Runtime(#[from] RuntimeError),
    #[error("the guest stopped on its own")]
    GuestStopped,
    #[error("cannot reach the VMM")]
    Api(#[from] ClientError),
    /// The VMM answered, and said no.
    #[error("{endpoint}: {status} {body}")]
    Refused {
        endpoint: Endpoint,
        status: u16,
        body: String,
    },
    #[error("the agent failed")]
    Agent(#[from] AgentError),
    #[error("cannot compose the next kernel's command line")]
    Cmdline(#[from] KexecError),
    #[error("the agent request failed")]
    AgentRequest(#[from] AgentClientError),
    #[error("cannot release the session")]
    Release(#[from] ReleaseError),
    #[error("cannot finish the session")]
    Finish(#[from] FinishError),
    #[error("cannot encode the report as JSON")]
    Json(#[from] serde_json::Error),
    #[error("the drill could not run")]
    Drill(#[from] drill::DrillError),
    #[error("the benchmark could not run")]
    Bench(#[from] bench::BenchError),
}

fn main() -> ExitCode {
    logger::init();
    let cli = Cli::parse();
    // A VM's devices bring an eventfd per MSI-X vector, twice over while it is handed over.
    if let Err(e) = luvmm_liveupdate::unix::raise_fd_limit() {
        log::warn!("cannot raise the open-file limit: {e}");
    }
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("luvmm: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<ExitCode, CommandError> {
    match command {
        Command::Run(args) => run(&args, None),
        Command::Restore(args) => restore(&args, None),
        Command::Start(args) => start(args),
        Command::Ctl(args) => {
            let client =
                VmmClient::new(&args.socket).with_timeout(Duration::from_secs_f64(args.timeout));
            let action = args.request.into_action();
            let reply = client.send(&action)?;
            if !reply.is_success() {
                return Err(CommandError::Refused {
                    endpoint: action.endpoint(),
                    status: reply.status,
                    body: reply.body,
                });
            }
            if !reply.body.is_empty() {
                println!("{}", reply.body);
            }
            say_where_it_waits(&client, &action);
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => match args.action {
            AgentAction::Serve {
                rebuild_ledger,
                seccomp,
            } => {
                // Where systemd holds the sessions the agent must not hold /dev/liveupdate:
                // LUO admits one opener, and systemd needs it at the kexec and at boot.
                if let host_check::SessionHolder::Systemd { version } =
                    host_check::SessionHolder::of_host()
                {
                    log::warn!(
                        "systemd {version} holds the VMs' sessions on this host (each luvmm@ \
                         service's fd store); the agent is not needed and does not start"
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                seccomp::init(seccomp)?;
                let agent = Agent::start(
                    &args.socket,
                    &rebuild_ledger,
                    holder_command(&args.socket, seccomp)?,
                )?;
                // Before the agent creates its socket and serves its first client.
                seccomp::apply(ThreadKind::Agent, "luvmm-agent")?;
                agent.serve()?;
                Ok(ExitCode::SUCCESS)
            }
            AgentAction::Hold { seccomp } => {
                seccomp::init(seccomp)?;
                // The agent's filter: the holder makes a subset of the agent's calls.
                seccomp::apply(ThreadKind::Agent, "luvmm-agent-holder")?;
                holder::hold(&holder::holder_socket(&args.socket))?;
                Ok(ExitCode::SUCCESS)
            }
            AgentAction::Update {
                kernel,
                initrd,
                append,
                deadline,
            } => {
                let cmdline = append
                    .map(|words| luvmm_liveupdate::luo::kexec::current_cmdline_with(&words))
                    .transpose()?;
                AgentClient::new(&args.socket).update(
                    &kernel,
                    initrd.as_deref(),
                    cmdline.as_deref(),
                    deadline.map(Duration::from_secs),
                )?;
                match deadline {
                    None => println!("the agent is kexecing into {}", kernel.display()),
                    Some(s) => println!(
                        "the agent kexecs into {} once every VM is ready, or calls the update \
                         off in {s} s",
                        kernel.display()
                    ),
                }
                Ok(ExitCode::SUCCESS)
            }
            AgentAction::Status => {
                let ledger = AgentClient::new(&args.socket).status()?;
                let text = serde_json::to_string(&ledger)?;
                println!("{text}");
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Update(UpdateCommand::Run(args)) => {
            let report = luvmm::host_update::run::run(&args);
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(ExitCode::from(report.outcome.exit_code()))
        }
        Command::Update(UpdateCommand::Status {
            agent_socket,
            holder,
            vm_dir,
            json,
        }) => {
            use luvmm::host_update::status_systemd;
            let report = if holder.is_systemd(&agent_socket) {
                let vms = status_systemd::configured_vms(&vm_dir).map_err(CommandError::VmDir)?;
                status_systemd::gather(&vms, &status_systemd::Host)
            } else {
                let ledger = AgentClient::new(&agent_socket).status()?;
                luvmm::host_update::status::gather(&ledger)
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(ExitCode::from(report.verdict.exit_code()))
        }
        Command::Update(UpdateCommand::Check { args, json }) => {
            let report = luvmm::preflight::run(&args);
            if json {
                let text = serde_json::to_string(&report)?;
                println!("{text}");
            } else {
                print!("{}", report.to_text());
            }
            Ok(ExitCode::from(report.exit_code()))
        }
        Command::Update(UpdateCommand::Release {
            session,
            agent_socket,
        }) => {
            let report = update::release::release(&session, &AgentClient::new(&agent_socket))?;
            let text = serde_json::to_string(&report)?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Drill(args) => {
            let report = drill::run(&args)?;
            if args.json {
                let text = serde_json::to_string(&report)?;
                println!("{text}");
            } else {
                print!("{}", report.to_table());
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::DrillL1 { stage } => {
            drill::rehearsal::run(stage);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            bench::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::HostCheck { json } => {
            let report = host_check::run();
            if json {
                let text = serde_json::to_string(&report)?;
                println!("{text}");
            } else {
                print!("{}", report.to_text());
            }
            Ok(ExitCode::from(report.verdict.exit_code()))
        }
    }
}

/// `luvmm run`.
fn run(args: &cli::RunArgs, fd_store: Option<FdStore>) -> Result<ExitCode, CommandError> {
    seccomp::init(args.common.seccomp)?;
    let config = cli::vm_config(args)?;
    let serial = outputs::open_outputs(&config.serial, config.api_socket.as_deref())?;
    runtime::block_exit_signals().map_err(CommandError::Signals)?;
    let kvm = vstate::vm::open_kvm()?;
    vstate::vcpu::register_kick_signal().map_err(CommandError::KickSignal)?;
    let mut vmm = builder::build_for_boot(&kvm, &config, serial)?;
    vmm.set_launch(LaunchRecord::new(
        &config.serial,
        config.api_socket.as_deref(),
    ));
    if let Some(store) = fd_store {
        vmm.set_fd_store(store);
    }
    let api = config
        .api_socket
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()?;
    let _console = outputs::RawConsole::enter(&config.serial);
    finish(runtime::run(vmm, api, || {}))
}

/// `luvmm start`: VM `vm` restored from its session when one waits for it (after a host
/// live update), booted from its config otherwise. Where systemd holds the session (its fd
/// store, see `--holder`), it passed the session at start if one waits. Elsewhere, on a host
/// without /dev/liveupdate no session can wait; on one with it, the agent must answer, or the
/// unit fails and is tried again: booting afresh a VM whose session waits would run it twice.
fn start(args: cli::StartArgs) -> Result<ExitCode, CommandError> {
    let fd_store = session_fd_store(args.holder)?
        .map(|store| store.with_update_limit(Duration::from_secs(args.update_limit)));
    let waits = if let Some(store) = &fd_store {
        store.session_waits()
    } else if Path::new(luvmm_liveupdate::luo::DEVICE_PATH).exists() {
        let agent = AgentClient::new(&args.agent_socket);
        let wait = Duration::from_secs(args.agent_wait);
        let ledger =
            wait_for_agent(&agent, &args.agent_socket, wait).map_err(RestoreError::from)?;
        ledger.session_waits(&args.vm)
    } else {
        false
    };
    let common = cli::CommonArgs {
        serial: None,
        api_socket: None,
        seccomp: args.seccomp,
    };
    if waits {
        log::info!(
            "VM {}: its session waits after a host update; restoring it",
            args.vm
        );
        return restore(
            &cli::RestoreArgs {
                session: Some(args.vm),
                agent_socket: args.agent_socket,
                agent_wait: args.agent_wait,
                from_socket: None,
                state: None,
                state_fd: None,
                memory_fd: Vec::new(),
                common,
            },
            fd_store,
        );
    }
    let config = args
        .config
        .unwrap_or_else(|| Path::new(cli::VM_CONFIG_DIR).join(format!("{}.json", args.vm)));
    log::info!(
        "VM {}: no session waits for it; booting it from {}",
        args.vm,
        config.display()
    );
    run(
        &cli::RunArgs {
            config: Some(config),
            payload: None,
            initrd: None,
            memory_mib: None,
            vcpus: None,
            cmdline: None,
            boot: None,
            cpu_template: None,
            vfio: Vec::new(),
            vfio_trap_bars: false,
            vfio_backend: None,
            thp: None,
            common,
        },
        fd_store,
    )
}

/// The fd store `luvmm start` holds the VM's session in, as `--holder` asks: `auto` takes it
/// where PID 1 is a systemd that preserves fd stores and this service has one.
fn session_fd_store(holder: cli::SessionHolder) -> Result<Option<FdStore>, CommandError> {
    use luvmm_liveupdate::fdstore::{host_systemd, preserves_fd_stores};
    match holder {
        cli::SessionHolder::Agent => Ok(None),
        cli::SessionHolder::FdStore => Ok(Some(FdStore::from_env()?)),
        cli::SessionHolder::Auto => {
            if !preserves_fd_stores(host_systemd()) {
                return Ok(None);
            }
            match FdStore::from_env() {
                Ok(store) => Ok(Some(store)),
                Err(e) => {
                    log::warn!("{e}; the agent holds the VM's session");
                    Ok(None)
                }
            }
        }
    }
}

/// How the agent starts its holder: this program, `agent hold`, on the agent's socket and
/// with the agent's seccomp mode.
fn holder_command(socket: &Path, mode: SeccompMode) -> Result<std::process::Command, CommandError> {
    let program = std::env::current_exe().map_err(CommandError::SelfExe)?;
    let mut command = std::process::Command::new(program);
    command
        .arg("agent")
        .arg("--socket")
        .arg(socket)
        .arg("hold")
        .arg("--seccomp");
    command.arg(match mode {
        SeccompMode::On => "on",
        SeccompMode::Off => "off",
    });
    Ok(command)
}

/// `luvmm restore`. Everything that can fail is done before a handover is confirmed (or a
/// session finished): the API socket bound beside its path, the VM rebuilt. A restore from a
/// handover that fails says where the VM is; once it asked for the VM, it gives it back first.
fn restore(args: &cli::RestoreArgs, fd_store: Option<FdStore>) -> Result<ExitCode, CommandError> {
    seccomp::init(args.common.seccomp)?;
    // The session's holder after a kexec: the fd store `luvmm start` passes, else the agent.
    let holder = match (&fd_store, &args.session) {
        (Some(store), Some(_)) => Some(Holder::FdStore(store.clone())),
        (None, Some(_)) => Some(Holder::agent(
            &args.agent_socket,
            Duration::from_secs(args.agent_wait),
        )),
        (_, None) => None,
    };
    // What can fail before the VM's holder is asked for anything.
    let prepare = || -> Result<_, CommandError> {
        let source = match (cli::restore_source(args)?, &holder) {
            (RestoreSource::Session { vm_id, .. }, Some(holder)) => RestoreSource::Session {
                vm_id,
                holder: holder.clone(),
            },
            (source, _) => source,
        };
        // After a kexec, what the flags name is refused at once, before anything waits for
        // the agent; other restores open their outputs once, below.
        let session = matches!(source, RestoreSource::Session { .. });
        if session && (args.common.serial.is_some() || args.common.api_socket.is_some()) {
            let serial = args.common.serial.clone().unwrap_or(SerialOutput::Discard);
            let api_path = args.common.api_socket.as_deref();
            match &args.from_socket {
                Some(from) => drop(outputs::open_outputs_replacing(&serial, api_path, from)?),
                None => drop(outputs::open_outputs(&serial, api_path)?),
            }
        }
        runtime::block_exit_signals().map_err(CommandError::Signals)?;
        let kvm = vstate::vm::open_kvm()?;
        // After a kexec: KVM asked and the VM made while the agent may still be starting;
        // then what the VM's VMM was launched with, for what no flag says.
        let (before, recorded) = match &source {
            RestoreSource::Session { vm_id, holder } => {
                let mut before = BeforeClaim::make(&kvm).map_err(RestoreError::from)?;
                let ledger = holder.ledger().map_err(RestoreError::from)?;
                let recorded = launch_record(&ledger, vm_id)
                    .map_err(RestoreError::from)?
                    .unwrap_or_default();
                if let Some(vcpus) = recorded.vcpus {
                    before.make_vcpus(vcpus).map_err(RestoreError::from)?;
                }
                (Some(before), recorded)
            }
            _ => (None, LaunchRecord::default()),
        };
        let serial_to = args.common.serial.clone().unwrap_or(recorded.serial);
        let api_path = args.common.api_socket.clone().or(recorded.api_socket);
        let launch = LaunchRecord::new(&serial_to, api_path.as_deref());
        // A session is claimed once: what this process will write to is opened first.
        let serial = match &args.from_socket {
            Some(from) => outputs::open_outputs_replacing(&serial_to, api_path.as_deref(), from)?,
            None => outputs::open_outputs(&serial_to, api_path.as_deref())?,
        };
        let api = api_path.as_deref().map(ApiSocket::bind_aside).transpose()?;
        Ok((source, serial, kvm, api, before, launch))
    };
    let rebuild = |(source, serial, kvm, api, before, launch)| -> Result<_, CommandError> {
        // From a running VMM: its KVM VM and memslots are built here while it runs on.
        let shell = match &source {
            RestoreSource::Socket(from) => Some(restore::build_ahead(from, &kvm)?),
            _ => None,
        };
        let (inputs, session, takeover) = restore::collect(source, serial, &kvm, before)?;
        let built = (|| {
            vstate::vcpu::register_kick_signal().map_err(CommandError::KickSignal)?;
            let mut vmm: Vmm = match shell {
                Some(shell) => builder::build_on_shell(&kvm, shell, inputs)?,
                None => builder::build_from_saved(&kvm, inputs)?,
            };
            if let Some(session) = &session {
                // Everything is retrieved and rebuilt: the kernel may let go of the session.
                vmm.record_finish(update::finish::finish_session(session.as_ref())?);
            }
            // For the next update of this VM.
            vmm.set_launch(launch);
            if let Some(store) = &fd_store {
                vmm.set_fd_store(store.clone());
            }
            Ok::<_, CommandError>(vmm)
        })();
        match (built, &args.session) {
            (Ok(vmm), _) => Ok((vmm, api, takeover)),
            // After the claim: the agent keeps the session for the next restore.
            (Err(e), Some(vm_id)) if session.is_some() => {
                if let Some(holder) = &holder {
                    update::finish::report_failed(holder.client().as_ref(), vm_id, &e);
                }
                Err(e)
            }
            (Err(e), _) => Err(e),
        }
    };
    let rebuilt = match prepare() {
        Ok(prepared) => rebuild(prepared).map_err(|e| (e, true)),
        Err(e) => Err((e, false)),
    };
    let (vmm, mut api, takeover) = match (rebuilt, &args.from_socket) {
        (Ok(rebuilt), _) => rebuilt,
        (Err((e, asked)), Some(from)) => {
            let fate = if asked {
                takeover::give_back(from)
            } else {
                takeover::whereabouts(from)
            };
            return Err(CommandError::NotTaken {
                fate,
                source: Box::new(e),
            });
        }
        (Err((e, _)), None) => return Err(e),
    };
    if let Some(takeover) = takeover {
        let how = takeover.confirm()?;
        log::info!("took the VM over ({how:?})");
    }
    // The VM is this process's now: a socket that cannot move stays reachable where it is.
    if let Some(api) = &mut api {
        if let Err(e) = api.place(args.from_socket.as_deref()) {
            log::error!("{}; the API stays at its temporary name", error_chain(&e));
        }
    }
    log::info!("restored; resuming");
    // After a live update the agent learns the VM is done once its guest runs again.
    let tell_agent = || {
        if let (Some(vm_id), Some(holder)) = (&args.session, &holder) {
            update::finish::report_finished(holder.client().as_ref(), vm_id);
        }
    };
    let serial_to = vmm.launched_with().map(|l| l.serial.clone());
    let _console = outputs::RawConsole::enter(&serial_to.unwrap_or_default());
    finish(runtime::run(vmm, api, tell_agent))
}

/// After a `ctl` request, what its reply leaves unsaid: a request to the guest while the VM is
/// paused waits for the resume; a VM handed over runs in another process.
fn say_where_it_waits(client: &VmmClient, action: &VmmAction) {
    let to_guest = matches!(action, VmmAction::Check | VmmAction::GuestRequest(_));
    if !to_guest && !matches!(action, VmmAction::Status) {
        return;
    }
    let Ok(status) = client.status() else {
        return;
    };
    match (status.phase, status.moved_to_pid) {
        (VmPhase::Paused | VmPhase::HandingOver | VmPhase::Preserved, _) if to_guest => {
            eprintln!("the VM is paused: the guest answers once it is resumed");
        }
        (VmPhase::HandedOver, Some(pid)) => {
            eprintln!("the VM was handed over: it runs in process {pid} now, not in this luvmm");
        }
        (VmPhase::HandedOver, None) => {
            eprintln!("the VM was handed over: it runs in another process now, not in this luvmm");
        }
        _ => {}
    }
}

/// The exit status when the guest rebooted itself (0 when it powered off).
const EXIT_GUEST_RESET: u8 = 3;

fn finish(result: Result<runtime::Ending, RuntimeError>) -> Result<ExitCode, CommandError> {
    match result? {
        runtime::Ending::Shutdown | runtime::Ending::GuestPoweredOff => Ok(ExitCode::SUCCESS),
        runtime::Ending::GuestReset => Ok(ExitCode::from(EXIT_GUEST_RESET)),
        runtime::Ending::GuestStopped => Err(CommandError::GuestStopped),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn a_failed_step_prints_its_context_then_each_cause_once() {
        let e = CommandError::from(ClientError::Connect {
            path: PathBuf::from("/run/vm.sock"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        let text = error_chain(&e);
        assert_eq!(
            text,
            "cannot reach the VMM: cannot connect to /run/vm.sock: entity not found"
        );
    }

    #[test]
    fn a_refusal_names_the_request_and_the_reply() {
        let e = CommandError::Refused {
            endpoint: Endpoint::Pause,
            status: 409,
            body: "{\"error\":\"wrong phase\"}".into(),
        };
        assert_eq!(
            error_chain(&e),
            "PUT /vm/pause: 409 {\"error\":\"wrong phase\"}"
        );
    }
}
