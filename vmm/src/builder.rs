//! The two recipes that make a [`Vmm`]: from a config (fresh boot) and from a saved state on
//! top of handed-over memfds (restore). Both read top to bottom in the same order:
//! checks → KVM VM → memory → devices → vCPUs → a paused `Vmm`.

use std::fs::File;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use kvm_ioctls::{Kvm, VcpuFd};
use luvmm_devices::guest_control::GuestControl;
use luvmm_devices::pci::bus::{PciBarWindow, PciBus, PciConfigIo};
use luvmm_devices::power::GuestPower;
use luvmm_devices::serial::{SerialDevice, SerialError, SerialOut};
use luvmm_devices::vfio::{BoundRecord, VfioDeviceFd};
use luvmm_resources::config::{BarMode, ConfigError, VmConfig};
use luvmm_resources::layout::{
    ACPI_RESET_PORT, ACPI_SLEEP_CONTROL_PORT, GUEST_CONTROL_PORT, GUEST_CONTROL_PORT_SIZE,
    I8042_COMMAND_PORT, PCI_CONFIG_PORT, PCI_CONFIG_PORT_SIZE, PCI_IO_END, PCI_IO_START,
    PCI_MMIO32_END, PCI_MMIO32_START, PCI_MMIO64_END, PCI_MMIO64_START, SERIAL_IRQ,
    SERIAL_PORT_BASE, SERIAL_PORT_SIZE,
};
use luvmm_resources::state::{DevicesState, StateMismatch, VmState};
use vm_device::device_manager::IoManager;
use vm_device::resources::Resource;
use vm_device::DevicePio;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiError, AcpiSpec};
use crate::boot::{load_payload, BootError, BootSource};
use crate::passthrough::{
    DeviceArgs, DeviceSetupError, HandedDeviceManifest, HandedDevices, IommuKeeper, Passthrough,
    RetryIommu,
};
use crate::shell::{AdoptedAhead, NotAsBuilt, Shell};
use crate::vmm::{Devices, RestoreTimings, VmEvents, Vmm};
use crate::vstate::interrupts::device_routes;
use crate::vstate::memory::{thp_for, GuestRam, MemoryError, ShmemThp, SHMEM_THP_PATH};
use crate::vstate::vcpu::{Vcpu, VcpuContext, VcpuError};
use crate::vstate::vm::{host_limits, KvmVm, VmError};
use crate::vstate::x86_64::tsc_carry::{self, Carry};

