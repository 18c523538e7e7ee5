#!/bin/sh
# The LUO scenario: the kernel's own LUO selftests first, then luvmm's, across a real kexec.
stage=$1
# selftest and hostcheck, shared with the vfio-lu scenario.
. /luvmm/steps.sh
case "$stage" in
1)
    hostcheck
    selftest liveupdate
    selftest luo_kexec_simple --stage 1
    selftest luo_multi_session --stage 1
    luo-scenario stage1 --kernel /boot/bzImage --initrd /boot/initrd-stage2.cpio.gz
    ;;
2)
    hostcheck
    selftest luo_kexec_simple --stage 2
    selftest luo_multi_session --stage 2
    # The agent's ledger does not read back (stage 1 preserved garbage in its place): the
    # agent refuses to start, again when started again, rather than forget the VM session
    # waiting in the kernel; once the operator names the VM, its session is handed out.
    sock=/tmp/agent.sock
    luvmm agent serve --socket $sock > garbage1.out 2>&1
    code1=$?
    result nothing_lost_a_garbage_ledger_is_refused \
        $([ $code1 != 0 ] && grep -q "ledger does not read back" garbage1.out; echo $?) \
        "exit $code1: $(cat garbage1.out)"
    luvmm agent serve --socket $sock > garbage2.out 2>&1
    code2=$?
    result nothing_lost_a_garbage_ledger_is_refused_again \
        $([ $code2 != 0 ] && grep -q "rebuild-ledger" garbage2.out; echo $?) \
        "exit $code2: $(cat garbage2.out)"
    luvmm agent serve --socket $sock --rebuild-ledger orphan 2> rebuilt.err &
    agent=$!
    i=0
    while [ ! -S $sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    luo-scenario claim-orphan --socket $sock
    kill $agent
    wait $agent
    sed 's/^/LUVMM-L1 log agent: /' rebuilt.err
    luo-scenario stage2
    hostcheck
    ;;
esac
