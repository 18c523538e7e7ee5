#!/bin/sh
# `luvmm update release` with the bed's VFIO handler on: stage 1 prepares a VM with one edu
# device through the agent (the device is preserved) and the agent kexecs; stage 2 finds the
# device incoming (the kernel refuses its normal open with EBUSY), releases the VM's session
# without restoring it, and then opens the device the normal way. Before that release, a
# restore is killed once it bound the device, and a release right after its claim.
stage=$1
cd /tmp
. /luvmm/steps.sh
agent_sock=/tmp/agent.sock
bdf=$(ls -d /sys/bus/pci/drivers/vfio-pci/0000:00:* | head -1)
bdf=${bdf##*/}
luvmm agent serve --socket $agent_sock 2>agent.err &
i=0
while [ ! -S $agent_sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
case "$stage" in
1)
    luvmm run --payload /luvmm/bin/payload.elf --memory-mib 16 --vfio "$bdf" --serial ./r.log \
        --api-socket r.sock 2>r.err &
    wait_scan r.log $! release_scan
    luvmm ctl --socket r.sock update prepare --vm-id r1 --agent-socket $agent_sock \
        --require-preserved-devices > prep.json 2>&1
    echo "LUVMM-L1 release prepare $(tr -d '\n' < prep.json)"
    luvmm agent update --socket $agent_sock --kernel /boot/bzImage \
        --initrd /boot/initrd-stage2.cpio.gz --append luvmm.stage=2 > kexec.out 2>&1
    sleep 60
    echo "LUVMM-L1 test release_kexec FAIL still here: $(cat kexec.out)"
    ;;
2)
    echo "LUVMM-L1 release before $(vfio-lu open "$bdf")"
    # A restore killed once it bound the preserved device to its iommufd: the device's file
    # stays bound there (VFIO has no unbind), so that guest cannot be restored again, but the
    # release below must still free the device.
    LUVMM_TEST_FAULTS=stop-after-device-bind luvmm restore --session r1 \
        --agent-socket $agent_sock --serial ./killed.log 2> killed-restore.err &
    kill_when_stopped $!
    sed 's/^/LUVMM-L1 log killed restore: /' killed-restore.err
    bound=$(grep -c "test fault: stopping here" killed-restore.err)
    # A release killed right after its claim: the agent keeps the session, and the release
    # below gets it.
    LUVMM_TEST_FAULTS=stop-after-claim luvmm update release --session r1 \
        --agent-socket $agent_sock > killed.out 2>&1 &
    kill_when_stopped $!
    status=$(luvmm agent status --socket $agent_sock)
    result nothing_lost_a_release_killed_after_its_claim_leaves_the_session \
        $(echo "$status" | grep -q '"vm":"r1","session":"luvmm-r1","phase":"failed"'; echo $?) \
        "$status"
    luvmm update release --session r1 --agent-socket $agent_sock > release.json 2> release.err
    released=$?
    echo "LUVMM-L1 release exit=$released $(cat release.json)"
    sed 's/^/LUVMM-L1 log release: /' release.err
    after=$(vfio-lu open "$bdf")
    echo "LUVMM-L1 release after $after"
    result nothing_lost_a_release_frees_a_device_a_killed_restore_left_bound \
        $([ "$bound" = 1 ] && [ $released = 0 ] && echo "$after" | grep -q " ok$"; echo $?) \
        "killed restore stopped after the bind: $bound; release exit $released; after: $after"
    dmesg | grep "luvmm-lu" | sed 's/^/LUVMM-L1 log /'
    ;;
esac
kill %1 2>/dev/null
