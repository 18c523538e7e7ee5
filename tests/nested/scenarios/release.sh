#!/bin/sh
# A preserved device after a restore failed, with the bed's VFIO handler on: stage 1 prepares
# two VMs with one edu device each through the agent (both devices preserved) and the agent
# kexecs. In stage 2, restores are killed once they bound a VM's preserved device to their
# iommufd. r1 is then restored again: the agent kept that iommufd, so the next restore
# carries on in it, and the guest's device and memory must work. r2 is released without a
# restore, after a release killed right after its claim: its device, incoming (the kernel
# refuses its normal open with EBUSY) until then, must open normally afterwards. Between the
# two, the agent is killed and started again.
stage=$1
cd /tmp
. /luvmm/steps.sh
agent_sock=/tmp/agent.sock
set -- $(ls -d /sys/bus/pci/drivers/vfio-pci/0000:00:* | head -2)
bdf1=${1##*/}
bdf2=${2##*/}
start_agent() { # start_agent: serves the agent on $agent_sock; its pid in $agent
    luvmm agent serve --socket $agent_sock 2>>agent.err &
    agent=$!
    i=0
    while ! luvmm agent status --socket $agent_sock >/dev/null 2>&1 && [ $i -lt 100 ]; do
        sleep 0.1; i=$((i + 1))
    done
}
start_agent
killed_at() { # killed_at FAULT VM: a restore of VM killed where FAULT stops it; sets $bound
    # to 1 when the restore got there
    LUVMM_TEST_FAULTS=$1 luvmm restore --session "$2" --agent-socket $agent_sock \
        --serial "./killed-$2.log" 2> "killed-$2.err" &
    kill_when_stopped $!
    sed "s/^/LUVMM-L1 log killed restore $2 ($1): /" "killed-$2.err"
    bound=$(grep -c "test fault: stopping here" "killed-$2.err")
}
case "$stage" in
1)
    for vm in r1 r2; do
        bdf=$bdf1; [ $vm = r2 ] && bdf=$bdf2
        luvmm run --payload /luvmm/bin/payload.elf --memory-mib 16 --vfio "$bdf" \
            --serial ./$vm.log --api-socket $vm.sock \
            --cmdline "console=ttyS0 luvmm.fill_pages=256" 2>$vm.err &
        wait_scan $vm.log $! release_scan_$vm
        luvmm ctl --socket $vm.sock update prepare --vm-id $vm --agent-socket $agent_sock \
            --require-preserved-devices > prep-$vm.json 2>&1
        echo "LUVMM-L1 release prepare $vm $(tr -d '\n' < prep-$vm.json)"
    done
    luvmm agent update --socket $agent_sock --kernel /boot/bzImage \
        --initrd /boot/initrd-stage2.cpio.gz --append luvmm.stage=2 > kexec.out 2>&1
    sleep 60
    echo "LUVMM-L1 test release_kexec FAIL still here: $(cat kexec.out)"
    ;;
2)
    # r1: restored after two restores were killed with its device bound: the first before it
    # could record the bind with the agent (the second finds the device among the iommufd's
    # objects), the second once it had.
    killed_at stop-before-device-record r1
    unrecorded=$bound
    found=$(grep -c "found bound by the failed restore, which had not recorded it" killed-r1.err)
    killed_at stop-after-device-bind r1
    # The agent killed and started again: it takes r1's session and iommufd back from its
    # holder (the session was retrieved in this boot; LUO would not give it again).
    kill -9 $agent
    wait $agent 2>/dev/null
    start_agent
    took=$(grep -c "took VM r1's session back from the holder" agent.err)
    luvmm restore --session r1 --agent-socket $agent_sock --serial ./r1b.log \
        --api-socket r1b.sock 2> r1b.err &
    r1=$!
    wait_phase r1b.sock running
    luvmm ctl --socket r1b.sock guest devices >/dev/null
    wait_line r1b.log "LUVMM-ROUND done n=1 "
    luvmm ctl --socket r1b.sock check >/dev/null
    wait_line r1b.log "LUVMM-CHECK"
    whole_lines r1b.log
    sed 's/^/LUVMM-L1 log restore r1 again: /' r1b.err
    round=$(grep "LUVMM-ROUND ok n=1 " r1b.log)
    memory=$(last_whole r1b.log LUVMM-CHECK)
    status=$(luvmm agent status --socket $agent_sock)
    result nothing_lost_an_agent_killed_after_a_failed_restore_takes_its_session_back \
        $([ "$took" = 1 ] && echo "$memory" | grep -q "LUVMM-CHECK ok"; echo $?) \
        "took back: $took; check: $memory; $(grep "agent" agent.err | tail -5 | tr '\n' ' ')"
    result nothing_lost_a_restore_killed_after_it_bound_a_preserved_device_can_be_run_again \
        $([ "$unrecorded" = 1 ] && [ "$found" = 0 ] && [ "$bound" = 1 ] \
            && grep -q "found bound by the failed restore, which had not recorded it" killed-r1.err \
            && echo "$round" | grep -q "dma=ok irq=msi" \
            && echo "$memory" | grep -q "LUVMM-CHECK ok" \
            && grep -q "as the failed restore bound it" r1b.err \
            && echo "$status" | grep -q '"vm":"r1","session":"luvmm-r1","phase":"finished"'; echo $?) \
        "stopped before the record: $unrecorded; after the bind: $bound; round: $round; check: $memory; $status"
    stop_vm r1b.sock $r1
    # r2: released without a restore.
    echo "LUVMM-L1 release before $(vfio-lu open "$bdf2")"
    killed_at stop-after-device-bind r2
    # A release killed right after its claim: the agent keeps the session, and the release
    # below gets it.
    LUVMM_TEST_FAULTS=stop-after-claim luvmm update release --session r2 \
        --agent-socket $agent_sock > killed.out 2>&1 &
    kill_when_stopped $!
    status=$(luvmm agent status --socket $agent_sock)
    result nothing_lost_a_release_killed_after_its_claim_leaves_the_session \
        $(echo "$status" | grep -q '"vm":"r2","session":"luvmm-r2","phase":"failed"'; echo $?) \
        "$status"
    luvmm update release --session r2 --agent-socket $agent_sock > release.json 2> release.err
    released=$?
    echo "LUVMM-L1 release exit=$released $(cat release.json)"
    sed 's/^/LUVMM-L1 log release: /' release.err
    after=$(vfio-lu open "$bdf2")
    echo "LUVMM-L1 release after $after"
    result nothing_lost_a_release_frees_a_device_a_killed_restore_left_bound \
        $([ "$bound" = 1 ] && [ $released = 0 ] && echo "$after" | grep -q " ok$"; echo $?) \
        "killed restore stopped after the bind: $bound; release exit $released; after: $after"
    dmesg | grep "luvmm-lu" | sed 's/^/LUVMM-L1 log /'
    ;;
esac
sed 's/^/LUVMM-L1 log agent: /' agent.err
kill $agent 2>/dev/null
