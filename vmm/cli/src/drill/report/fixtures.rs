//! One drill's events for the report's unit tests: one VM with one device, one round.

use std::collections::BTreeMap;
use std::path::Path;

use luvmm_vmm::update::prepare::{DeviceReport, PrepareReport};
use luvmm_vmm::vmm::RestoreTimings;

use super::{Collector, DrillReport};
use crate::drill::bed::{L1Run, Line};
use crate::drill::event::{Event, WatchSpan, HOST_ROW};
use crate::drill::watch::{Open, Opens};
use crate::drill::{GuestKind, Plan, VfioHandler};

const BEFORE: &str = "LUVMM-CHECK ok pages=9 heartbeat=5 seed=0xab checks=1 vcpus=2 heartbeats=5,5";
/// The guest's TSC stopped for 10 ticks' worth (1 s) once between its checks.
pub(super) const AFTER: &str = "LUVMM-CHECK ok pages=9 heartbeat=9 seed=0xab checks=2 vcpus=2 \
     tick_gap_tsc=2600000000 tick_tsc=260000000 heartbeats=9,9";
pub(super) const ROUND: &str = "LUVMM-ROUND ok n=2 bdf=00:01.0 dma=ok irq=msi id=ok";
const BDF: &str = "0000:00:03.0";

fn plan(handler: VfioHandler, guest: GuestKind) -> Plan {
    Plan {
        vms: 1,
        memory_mib: 64,
        devices: 1,
        devices_on: None,
        rounds: 1,
        cancel_first: false,
        vfio_handler: handler,
        guest,
        thp: false,
        test_faults: None,
    }
}

/// `cdev_opens` opens of VFIO cdevs and one of `/dev/iommu` by the kernel's count, and
/// `attributed` of the device's own node by inotify's.
pub(super) fn opens(cdev_opens: u32, attributed: u32) -> Opens {
    Opens {
        opens: (0..cdev_opens)
            .map(|_| Open {
                node: "vfio_cdev".into(),
                pid: 90,
                comm: "luvmm".into(),
            })
            .chain([Open {
                node: "iommufd".into(),
                pid: 90,
                comm: "luvmm".into(),
            }])
            .collect(),
        per_device: BTreeMap::from([(BDF.to_string(), attributed)]),
    }
}

/// Runs a one-VM, one-device, one-round drill's events through the collector; the open
/// watcher saw nothing before the kexec and `seen` after it.
pub(super) fn drill(
    handler: VfioHandler,
    preserved: bool,
    after: &str,
    round_line: &str,
    seen: Opens,
    restored: bool,
) -> DrillReport {
    let watched = Watched {
        before_kexec: Some(opens(0, 0)),
        after_kexec: Some(seen),
    };
    drill_watched(handler, preserved, after, round_line, watched, restored)
}

/// What the open watcher saw in each kernel (`None`: it did not report).
pub(super) struct Watched {
    pub before_kexec: Option<Opens>,
    pub after_kexec: Option<Opens>,
}

/// [`drill`], with the open watcher's two spans given.
pub(super) fn drill_watched(
    handler: VfioHandler,
    preserved: bool,
    after: &str,
    round_line: &str,
    seen: Watched,
    restored: bool,
) -> DrillReport {
    let guest = GuestLines {
        kind: GuestKind::Payload,
        before: BEFORE,
        recovery: &[],
        after,
        round_line: Some(round_line),
    };
    run(handler, &guest, preserved, seen, restored)
}

/// One Linux judge check line: `checks`, `uptime_s`, the I/O counters (written, verified,
/// errors, longest stall), the controller resets since boot, the wall-clock offset and the
/// longest clock gap; memory ok, no kernel warning.
pub(super) fn linux_check(
    checks: u32,
    uptime_s: f64,
    io: (u64, u64, u64, f64),
    resets: u64,
    offset_ms: f64,
    gap_ms: f64,
) -> String {
    let (written, verified, errors, stall) = io;
    format!(
        "LUVMM-LINUX-CHECK {{\"checks\":{checks},\"uptime_s\":{uptime_s},\"memory\":\"ok\",\
         \"io\":{{\"written\":{written},\"verified\":{verified},\"errors\":{errors},\
         \"mismatches\":0,\"longest_stall_ms\":{stall},\"last_errno\":0}},\
         \"kernel_warnings\":[],\"kernel_warning_count\":0,\"controller_resets\":{resets},\
         \"clock\":{{\"realtime_offset_ms\":{offset_ms},\"monotonic_backwards\":false,\
         \"longest_gap_ms\":{gap_ms}}}}}"
    )
}

