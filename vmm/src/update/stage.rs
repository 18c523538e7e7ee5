//! Before the pause, the guest running: everything of a prepare that does not need the guest
//! stopped.
//!
//! 1. The VM's part of the pre-flight (`check.rs`). A refusal here has touched nothing.
//! 2. Subscribe to the agent (it creates session `luvmm-<vm id>` and keeps a copy).
//! 3. Preserve every RAM memfd. PRESERVE_FD pins and fills every page, which must not be in
//!    the blackout; the guest writes on into the preserved pages.
//!
//! A staged VM runs on, holding its session, until the prepare (`prepare.rs`) pauses it or a
//! cancel releases it. `luvmm update run` stages every VM of the host first and only then
//! prepares them together, so that no VM's blackout holds another VM's RAM preserve.
//!
//! A failure calls the update off (`cancel.rs`) and the guest runs on.

use std::collections::BTreeMap;
use std::time::Instant;

use luvmm_liveupdate::agent::ledger::now_ms;
use luvmm_liveupdate::seams::UpdateAgent;
use luvmm_resources::errors::error_chain;
use luvmm_resources::state::RAM_TOKEN_BASE;
use serde::{Deserialize, Serialize};

use crate::update::cancel::call_off;
use crate::update::check::check_vm;
use crate::update::prepare::PrepareOptions;
use crate::update::vm::UpdateVm;
use crate::update::UpdateError;
use crate::vmm::{PreparedUpdate, VmPhase, VmmError};

/// What the stage did, kept with the update for the prepare's report and the saved state.
#[derive(Clone, Debug, Default)]
pub struct Staged {
    /// When the stage began, in ms since the Unix epoch.
    pub at_ms: u64,
    /// How long the RAM preserve took.
    pub preserve_ram_ms: f64,
    /// The pre-flight's warnings.
    pub warnings: Vec<String>,
}

/// How a stage went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageReport {
    pub vm_id: String,
    pub session: String,
    pub ram_mib: u64,
    /// Milliseconds per phase: `preserve_ram` (the guest running).
    pub phases_ms: BTreeMap<String, f64>,
    /// The pre-flight's warnings (a device this kernel cannot preserve, say).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// Stages a running (or paused) VM that holds no update yet (steps above). On success the VM
/// runs on as before and holds its session until the prepare or a cancel.
pub fn stage(
    vm: &mut impl UpdateVm,
    agent: Box<dyn UpdateAgent>,
    options: &PrepareOptions<'_>,
) -> Result<StageReport, UpdateError> {
    if !matches!(vm.phase(), VmPhase::Running | VmPhase::Paused) {
        return Err(VmmError::WrongPhase {
            request: "stage an update",
            phase: vm.phase(),
        }
        .into());
    }
    if let Some(held) = vm.prepared().as_ref() {
        return Err(UpdateError::AlreadyStaged {
            vm_id: held.vm_id.clone(),
        });
    }
    let at_ms = now_ms();
    let preflight = check_vm(vm, agent.as_ref())?;
    preflight.refuse_prepare(options.require_preserved_devices)?;
    let session = agent.subscribe(options.vm_id, vm.launch().as_ref())?;
    // Told of a call-off by the agent, rather than asking it every second; an agent that
    // cannot tell is asked.
    let watch = agent
        .watch(options.vm_id)
        .inspect_err(|e| {
            log::info!(
                "update: the agent will not tell of this VM's changes ({}); asking it instead",
                error_chain(e)
            )
        })
        .ok();
    let mut prepared = PreparedUpdate {
        vm_id: options.vm_id.to_string(),
        agent,
        session,
        staged: Staged::default(),
        watch,
    };
    let start = Instant::now();
    let preserved = vm
        .ram_files()
        .into_iter()
        .enumerate()
        .try_for_each(|(index, memfd)| {
            prepared
                .session
                .preserve(memfd, RAM_TOKEN_BASE + index as u64)
        });
    if let Err(e) = preserved {
        let e = UpdateError::from(e);
        log::warn!("update stage failed, calling it off: {}", error_chain(&e));
        call_off(vm, prepared, false);
        return Err(e);
    }
    prepared.staged = Staged {
        at_ms,
        preserve_ram_ms: start.elapsed().as_secs_f64() * 1e3,
        warnings: preflight.warnings,
    };
    let report = StageReport {
        vm_id: prepared.vm_id.clone(),
        session: prepared.session.name().to_string(),
        ram_mib: vm.ram_mib(),
        phases_ms: BTreeMap::from([("preserve_ram".to_string(), prepared.staged.preserve_ram_ms)]),
        warnings: prepared.staged.warnings.clone(),
    };
    log::info!(
        "update staged: session {}, {} MiB of RAM preserved in {:.1} ms; the guest runs on",
        report.session,
        report.ram_mib,
        prepared.staged.preserve_ram_ms
    );
    *vm.prepared() = Some(prepared);
    Ok(report)
}