/// Building a VM failed; nothing of it is left running.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error("saved state does not match the memory handed over")]
    Mismatch(#[from] StateMismatch),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error("cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("passthrough devices")]
    Devices(#[from] DeviceSetupError),
    #[error("the state holds passthrough devices but nothing to restore them from")]
    NoDevices,
    #[error("the VM handed over is not the one this process built ahead for")]
    NotAsBuilt(#[from] NotAsBuilt),
    #[error("cannot register {device} on the I/O bus")]
    Bus {
        device: &'static str,
        #[source]
        source: vm_device::device_manager::Error,
    },
}

/// Huge pages for guest RAM if asked for (the default) and the host's shmem THP allows them;
/// said in the log when the host's setting leaves guest RAM in small pages.
fn guest_ram_thp(asked: bool) -> bool {
    let thp = thp_for(asked, ShmemThp::host());
    if asked && !thp {
        log::info!(
            "guest RAM in small pages: {SHMEM_THP_PATH} is never or deny (advise lets luvmm ask \
             for huge pages, which LUO preserves and retrieves far faster)"
        );
    }
    thp
}

/// Says so when the guest gets more vCPUs than this process may run on at once: allowed, but
/// they take turns, and a guest's own watchdogs may see that as stalls.
fn warn_if_overcommitted(vcpus: u32) {
    if let Ok(cpus) = std::thread::available_parallelism() {
        if vcpus as usize > cpus.get() {
            log::warn!(
                "{vcpus} vCPUs on {} host CPUs: they take turns, and the guest may see that as \
                 stalls",
                cpus.get()
            );
        }
    }
}

/// Builds a fresh VM from a config: validated first, then booted paused at the payload entry.
/// The guest's COM1 writes to `serial_out`, which the caller opened (`outputs::open_outputs`).
pub fn build_for_boot(
    kvm: &Kvm,
    config: &VmConfig,
    serial_out: SerialOut,
) -> Result<Vmm, BuildError> {
    config.validate(&host_limits(kvm))?;
    warn_if_overcommitted(config.vcpus);

    let vm = KvmVm::new(kvm)?;
    let layout = config.memory_layout();
    let ram = GuestRam::create(&layout, guest_ram_thp(config.memory_thp))?;
    vm.register_memory(&ram)?;
    let source = BootSource {
        kernel: &config.payload,
        initrd: config.initrd.as_deref(),
        cmdline: &config.cmdline,
        protocol: config.boot,
    };
    let entry = load_payload(ram.memory(), &layout, &source)?;
    log::info!("booting {} through {entry}", config.payload.display());

    let mut pci = PciBus::new();
    let passthrough = if config.vfio.is_empty() {
        Passthrough::default()
    } else {
        let (router, mapper) = device_routes(&vm, &layout);
        let args = DeviceArgs {
            router: &router,
            mapper: &mapper,
            bar_access: config.vfio_bars,
            kvm_vfio: vm.create_vfio_device()?,
        };
        Passthrough::open(&config.vfio, config.vfio_backend, &ram, &args, &mut pci)?
    };

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let events = VmEvents::new().map_err(BuildError::EventFd)?;
    let devices = Devices {
        serial: Arc::new(SerialDevice::new(
            serial_irq_clone(&serial_irq)?,
            serial_out,
        )),
        guest_control: Arc::new(GuestControl::new(
            events
                .guest_pause
                .try_clone()
                .map_err(BuildError::EventFd)?,
        )),
        power: Arc::new(GuestPower::new(
            events.exit.try_clone().map_err(BuildError::EventFd)?,
        )),
        pci: Arc::new(pci),
        passthrough,
    };
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    // The tables describe the devices, so they come once every device has its INTx line.
    let intx = devices.pci.intx_routes();
    acpi::write_tables(
        ram.memory(),
        &AcpiSpec {
            vcpus: config.vcpus,
            intx: &intx,
        },
    )?;

    let ctx = VcpuContext::new(
        kvm,
        io_bus(&devices)?,
        events.exit.try_clone().map_err(BuildError::EventFd)?,
    )?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, id, &ctx)?;
        vcpu.configure_for_boot(
            kvm,
            config.vcpus,
            config.cpu_template,
            (id == 0).then_some(entry),
        )?;
        vcpus.push(vcpu);
    }
    let handles = start_all(vcpus)?;
    Ok(Vmm::new(vm, ram, devices, handles, events))
}

/// What a restore starts from: the state (as bytes, and the memfd it came in, if any), the
/// RAM memfds in layout order, and where the VM comes from.
pub struct RestoreArgs {
    /// The saved state, decoded and checked against itself.
    pub state: VmState,
    /// Its encoded length in the state memfd.
    pub state_bytes: u64,
    pub state_memfd: Option<File>,
    pub memfds: Vec<File>,
    pub origin: Origin,
    /// Where the guest's COM1 goes, opened before anything was taken.
    pub serial: SerialOut,
    /// How long gathering these took (taking the fds, or claiming and retrieving the
    /// session's state and RAM), for the restore's timings.
    pub gather_ms: f64,
    /// After a live update: what was made before the session was claimed.
    pub ahead: Option<VmAhead>,
}

/// The KVM VM and vCPUs a restore after a kexec made before it claimed the session.
pub struct VmAhead {
    pub vm: KvmVm,
    /// vCPU `i`'s KVM object, `i` from 0; used only if the state has as many.
    pub vcpus: Vec<VcpuFd>,
    /// How long making them and asking this host's KVM what it offers took.
    pub took_ms: f64,
}