/// A one-VM, one-NVMe-controller, one-round Linux drill with the handler in `handler` mode:
/// the judge's check before, those while it recovered, and the last.
pub(super) fn linux_drill(
    handler: VfioHandler,
    before: &str,
    recovery: &[String],
    after: &str,
) -> DrillReport {
    let guest = GuestLines {
        kind: GuestKind::Linux,
        before,
        recovery,
        after,
        round_line: None,
    };
    let seen = Watched {
        before_kexec: Some(opens(0, 0)),
        after_kexec: Some(opens(0, 0)),
    };
    run(handler, &guest, handler != VfioHandler::Off, seen, true)
}

/// What the guest said in the fixture's round.
struct GuestLines<'a> {
    kind: GuestKind,
    before: &'a str,
    recovery: &'a [String],
    after: &'a str,
    round_line: Option<&'a str>,
}

fn run(
    handler: VfioHandler,
    guest: &GuestLines<'_>,
    preserved: bool,
    seen: Watched,
    restored: bool,
) -> DrillReport {
    let mut events = vec![
        Event::Stage {
            stage: 1,
            kernel: "7.2.13".into(),
        },
        Event::Phase {
            row: "vm1".into(),
            phase: "prepare".into(),
        },
        Event::Prepared {
            round: 1,
            vm: "vm1".into(),
            check_before: guest.before.into(),
            report: PrepareReport {
                vm_id: "vm1".into(),
                session: "luvmm-vm1".into(),
                devices: vec![DeviceReport {
                    bdf: BDF.into(),
                    preserved,
                }],
                ram_mib: 64,
                phases_ms: BTreeMap::from([("preserve_ram".to_string(), 8.0)]),
                warnings: Vec::new(),
            },
            shmem_huge_kib: 0,
        },
    ];
    events.extend(seen.before_kexec.map(|opens| Event::Watched {
        round: 1,
        span: WatchSpan::PrepareToKexec,
        opens,
    }));
    events.extend([
        Event::Phase {
            row: HOST_ROW.into(),
            phase: "kexec".into(),
        },
        Event::Stage {
            stage: 2,
            kernel: "7.2.13".into(),
        },
    ]);
    if restored {
        events.push(Event::Restored {
            round: 1,
            vm: "vm1".into(),
            recovery_checks: guest.recovery.to_vec(),
            check_after: guest.after.into(),
            device_rounds: guest.round_line.into_iter().map(str::to_string).collect(),
            timings: RestoreTimings::default(),
            shmem_huge_kib: 0,
        });
    } else {
        events.push(Event::Failure {
            round: 1,
            vm: None,
            what: "vm1: luvmm exited".into(),
        });
    }
    // The watch after the kexec reports whether the restore worked or not.
    events.extend(seen.after_kexec.map(|opens| Event::Watched {
        round: 1,
        span: WatchSpan::AgentToResume,
        opens,
    }));
    if restored {
        events.push(Event::Done);
    }
    let mut collector = Collector::new(plan(handler, guest.kind));
    for (i, event) in events.iter().enumerate() {
        collector.feed(&Line {
            at: i as f64 * 10.0,
            text: event.to_line(),
        });
    }
    let run = L1Run {
        lines: Vec::new(),
        timed_out: false,
    };
    collector.finish(&run, Path::new("console.log"))
}

/// The drill where everything held: the handler off, the device reopened once and working.
pub(super) fn held() -> DrillReport {
    drill(VfioHandler::Off, false, AFTER, ROUND, opens(1, 1), true)
}
