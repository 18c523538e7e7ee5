#!/bin/sh
# A host live update of a Linux microVM whose NVMe controller the bed's VFIO handler keeps
# (vfio_pci.luvmm_lu=keep), judged by the guest's own judge (tests/guest/linux/judge.c):
#   stage 1: the agent starts; the guest boots, fills its RAM and keeps checksummed blocks
#            going through its nvme driver; check 1; the update is prepared with every device
#            preserved, and the agent kexecs.
#   stage 2: the next kernel's agent hands the session to `luvmm restore`, which takes the
#            controller only from the session; the guest resumes and, a few seconds later,
#            check 2 says what it saw: its RAM, every block, its kernel log, its clocks.
# With vfio_pci.luvmm_lu=reset (the proposed upstream behaviour) the controller comes back
# reset under a driver that does not know it, and with vfio_pci.luvmm_lu=off it is not
# preserved at all, so the restore opens it again and the open resets it: the guest's NVMe
# timeouts are set to luvmm.nvme_timeout= seconds (L1's command line) and check 2 waits for
# its recovery.
stage=$1
cd /tmp
. /luvmm/steps.sh
# Two vCPUs on L1's one CPU, the judge's clock sampler moving between them. tsc=nowatchdog: see
# linux-paths.sh.
bin=/luvmm/bin
nvme_timeout=$(sed -n 's/.*luvmm\.nvme_timeout=\([0-9]*\).*/\1/p' /proc/cmdline)
timeouts=${nvme_timeout:+ nvme_core.io_timeout=$nvme_timeout nvme_core.admin_timeout=$nvme_timeout}
require=--require-preserved-devices
grep -qw vfio_pci.luvmm_lu=off /proc/cmdline && require=
agent_sock=/tmp/agent.sock
nvme=$(nvme_bdf)
check() { # check N: asks the judge for check N and prints it
    luvmm ctl --socket a.sock check >/dev/null
    if wait_line a.log "LUVMM-LINUX-CHECK {\"checks\":$1," && whole_lines a.log; then
        echo "LUVMM-L1 linux check $1 $(grep "LUVMM-LINUX-CHECK {\"checks\":$1," a.log | tail -1 | sed 's/.*LUVMM-LINUX-CHECK //')"
    else
        echo "LUVMM-L1 test linux_guest_update_check_$1 FAIL the judge did not answer"
    fi
}
luvmm agent serve --socket $agent_sock 2>agent.err &
i=0
while [ ! -S $agent_sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "LUVMM-L1 host clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
case "$stage" in
1)
    luvmm run --kernel $bin/guest-vmlinux --initrd $bin/guest-initrd.cpio.gz --memory-mib 256 \
        --vcpus 2 --vfio "$nvme" --cmdline "console=ttyS0 tsc=nowatchdog watchdog_thresh=2 luvmm.judge.mem_pct=40$timeouts" \
        --serial ./a.log --api-socket a.sock 2>a.err &
    i=0
    while ! grep -q LUVMM-LINUX-READY a.log 2>/dev/null && [ $i -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
    echo "LUVMM-L1 linux ready $(grep LUVMM-LINUX-READY a.log)"
    sleep 4
    check 1
    luvmm ctl --socket a.sock update prepare --vm-id vm1 --agent-socket $agent_sock \
        $require > prep.json 2>&1
    echo "LUVMM-L1 linux prepare $(cat prep.json)"
    result linux_guest_update_prepared $([ "$(phase a.sock)" = preserved ]; echo $?) "$(cat prep.json)"
    sed 's/^/LUVMM-L1 log a: /' a.err
    luvmm agent update --socket $agent_sock --kernel /boot/bzImage \
        --initrd /boot/initrd-stage2.cpio.gz --append luvmm.stage=2 > kexec.out 2>&1
    sleep 60
    echo "LUVMM-L1 test linux_guest_update_kexec FAIL still here: $(cat kexec.out)"
    ;;
2)
    luvmm restore --session vm1 --agent-socket $agent_sock --serial ./a.log --api-socket a.sock \
        2>restore.err &
    wait_phase a.sock running
    result linux_guest_update_restored $? "$(cat restore.err)"
    sleep 6
    check 2
    if [ -n "$nvme_timeout" ]; then
        # A reset controller is found by the driver's timeouts (an I/O's, then its abort's),
        # then reset again and set up anew: ask again until the judge has seen the driver's
        # reset and blocks verified after it (the last check is the verdict), for 3 minutes
        # at most.
        round=2 # (wait_line uses n)
        while [ $round -lt 38 ] && ! grep "LUVMM-LINUX-CHECK {\"checks\":$round," a.log |
            grep -q '"controller_resets":[1-9]'; do
            sleep 5
            round=$((round + 1))
            check $round
        done
        sleep 4
        check $((round + 1))
    fi
    luvmm ctl --socket a.sock status | sed 's/^/LUVMM-L1 linux status /'
    grep -v LUVMM-LINUX-CHECK a.log | sed 's/^/LUVMM-L1 serial /'
    sed 's/^/LUVMM-L1 log restore: /' restore.err
    luvmm ctl --socket a.sock shutdown >/dev/null
    ;;
esac
