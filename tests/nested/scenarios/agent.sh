#!/bin/sh
# The live-update agent across a real kexec: stage 1 starts `luvmm agent serve`, and
# agent-scenario plays VMMs against it and asks it for the kexec; stage 2 starts the next
# kernel's agent, which must take the ledger over and hand vm1's session out once.
stage=$1
socket=/tmp/agent.sock
luvmm agent serve --socket $socket 2>/tmp/agent.err &
agent=$!
i=0
while [ ! -S $socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -S $socket ]; then
    echo "LUVMM-L1 test agent_start FAIL $(cat /tmp/agent.err)"
    exit 0
fi
echo "LUVMM-L1 test agent_start ok"
case "$stage" in
1) agent-scenario stage1 --socket $socket --kernel /boot/bzImage --initrd /boot/initrd-stage2.cpio.gz ;;
2)
    agent-scenario stage2 --socket $socket
    # vmbad's state is garbage: luvmm must refuse it before retrieving anything else. The
    # kernel's own count of memfd retrieves (a kprobe on memfd's LUO handler) must be 1.
    t=/sys/kernel/tracing
    [ -e $t/kprobe_events ] || mount -t tracefs tracefs $t
    echo 'p:luvmm_retrieve/memfd memfd_luo_retrieve' >> $t/kprobe_events
    echo > $t/trace
    echo 1 > $t/events/luvmm_retrieve/enable
    luvmm restore --session vmbad --agent-socket $socket --serial none > bad.out 2>&1
    bad=$?
    echo 0 > $t/events/luvmm_retrieve/enable
    retrieves=$(grep -c 'memfd: (memfd_luo_retrieve' $t/trace)
    echo '-:luvmm_retrieve/memfd' >> $t/kprobe_events
    if [ $bad != 0 ] && [ "$retrieves" = 1 ] \
        && grep -q "session luvmm-vmbad: the saved state is refused before anything else is retrieved" bad.out; then
        echo "LUVMM-L1 test agent_corrupt_state_refused_before_any_other_retrieve ok"
    else
        echo "LUVMM-L1 test agent_corrupt_state_refused_before_any_other_retrieve FAIL exit $bad, $retrieves memfd retrieve(s): $(cat bad.out)"
    fi
    ;;
esac
sed 's/^/LUVMM-L1 log agent: /' /tmp/agent.err
kill $agent 2>/dev/null