/// Where a restored VM comes from, with what each origin brings for its devices.
pub enum Origin {
    /// A state file or inherited fds: no passthrough device can come this way.
    Saved,
    /// A running VMM handed it over: its devices' fds, when it had devices, and what its
    /// manifest says of them; when it paused the guest, how long it took to save the state
    /// after that, and how long after the pause the state was here.
    Handover {
        devices: Option<HandedDevices>,
        manifest: Vec<HandedDeviceManifest>,
        paused_at: Option<SystemTime>,
        source_save_ms: Option<f64>,
        handed_after_pause_ms: Option<f64>,
    },
    /// A host live update: per saved device, its cdev as the old kernel preserved it
    /// (retrieved from the session) or `None` (opened again by BDF); the IOMMU context a
    /// failed restore of the session left, and where this one leaves its own; when the old VMM
    /// paused the guest; and how long retrieving the RAM took.
    LiveUpdate {
        devices: Vec<Option<File>>,
        earlier_iommu: Option<(File, BoundRecord)>,
        keeper: Box<dyn IommuKeeper>,
        paused_at: Option<SystemTime>,
        retrieve_ram_ms: f64,
    },
}

impl Origin {
    fn paused_at(&self) -> Option<SystemTime> {
        match self {
            Origin::Saved => None,
            Origin::Handover { paused_at, .. } | Origin::LiveUpdate { paused_at, .. } => *paused_at,
        }
    }
}

/// Rebuilds a saved VM on top of its own memfds, without copying or touching guest memory.
/// Everything about the state is checked before the first KVM call; the VM comes back paused
/// with a guest check already requested.
pub fn build_from_saved(kvm: &Kvm, args: RestoreArgs) -> Result<Vmm, BuildError> {
    restore_onto(kvm, None, args)
}

/// [`build_from_saved`] onto a KVM VM and guest RAM built ahead, while the source still ran
/// the guest; the state must be that of the VM the shell was built for.
pub fn build_on_shell(kvm: &Kvm, shell: Shell, args: RestoreArgs) -> Result<Vmm, BuildError> {
    restore_onto(kvm, Some(shell), args)
}

