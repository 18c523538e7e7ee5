//! The two recipes that make a [`Vmm`]: from a config (fresh boot) and from a saved state on
//! top of handed-over memfds (restore). Both read top to bottom in the same order:
//! checks → KVM VM → memory → devices → vCPUs → a paused `Vmm`.

use std::fs::{File, OpenOptions};
use std::io::LineWriter;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::Kvm;
use luvmm_devices::guest_control::GuestControl;
use luvmm_devices::pci::bus::{BusFull, PciBarWindow, PciBus, PciConfigIo, PciDevice};
use luvmm_devices::pci::config::{BarKind, NUM_BARS};
use luvmm_devices::serial::{SerialDevice, SerialError, SerialOut};
use luvmm_devices::vfio::{
    GuestMapper, IrqRouter, PassthroughArgs, PassthroughError, VfioPciDevice,
};
use luvmm_resources::allocator::{AddressAllocator, AllocError};
use luvmm_resources::config::{ConfigError, SerialOutput, VmConfig};
use luvmm_resources::layout::{
    GUEST_CONTROL_PORT, GUEST_CONTROL_PORT_SIZE, PCI_CONFIG_PORT, PCI_CONFIG_PORT_SIZE, PCI_IO_END,
    PCI_IO_START, PCI_MMIO32_END, PCI_MMIO32_START, PCI_MMIO64_END, PCI_MMIO64_START, SERIAL_IRQ,
    SERIAL_PORT_BASE, SERIAL_PORT_SIZE,
};
use luvmm_resources::state::{self, DevicesState, StateError, StateMismatch, VmState};
use vm_device::device_manager::IoManager;
use vm_device::resources::Resource;
use vm_device::DevicePio;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{load_payload, BootError};
use crate::vmm::{Devices, RestoreTimings, Vmm};
use crate::vstate::interrupts::{KvmGuestMapper, KvmIrqRouter};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuContext, VcpuError};
use crate::vstate::vm::{host_limits, KvmVm, VmError};

