#!/bin/sh
# A Linux microVM with the NVMe controller passed through, judged by the guest's own judge
# (tests/guest/linux/judge.c: memory, an O_DIRECT block loop through its nvme driver, its kernel
# log, its clocks) after each path luvmm offers short of a host update:
#   1 booted; 2 paused 8 s and resumed; 3 handed to a new process (device fds adopted, no
#   reopen, no reset); 4 handed on again to a third process. With luvmm.damage=1 on L1's command line the same steps are the damage
#   checks: the VMM leaves KVM_KVMCLOCK_CTRL out (at 2 the guest's watchdog would cry soft
#   lockup; in 7.2 it does not), and the handover's target does not put the saved kvmclock
#   back, so at 3 the guest's clock must be wrong.
# Each check is one LUVMM-LINUX-CHECK line, printed as `linux check N JSON`.
. /luvmm/steps.sh
# Two vCPUs on L1's one CPU: the judge's clock sampler moves between them, so a vCPU whose
# clock or TSC comes back apart from the other's shows.
cd /tmp
bin=/luvmm/bin
nvme=$(nvme_bdf)
# A 2 s watchdog threshold: a CPU seen stuck for 4 s is a soft lockup, so an 8 s pause the
# guest is not told of would show (it does not: README, Time). tsc=nowatchdog: after any stall
# (a pause, or a slow stretch of boot) 7.2's clocksource watchdog catches up in rounds
# microseconds apart and compares them at a parts-per-million limit; under an emulated L1 the
# jitter of reading the two clocks alone passes it, and it marks the TSC (not the clocksource
# in use, kvm-clock) unstable. It did so at boot too, before any pause.
cmdline="console=ttyS0 tsc=nowatchdog watchdog_thresh=2 luvmm.judge.mem_pct=20 luvmm.judge.sample_ms=10 luvmm.judge.io_pause_ms=5"
# The judge numbers its checks itself, and a restore asks for one as soon as the guest runs
# again (the one that sees the blackout), so a step's check is found as the first one after
# a mark taken before the step, not by its number.
mark() { grep -c LUVMM-LINUX-CHECK a.log 2>/dev/null || true; }
report_check() { # report_check N SEEN: prints the first check after SEEN of them as check N
    if wait_line a.log LUVMM-LINUX-CHECK $(($2 + 1)) && whole_lines a.log; then
        echo "LUVMM-L1 linux check $1 $(grep LUVMM-LINUX-CHECK a.log | sed -n "$(($2 + 1))p" | sed 's/.*LUVMM-LINUX-CHECK //')"
    else
        echo "LUVMM-L1 test linux_guest_check_$1 FAIL the judge did not answer"
    fi
}
check() { # check SOCKET N: asks the judge for a check and prints it as check N
    seen=$(mark)
    luvmm ctl --socket "$1" check >/dev/null
    report_check "$2" "$seen"
}
settle() { sleep 4; } # the I/O loop and the clock sampler run on after a resume
# luvmm.hold_s=N on L1's command line holds each handover's VM saved N s before the target
# starts: a blackout long enough that a guest clock left standing over it shows.
hold=$(sed -n 's/.*luvmm\.hold_s=\([0-9]*\).*/\1/p' /proc/cmdline)
handover() { # handover FROM TO [FAULTS]: the VM moves from socket FROM to a new process on TO
    luvmm ctl --socket "$1" save >/dev/null # pauses the VM and saves its state for the target
    sleep "${hold:-0}"
    LUVMM_TEST_FAULTS=$3 luvmm restore --from-socket "$1" --serial ./a.log --api-socket "$2" \
        2>>"$2.err" &
    wait_phase "$2" running || echo "LUVMM-L1 test linux_guest_handover_$2 FAIL never running"
}

echo "LUVMM-L1 host clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
damage=
if grep -qw luvmm.damage=1 /proc/cmdline; then damage=1; fi
LUVMM_TEST_FAULTS=${damage:+no-kvmclock-ctrl} luvmm run --kernel $bin/guest-vmlinux \
    --initrd $bin/guest-initrd.cpio.gz --memory-mib 256 \
    --vcpus 2 --vfio "$nvme" --cmdline "$cmdline" --serial ./a.log --api-socket a.sock 2>a.err &
i=0
while ! grep -q LUVMM-LINUX-READY a.log 2>/dev/null && [ $i -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
echo "LUVMM-L1 linux ready $(grep LUVMM-LINUX-READY a.log)"
settle
check a.sock 1
luvmm ctl --socket a.sock pause >/dev/null
sleep 8
luvmm ctl --socket a.sock resume >/dev/null
settle
check a.sock 2
seen=$(mark)
handover a.sock b.sock ${damage:+no-kvmclock-restore}
settle
report_check 3 "$seen"
echo "LUVMM-L1 linux handover $(luvmm ctl --socket b.sock status | grep -o '"blackout_ms":[0-9.]*')"
seen=$(mark)
handover b.sock c.sock ${damage:+no-kvmclock-restore}
settle
report_check 4 "$seen"
echo "LUVMM-L1 linux handover again $(luvmm ctl --socket c.sock status | grep -o '"blackout_ms":[0-9.]*')"
luvmm ctl --socket c.sock shutdown >/dev/null
sleep 1
grep -v LUVMM-LINUX-CHECK a.log | grep -E 'nvme|soft lockup|clocksource|WARNING|BUG|rcu' | sed 's/^/LUVMM-L1 serial /'
for f in a.err b.sock.err c.sock.err; do sed "s/^/LUVMM-L1 log $f /" $f 2>/dev/null; done