fn restore_onto(kvm: &Kvm, shell: Option<Shell>, args: RestoreArgs) -> Result<Vmm, BuildError> {
    let mut lap = Lap::start();
    let mut timings = RestoreTimings {
        gather_ms: args.gather_ms,
        ..RestoreTimings::default()
    };
    let saved = args.state;
    saved.check_against(&GuestRam::memfd_sizes(&args.memfds)?)?;
    let source_paused_at = args.origin.paused_at();
    match &args.origin {
        Origin::Saved => Passthrough::check_handed(&saved.devices.passthrough, &[], None)?,
        Origin::Handover {
            devices,
            manifest,
            source_save_ms,
            handed_after_pause_ms,
            ..
        } => {
            Passthrough::check_handed(&saved.devices.passthrough, manifest, devices.as_ref())?;
            timings.source_save_ms = *source_save_ms;
            timings.handed_after_pause_ms = *handed_after_pause_ms;
        }
        Origin::LiveUpdate {
            devices,
            retrieve_ram_ms,
            ..
        } => {
            if devices.len() != saved.devices.passthrough.len() {
                return Err(BuildError::NoDevices);
            }
            timings.retrieve_ram_ms = Some(*retrieve_ram_ms);
        }
    }
    let limits = host_limits(kvm);
    if saved.vcpus.len() > limits.max_vcpus as usize {
        return Err(ConfigError::TooManyVcpus {
            count: u32::try_from(saved.vcpus.len()).unwrap_or(u32::MAX),
            max: limits.max_vcpus,
        }
        .into());
    }
    if let Some(shell) = &shell {
        shell.check(&saved, &args.memfds)?;
        timings.built_ahead_ms = Some(shell.built_ms);
    }
    timings.check_ms = lap.next();

    let (vm, ram, vcpu_fds, ahead) = match shell {
        Some(shell) => (shell.vm, shell.ram, Some(shell.vcpus), shell.devices),
        None => {
            let (vm, vcpu_fds) = match args.ahead {
                // vCPUs made for another count than the state's are of no use: a VM takes
                // each id once, so the state's are made on a new VM.
                Some(ahead) if ahead.vcpus.is_empty() || ahead.vcpus.len() == saved.vcpus.len() => {
                    timings.built_ahead_ms = Some(ahead.took_ms);
                    let vcpus = (!ahead.vcpus.is_empty()).then_some(ahead.vcpus);
                    (ahead.vm, vcpus)
                }
                Some(ahead) => {
                    log::warn!(
                        "{} vCPUs were made before the claim, the state has {}: made again",
                        ahead.vcpus.len(),
                        saved.vcpus.len()
                    );
                    (KvmVm::new(kvm)?, None)
                }
                None => (KvmVm::new(kvm)?, None),
            };
            timings.vm_ms = lap.next();
            let ram = GuestRam::adopt(&saved.memory, args.memfds, saved.memory_thp)?;
            vm.register_memory(&ram)?;
            timings.memory_ms = lap.next();
            (vm, ram, vcpu_fds, None)
        }
    };
    vm.restore_state(&saved.vm)?;

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let events = VmEvents::new().map_err(BuildError::EventFd)?;
    let (ahead, kvm_vfio) = keep_if_unchanged(ahead, &saved.devices)?;
    timings.devices_ahead = ahead.is_some();
    let mut pci = PciBus::new();
    let passthrough = if let Some(ahead) = ahead {
        pci = ahead.pci;
        ahead.passthrough
    } else if saved.devices.passthrough.is_empty() {
        Passthrough::default()
    } else {
        let (router, mapper) = device_routes(&vm, &saved.memory);
        let device_args = DeviceArgs {
            router: &router,
            mapper: &mapper,
            bar_access: BarMode::Direct,
            kvm_vfio: match kvm_vfio {
                Some(kvm_vfio) => kvm_vfio,
                None => vm.create_vfio_device()?,
            },
        };
        match args.origin {
            Origin::Handover {
                devices: Some(handed),
                ..
            } => Passthrough::adopt(
                &saved.devices.passthrough,
                saved.devices.iommu.as_ref(),
                handed,
                &device_args,
                &mut pci,
            )?,
            Origin::LiveUpdate {
                devices,
                earlier_iommu,
                keeper,
                ..
            } => {
                let retry = RetryIommu {
                    earlier: earlier_iommu,
                    keeper: keeper.as_ref(),
                };
                let (passthrough, ioas_map) = Passthrough::reopen(
                    &saved.devices,
                    devices,
                    retry,
                    &ram,
                    &device_args,
                    &mut pci,
                )?;
                timings.ioas_map_ms = Some(ioas_map.as_secs_f64() * 1e3);
                passthrough
            }
            // `check_handed` refused this before.
            Origin::Saved | Origin::Handover { devices: None, .. } => {
                return Err(BuildError::NoDevices)
            }
        }
    };
    let devices = Devices {
        serial: Arc::new(SerialDevice::from_state(
            &saved.devices.serial,
            serial_irq_clone(&serial_irq)?,
            args.serial,
        )?),
        guest_control: Arc::new(GuestControl::from_state(
            &saved.devices.guest_control,
            events
                .guest_pause
                .try_clone()
                .map_err(BuildError::EventFd)?,
        )),
        power: Arc::new(GuestPower::new(
            events.exit.try_clone().map_err(BuildError::EventFd)?,
        )),
        pci: Arc::new(pci),
        passthrough,
    };
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    timings.devices_ms = lap.next();

    let ctx = VcpuContext::new(
        kvm,
        io_bus(&devices)?,
        events.exit.try_clone().map_err(BuildError::EventFd)?,
    )?;
    // Every vCPU is made before any TSC is written. KVM keeps its master clock (and so gives
    // the host TSC stamps) only while every vCPU's TSC is in step with the last one written;
    // a vCPU made after a TSC write is put at zero and breaks that step for the next write.
    let mut vcpus = match vcpu_fds {
        // The shell's check matched their count to the state's, ids from 0 as the state's.
        Some(fds) => fds
            .into_iter()
            .zip(&saved.vcpus)
            .map(|(fd, state)| Vcpu::from_fd(&vm, fd, state.id, &ctx))
            .collect::<Result<Vec<_>, _>>()?,
        None => saved
            .vcpus
            .iter()
            .map(|state| Vcpu::new(&vm, state.id, &ctx))
            .collect::<Result<Vec<_>, _>>()?,
    };
    // The kvmclock as it runs again, for the TSCs to move on as far as it did since the save.
    let now = vm.clock()?;
    let mut carry = Carry::Not;
    for (i, (vcpu, vcpu_state)) in vcpus.iter_mut().zip(&saved.vcpus).enumerate() {
        let carried = tsc_carry::by_clock(vcpu_state, &saved.vm.clock, &now);
        let tsc = match carried {
            Carry::ByClock { tsc, .. } => Some(tsc),
            Carry::ByStamps { .. } | Carry::Not => None,
        };
        vcpu.restore_state(vcpu_state, tsc)?;
        if i == 0 {
            carry = carried;
        }
    }
    carry = carry_by_stamps(&vm, &saved, &vcpus)?.unwrap_or(carry);
    say_tsc_carry(carry, saved.vcpus.first().and_then(|v| v.tsc_khz));
    let handles = start_all(vcpus)?;
    timings.vcpus_ms = lap.next();
    // The guest reports on its memory as soon as it runs again.
    devices.guest_control.request_check();
    let mut vmm = Vmm::new(vm, ram, devices, handles, events);
    vmm.set_restored(
        args.state_memfd,
        args.state_bytes,
        timings,
        source_paused_at,
    );
    Ok(vmm)
}