/// Building a VM failed; nothing of it is left running.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error("saved state refused")]
    State(#[from] StateError),
    #[error("saved state does not match the memory handed over")]
    Mismatch(#[from] StateMismatch),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error("cannot open serial output {path}")]
    SerialOutput {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Passthrough(#[from] PassthroughError),
    #[error("the state holds VFIO passthrough devices {bdfs:?}; restoring them needs the devices preserved across the switch, which luvmm cannot do yet")]
    PassthroughRestore { bdfs: Vec<String> },
    #[error("cannot place a BAR")]
    Bar(#[from] AllocError),
    #[error(transparent)]
    PciBus(#[from] BusFull),
    #[error("cannot register {device} on the I/O bus: {reason}")]
    Bus {
        device: &'static str,
        reason: String,
    },
}

/// Builds a fresh VM from a config: validated first, then booted paused at the payload entry.
pub fn build_for_boot(kvm: &Kvm, config: &VmConfig) -> Result<Vmm, BuildError> {
    config.validate(&host_limits(kvm))?;
    let serial_out = open_serial(&config.serial)?;

    let vm = KvmVm::new(kvm)?;
    let layout = config.memory_layout();
    let ram = GuestRam::create(&layout)?;
    vm.register_memory(&ram)?;
    let entry = load_payload(
        ram.memory(),
        &layout,
        &config.payload,
        &config.cmdline,
        config.boot,
    )?;
    log::info!("booting {} via {entry:?}", config.payload.display());

    let router: Arc<dyn IrqRouter> = Arc::new(KvmIrqRouter::new(vm.shared_fd()));
    let mapper: Arc<dyn GuestMapper> = Arc::new(KvmGuestMapper::new(
        vm.shared_fd(),
        layout.regions.len() as u32,
    ));
    let args = || PassthroughArgs {
        router: router.clone(),
        mapper: mapper.clone(),
        bar_access: config.vfio_bars,
        backend: config.vfio_backend,
    };
    let (pci, passthrough) = attach_passthrough(&config.vfio, &ram, args)?;

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let devices = Devices {
        serial: Arc::new(SerialDevice::new(
            serial_irq_clone(&serial_irq)?,
            serial_out,
        )),
        guest_control: Arc::new(GuestControl::new()),
        pci: Arc::new(pci),
        passthrough,
    };
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;

    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let ctx = VcpuContext::new(
        kvm,
        io_bus(&devices)?,
        exit_evt.try_clone().map_err(BuildError::EventFd)?,
    )?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(vm.fd(), id, &ctx)?;
        vcpu.configure_for_boot(kvm, (id == 0).then_some(entry))?;
        vcpus.push(vcpu);
    }
    let handles = start_all(vcpus)?;
    Ok(Vmm::new(vm, ram, devices, handles, exit_evt))
}

/// What a restore starts from: the state (as bytes, and the memfd it came in, if any) and the
/// RAM memfds in layout order.
pub struct RestoreArgs {
    pub state_blob: Vec<u8>,
    pub state_memfd: Option<File>,
    pub memfds: Vec<File>,
    pub serial: SerialOutput,
}

/// Rebuilds a saved VM on top of its own memfds, without copying or touching guest memory.
/// Everything about the state is checked before the first KVM call; the VM comes back paused
/// with a guest check already requested.
pub fn build_from_saved(kvm: &Kvm, args: RestoreArgs) -> Result<Vmm, BuildError> {
    let mut lap = Lap::start();
    let mut timings = RestoreTimings::default();
    let saved: VmState = state::decode(&args.state_blob)?;
    if !saved.devices.passthrough.is_empty() {
        return Err(BuildError::PassthroughRestore {
            bdfs: saved
                .devices
                .passthrough
                .iter()
                .map(|p| p.bdf.clone())
                .collect(),
        });
    }
    saved.check_against(&GuestRam::memfd_sizes(&args.memfds)?)?;
    let limits = host_limits(kvm);
    if saved.vcpus.len() > limits.max_vcpus as usize {
        return Err(ConfigError::TooManyVcpus {
            count: saved.vcpus.len() as u32,
            max: limits.max_vcpus,
        }
        .into());
    }
    let serial_out = open_serial(&args.serial)?;
    timings.check_ms = lap.next();

    let vm = KvmVm::new(kvm)?;
    timings.vm_ms = lap.next();
    let ram = GuestRam::adopt(&saved.memory, args.memfds)?;
    vm.register_memory(&ram)?;
    timings.memory_ms = lap.next();
    vm.restore_state(&saved.vm)?;

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let devices = restore_devices(&saved.devices, serial_irq_clone(&serial_irq)?, serial_out)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    timings.devices_ms = lap.next();

    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let ctx = VcpuContext::new(
        kvm,
        io_bus(&devices)?,
        exit_evt.try_clone().map_err(BuildError::EventFd)?,
    )?;
    let mut vcpus = Vec::with_capacity(saved.vcpus.len());
    for vcpu_state in &saved.vcpus {
        let vcpu = Vcpu::new(vm.fd(), vcpu_state.id, &ctx)?;
        vcpu.restore_state(vcpu_state)?;
        vcpus.push(vcpu);
    }
    let handles = start_all(vcpus)?;
    timings.vcpus_ms = lap.next();
    // The guest reports on its memory as soon as it runs again.
    devices.guest_control.request_check();
    let mut vmm = Vmm::new(vm, ram, devices, handles, exit_evt);
    vmm.set_restored(args.state_memfd, args.state_blob.len() as u64, timings);
    Ok(vmm)
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

fn restore_devices(
    state: &DevicesState,
    serial_irq: EventFd,
    serial_out: SerialOut,
) -> Result<Devices, BuildError> {
    Ok(Devices {
        serial: Arc::new(SerialDevice::from_state(
            &state.serial,
            serial_irq,
            serial_out,
        )?),
        guest_control: Arc::new(GuestControl::from_state(&state.guest_control)),
        // A saved VM never has passthrough devices: saving one is refused.
        pci: Arc::new(PciBus::new()),
        passthrough: Vec::new(),
    })
}

fn serial_irq_clone(evt: &EventFd) -> Result<EventFd, BuildError> {
    evt.try_clone().map_err(BuildError::EventFd)
}

/// Opens every passthrough device, maps guest RAM into its IOAS (IOVA == GPA, by memfd), and
/// places its BARs. Anything opened so far is released if one fails.
type Passthrough = Vec<(u8, Arc<Mutex<VfioPciDevice>>)>;

fn attach_passthrough(
    bdfs: &[String],
    ram: &GuestRam,
    args: impl Fn() -> PassthroughArgs,
) -> Result<(PciBus, Passthrough), BuildError> {
    let mut attached = Vec::with_capacity(bdfs.len());
    let mut bus = PciBus::new();
    let mut mmio32 = AddressAllocator::new("PCI 32-bit MMIO", PCI_MMIO32_START, PCI_MMIO32_END);
    let mut mmio64 = AddressAllocator::new("PCI 64-bit MMIO", PCI_MMIO64_START, PCI_MMIO64_END);
    let mut io = AddressAllocator::new("PCI I/O", PCI_IO_START, PCI_IO_END);
    for bdf in bdfs {
        let started = Instant::now();
        let mut device = VfioPciDevice::open(bdf, args())?;
        let opened = started.elapsed();
        for (index, (mapping, memfd)) in ram.memory().iter().zip(ram.memfds()).enumerate() {
            // SAFETY: the mapping belongs to `ram`, which the VMM keeps for as long as the
            // device exists (devices are dropped before guest memory).
            unsafe {
                device.map_guest_memory(
                    memfd,
                    index,
                    0,
                    mapping.start_addr().0,
                    mapping.len(),
                    mapping.as_ptr(),
                )?;
            }
        }
        let mapped = started.elapsed() - opened;
        for index in 0..NUM_BARS {
            let Some(bar) = PciDevice::config(&device).bar(index) else {
                continue;
            };
            let window = match bar.kind {
                BarKind::Mmio32 => &mut mmio32,
                BarKind::Mmio64 => &mut mmio64,
                BarKind::Io => &mut io,
            };
            device.place_bar(index, window.allocate(bar.size)?);
        }
        log::info!(
            "passthrough {bdf}: opened, bound and attached in {:.1} ms, {} MiB mapped in {:.1} ms",
            opened.as_secs_f64() * 1e3,
            ram.layout().total_bytes() >> 20,
            mapped.as_secs_f64() * 1e3
        );
        let device = Arc::new(Mutex::new(device));
        let slot = bus.add(device.clone())?;
        attached.push((slot, device));
    }
    Ok((bus, attached))
}

fn io_bus(devices: &Devices) -> Result<Arc<IoManager>, BuildError> {
    let ports: [(&'static str, Arc<dyn DevicePio + Send + Sync>, u16, u16); 3] = [
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
            "PCI configuration",
            Arc::new(PciConfigIo::new(devices.pci.clone())),
            PCI_CONFIG_PORT,
            PCI_CONFIG_PORT_SIZE,
        ),
    ];
    let mut io = IoManager::new();
    for (device, handler, base, size) in ports {
        io.register_pio_resources(handler, &[Resource::PioAddressRange { base, size }])
            .map_err(|e| BuildError::Bus {
                device,
                reason: e.to_string(),
            })?;
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
    .map_err(|e| BuildError::Bus {
        device: "PCI MMIO windows",
        reason: e.to_string(),
    })?;
    io.register_pio_resources(
        bar_window,
        &[Resource::PioAddressRange {
            base: PCI_IO_START as u16,
            size: (PCI_IO_END - PCI_IO_START) as u16,
        }],
    )
    .map_err(|e| BuildError::Bus {
        device: "PCI I/O window",
        reason: e.to_string(),
    })?;
    Ok(Arc::new(io))
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

fn open_serial(output: &SerialOutput) -> Result<SerialOut, BuildError> {
    Ok(match output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Discard => Box::new(std::io::sink()),
        // Line-buffered, so readers of the file see whole guest lines.
        SerialOutput::File(path) => Box::new(LineWriter::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::SerialOutput {
                    path: path.display().to_string(),
                    source,
                })?,
        )),
    })
}
