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
2) agent-scenario stage2 --socket $socket ;;
esac
sed 's/^/LUVMM-L1 log agent: /' /tmp/agent.err
kill $agent 2>/dev/null