/// The devices adopted ahead of a handover if the guest left them as they were staged; else
/// none, given up for the same files to be adopted again from `saved`, with the VM's KVM VFIO
/// device they leave.
fn keep_if_unchanged(
    ahead: Option<AdoptedAhead>,
    saved: &DevicesState,
) -> Result<(Option<AdoptedAhead>, Option<Arc<VfioDeviceFd>>), BuildError> {
    let Some(ahead) = ahead else {
        return Ok((None, None));
    };
    match ahead.check(saved) {
        Ok(()) => {
            log::info!(
                "passthrough: {} devices adopted ahead, as the guest left them",
                saved.passthrough.len()
            );
            Ok((Some(ahead), None))
        }
        Err(anew) => {
            log::info!(
                "passthrough: {anew} after the stage; the devices are adopted again from the \
                 state handed over"
            );
            Ok((None, ahead.give_up()?))
        }
    }
}

/// Milliseconds between successive calls, for the restore's phase timings.
struct Lap(Instant);

impl Lap {
    fn start() -> Lap {
        Lap(Instant::now())
    }

    fn next(&mut self) -> f64 {
        let now = Instant::now();
        let ms = (now - self.0).as_secs_f64() * 1e3;
        self.0 = now;
        ms
    }
}

fn serial_irq_clone(evt: &EventFd) -> Result<EventFd, BuildError> {
    evt.try_clone().map_err(BuildError::EventFd)
}

/// The PCI I/O window as port numbers.
#[allow(clippy::cast_possible_truncation)] // Exact: the asserts check it at compile time.
const PCI_IO_BASE: u16 = {
    assert!(PCI_IO_START <= u16::MAX as u64);
    PCI_IO_START as u16
};
#[allow(clippy::cast_possible_truncation)] // Exact: the assert checks it at compile time.
const PCI_IO_SIZE: u16 = {
    assert!(PCI_IO_END - PCI_IO_START <= u16::MAX as u64);
    (PCI_IO_END - PCI_IO_START) as u16
};

