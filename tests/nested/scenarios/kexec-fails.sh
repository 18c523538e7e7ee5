#!/bin/sh
# A kexec that fails after the kernel froze a VM's device. L1's kernel runs luvmm's VFIO
# handler in reset mode (vfio_pci.luvmm_lu=reset), so freezing vm1's edu device resets it and
# its file gives EIO from then on. A second VMM (agent-scenario noisy), subscribed after vm1
# (sessions freeze in the order they were made), holds the other edu device with its MSI on,
# and its freeze makes reboot() fail. The agent calls the update off; vm1's luvmm follows,
# opens its device again under the guest's unchanged view of it, and the guest must drive it
# again (a new DMA and its MSI) with its RAM intact and its heartbeat going on.
stage=$1
cd /tmp
. /luvmm/steps.sh
payload=/luvmm/bin/payload.elf
agent_sock=/tmp/agent.sock
if [ "$stage" != 1 ]; then
    echo "LUVMM-L1 test kexec_fails_refused FAIL the kexec went through (stage $stage)"
    exit 0
fi
set -- $(ls -d /sys/bus/pci/drivers/vfio-pci/0000:00:* | sed 's|.*/||')
mine=$1
noisy=$2
round() { # round N: the guest drives its device; ok with a DMA and an MSI
    luvmm ctl --socket a.sock guest devices >/dev/null
    wait_line a.log "LUVMM-ROUND done n=$1 "
    result "kexec_fails_round_$1" $(grep -q "LUVMM-ROUND ok n=$1 .* dma=ok irq=msi" a.log; echo $?) \
        "$(grep "LUVMM-ROUND .*n=$1 " a.log | tr '\n' ' ')"
}
check() { # check NTH: the guest's NTH memory check line, once whole
    luvmm ctl --socket a.sock check >/dev/null
    wait_line a.log "LUVMM-CHECK" "$1"
    whole_lines a.log
    echo "LUVMM-L1 kexec_fails check $(last_whole a.log LUVMM-CHECK)"
}

luvmm agent serve --socket $agent_sock 2>agent.err &
i=0
while [ ! -S $agent_sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
luvmm run --payload $payload --memory-mib 64 --vfio "$mine" --serial ./a.log --api-socket a.sock \
    --cmdline "console=ttyS0 luvmm.fill_pages=512" 2>a.err &
vmm=$!
wait_scan a.log $vmm kexec_fails_scan
round 1
check 1
luvmm ctl --socket a.sock update prepare --vm-id vm1 --agent-socket $agent_sock > prep.json 2>&1
result kexec_fails_prepared \
    $([ "$(phase a.sock)" = preserved ] && grep -q '"preserved":true' prep.json; echo $?) \
    "phase $(phase a.sock): $(cat prep.json)"
agent-scenario noisy --socket $agent_sock --vm noisy --vfio "$noisy" --seconds 300 \
    > noisy.out 2>&1 &
holder=$!
wait_line noisy.out "^ready luvmm-noisy"
echo "LUVMM-L1 kexec_fails noisy $(cat noisy.out)"
# The update, under the open watcher until vm1 runs again.
vfio-open-watch -- sh -c '
    luvmm agent update --socket "$0" --kernel /boot/bzImage \
        --initrd /boot/initrd-stage2.cpio.gz --append luvmm.stage=2 > update.out 2>&1 || exit 1
    i=0
    while ! luvmm ctl --socket a.sock status 2>/dev/null | grep -q "\"phase\":\"running\""; do
        i=$((i + 1)); [ $i -gt 600 ] && exit 1; sleep 0.1
    done' $agent_sock > watch.out 2> watch.err
sed "s/^/LUVMM-L1 watch cancel /" watch.out
echo "LUVMM-L1 kexec_fails update $(cat update.out) $(cat watch.err)"
# The kernel's own account: vm1's device was reset by its freeze, the noisy one refused it.
result kexec_fails_mine_reset_by_the_freeze \
    $(dmesg | grep -q "$mine: luvmm-lu: \(reset for the live update\|no reset method\)"; echo $?) \
    "$(dmesg | grep luvmm-lu | tail -5)"
result kexec_fails_noisy_refused_the_freeze \
    $(dmesg | grep -q "$noisy: luvmm-lu: cannot freeze: a VFIO interrupt is enabled"; echo $?) \
    "$(dmesg | grep luvmm-lu | tail -5)"
status=$(luvmm agent status --socket $agent_sock)
result kexec_fails_called_off $([ "$(phase a.sock)" = running ] \
    && ! echo "$status" | grep -q '"vm":"vm1"' \
    && echo "$status" | grep -q '"vm":"noisy","session":"luvmm-noisy","phase":"cancelled"'; echo $?) \
    "phase $(phase a.sock); $status"
round 2
check 2
kill $holder 2>/dev/null
sed 's/^/LUVMM-L1 log a: /' a.err
stop_vm a.sock $vmm
sed 's/^/LUVMM-L1 log agent: /' agent.err
