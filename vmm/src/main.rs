//! `luvmm`: see `luvmm --help`.

use std::process::ExitCode;

use clap::Parser;
use luvmm_liveupdate::agent::{Agent, AgentClient};
use luvmm_vmm::api::{client, error_chain};
use luvmm_vmm::cli::{AgentAction, Cli, Command, CtlRequest, UpdateCommand, UpdateRequest};
use luvmm_vmm::{bench, builder, drill, host_check, logger, restore, runtime, update, vstate};

fn main() -> ExitCode {
    logger::init();
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("luvmm: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<ExitCode, String> {
    let chain = |e: &dyn std::error::Error| error_chain(e);
    match command {
        Command::Run(args) => {
            let config = luvmm_vmm::cli::vm_config(&args).map_err(|e| chain(&e))?;
            let kvm = vstate::vm::open_kvm().map_err(|e| chain(&e))?;
            vstate::vcpu::register_kick_signal().map_err(|e| chain(&e))?;
            let vmm = builder::build_for_boot(&kvm, &config).map_err(|e| chain(&e))?;
            finish(runtime::run(vmm, config.api_socket.as_deref(), || {}))
        }
        Command::Restore(args) => {
            let source = luvmm_vmm::cli::restore_source(&args).map_err(|e| chain(&e))?;
            let serial = args.common.serial.clone().unwrap_or_default();
            let (inputs, session) = restore::collect(source, serial).map_err(|e| chain(&e))?;
            let kvm = vstate::vm::open_kvm().map_err(|e| chain(&e))?;
            vstate::vcpu::register_kick_signal().map_err(|e| chain(&e))?;
            let mut vmm = builder::build_from_saved(&kvm, inputs).map_err(|e| chain(&e))?;
            if let Some(session) = session {
                // Everything is retrieved and rebuilt: the kernel may let go of the session.
                let finish_ms =
                    update::finish::finish_session(session.as_ref()).map_err(|e| chain(&e))?;
                vmm.record_finish(finish_ms);
            }
            if let Some(socket) = &args.from_socket {
                restore::complete_handover(socket).map_err(|e| chain(&e))?;
            }
            log::info!("restored; resuming");
            // After a live update the agent learns the VM is done once its guest runs again.
            let tell_agent = || {
                if let Some(vm_id) = &args.session {
                    update::finish::report_finished(&AgentClient::new(&args.agent_socket), vm_id);
                }
            };
            finish(runtime::run(
                vmm,
                args.common.api_socket.as_deref(),
                tell_agent,
            ))
        }
        Command::Ctl(args) => {
            let (method, path, body) = match &args.request {
                CtlRequest::Status => ("GET", "/vm", None),
                CtlRequest::Pause => ("PUT", "/vm/pause", None),
                CtlRequest::Resume => ("PUT", "/vm/resume", None),
                CtlRequest::Check => ("PUT", "/vm/check", None),
                CtlRequest::Guest { request } => (
                    "PUT",
                    "/vm/guest-request",
                    Some(serde_json::json!({ "request": request }).to_string()),
                ),
                CtlRequest::Shutdown => ("PUT", "/vm/shutdown", None),
                CtlRequest::Update(UpdateRequest::Prepare {
                    vm_id,
                    agent_socket,
                    require_preserved_devices,
                }) => (
                    "PUT",
                    "/vm/update/prepare",
                    Some(
                        serde_json::json!({
                            "vm_id": vm_id,
                            "agent_socket": agent_socket,
                            "require_preserved_devices": require_preserved_devices,
                        })
                        .to_string(),
                    ),
                ),
                CtlRequest::Update(UpdateRequest::Cancel) => ("PUT", "/vm/update/cancel", None),
                CtlRequest::Save { export } => (
                    "PUT",
                    "/vm/save",
                    Some(serde_json::json!({ "export_path": export }).to_string()),
                ),
            };
            let reply = client::request(
                &args.socket,
                method,
                path,
                body.as_deref(),
                std::time::Duration::from_secs_f64(args.timeout),
            )
            .map_err(|e| chain(&e))?;
            if !reply.is_success() {
                return Err(format!(
                    "{} {}: {} {}",
                    method, path, reply.status, reply.body
                ));
            }
            if !reply.body.is_empty() {
                println!("{}", reply.body);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => match args.action {
            AgentAction::Serve => {
                let agent = Agent::start().map_err(|e| chain(&e))?;
                agent.serve(&args.socket).map_err(|e| chain(&e))?;
                Ok(ExitCode::SUCCESS)
            }
            AgentAction::Update {
                kernel,
                initrd,
                append,
                deadline,
            } => {
                let cmdline = append
                    .map(|words| luvmm_liveupdate::kexec::current_cmdline_with(&words))
                    .transpose()
                    .map_err(|e| chain(&e))?;
                AgentClient::new(&args.socket)
                    .update(
                        &kernel,
                        initrd.as_deref(),
                        cmdline.as_deref(),
                        deadline.map(std::time::Duration::from_secs),
                    )
                    .map_err(|e| chain(&e))?;
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
                let ledger = AgentClient::new(&args.socket)
                    .status()
                    .map_err(|e| chain(&e))?;
                let text = serde_json::to_string(&ledger).map_err(|e| e.to_string())?;
                println!("{text}");
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Update(UpdateCommand::Check { args, json }) => {
            let report = update::check::run(&args);
            if json {
                let text = serde_json::to_string(&report).map_err(|e| e.to_string())?;
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
            let report = update::release::release(&session, &AgentClient::new(&agent_socket))
                .map_err(|e| chain(&e))?;
            let text = serde_json::to_string(&report).map_err(|e| e.to_string())?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Drill(args) => {
            let report = drill::run(&args).map_err(|e| chain(&e))?;
            if args.json {
                let text = serde_json::to_string(&report).map_err(|e| e.to_string())?;
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
        Command::Bench(args) => bench::run(args)
            .map(|_| ExitCode::SUCCESS)
            .map_err(|e| chain(&e)),
        Command::HostCheck { json } => {
            let report = host_check::run();
            if json {
                let text = serde_json::to_string(&report).map_err(|e| e.to_string())?;
                println!("{text}");
            } else {
                print!("{}", report.to_text());
            }
            Ok(ExitCode::from(report.verdict.exit_code()))
        }
    }
}

fn finish(result: Result<runtime::Ending, runtime::RuntimeError>) -> Result<ExitCode, String> {
    match result {
        Ok(runtime::Ending::Shutdown) => Ok(ExitCode::SUCCESS),
        Ok(runtime::Ending::GuestStopped) => Err("the guest stopped on its own".into()),
        Err(e) => Err(error_chain(&e)),
    }
}