fn io_bus(devices: &Devices) -> Result<Arc<IoManager>, BuildError> {
    let ports: [(&'static str, Arc<dyn DevicePio + Send + Sync>, u16, u16); 5] = [
        (
            "serial",
            devices.serial.clone(),
            SERIAL_PORT_BASE,
            SERIAL_PORT_SIZE,
        ),
        (
            "guest-control",
            devices.guest_control.clone(),
            GUEST_CONTROL_PORT,
            GUEST_CONTROL_PORT_SIZE,
        ),
        (
            "ACPI sleep control and reset",
            devices.power.clone(),
            ACPI_SLEEP_CONTROL_PORT,
            ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT + 1,
        ),
        (
            "i8042 command",
            devices.power.clone(),
            I8042_COMMAND_PORT,
            1,
        ),
        (
            "PCI configuration",
            Arc::new(PciConfigIo::new(devices.pci.clone())),
            PCI_CONFIG_PORT,
            PCI_CONFIG_PORT_SIZE,
        ),
    ];
    let mut io = IoManager::new();
    for (device, handler, base, size) in ports {
        io.register_pio_resources(handler, &[Resource::PioAddressRange { base, size }])
            .map_err(|source| BuildError::Bus { device, source })?;
    }
    // Every BAR window goes to the bus, which finds the BAR: trapped 64-bit BARs live above
    // 4 GiB, I/O BARs in the port window.
    let bar_window = Arc::new(PciBarWindow::new(devices.pci.clone()));
    io.register_mmio_resources(
        bar_window.clone(),
        &[
            Resource::MmioAddressRange {
                base: PCI_MMIO32_START,
                size: PCI_MMIO32_END - PCI_MMIO32_START,
            },
            Resource::MmioAddressRange {
                base: PCI_MMIO64_START,
                size: PCI_MMIO64_END - PCI_MMIO64_START,
            },
        ],
    )
    .map_err(|source| BuildError::Bus {
        device: "PCI MMIO windows",
        source,
    })?;
    io.register_pio_resources(
        bar_window,
        &[Resource::PioAddressRange {
            base: PCI_IO_BASE,
            size: PCI_IO_SIZE,
        }],
    )
    .map_err(|source| BuildError::Bus {
        device: "PCI I/O window",
        source,
    })?;
    Ok(Arc::new(io))
}

/// KVM runs no master clock for a VM without vCPUs, so the kvmclock read before they were
/// made has no host TSC stamp. With them made and their TSCs written, the clock is put back
/// again and read with its stamp: where every vCPU can take the exact offset it gives
/// (`tsc_carry`), each does, in place of the written-back TSC. Returns the first vCPU's.
fn carry_by_stamps(
    vm: &KvmVm,
    saved: &VmState,
    vcpus: &[Vcpu],
) -> Result<Option<Carry>, BuildError> {
    vm.restore_clock(&saved.vm.clock)?;
    let now = vm.clock()?;
    let plans: Vec<Carry> = vcpus
        .iter()
        .zip(&saved.vcpus)
        .map(|(vcpu, state)| tsc_carry::plan(state, &saved.vm.clock, &now, !vcpu.tsc_scaled()))
        .collect();
    if !plans.iter().all(|p| matches!(p, Carry::ByStamps { .. })) {
        log::info!(
            "no exact TSC offsets: host TSC stamp at the save {}, here {}; every vCPU's saved \
             offset {}; TSC scaled here {}",
            tsc_carry::stamped(&saved.vm.clock),
            tsc_carry::stamped(&now),
            saved.vcpus.iter().all(|v| v.tsc_offset.is_some()),
            vcpus.iter().any(Vcpu::tsc_scaled),
        );
        return Ok(None);
    }
    for (vcpu, plan) in vcpus.iter().zip(&plans) {
        if let Carry::ByStamps { offset, .. } = plan {
            vcpu.set_tsc_offset(*offset)?;
        }
    }
    Ok(plans.first().copied())
}

/// Says how the first vCPU's TSC moved on over the pause.
fn say_tsc_carry(carry: Carry, khz: Option<u32>) {
    let ms = |ticks: i64| ticks as f64 / f64::from(khz.unwrap_or(1).max(1));
    match carry {
        Carry::ByStamps { ticks, .. } => log::info!(
            "guest TSC moved on {:.1} ms with the kvmclock, by a new offset from the host TSC \
             stamps",
            ms(ticks)
        ),
        Carry::ByClock { ticks, .. } => log::info!(
            "guest TSC moved on {:.1} ms with the kvmclock, written back (no host TSC stamp on \
             both ends, or a scaled TSC)",
            ms(ticks)
        ),
        Carry::Not => {}
    }
}

fn start_all(vcpus: Vec<Vcpu>) -> Result<Vec<crate::vstate::vcpu::VcpuHandle>, BuildError> {
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        match vcpu.start() {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                for handle in handles {
                    handle.finish();
                }
                return Err(e.into());
            }
        }
    }
    Ok(handles)
}
