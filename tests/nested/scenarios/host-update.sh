#!/bin/sh
# The host-wide update as an operator runs it: two VMs booted by `luvmm start` from their
# configs in /etc/luvmm, `a` with an edu device and `b` without.
#   stage 1: `luvmm update run` finds both from their configs. Blocked by the pre-flight (no
#            --known-good-kernel): exit 3, nothing touched. With --require-preserved-devices
#            (Linux 7.2 preserves no VFIO device) `a` cannot be staged while `b` is: called
#            off for both, exit 4, both guests run on. Then for real: every VM staged, then
#            all prepared together, then the kexec.
#   stage 2: `update status` names both as not back (exit 3); `luvmm start` for both, side by
#            side, restores each from its session; each guest's own memory check and a device
#            round; `update status` then says every VM is back (exit 0).
stage=$1
cd /tmp
. /luvmm/steps.sh
agent_sock=/tmp/agent.sock
bdf=$(ls -d /sys/bus/pci/drivers/vfio-pci/0000:00:* | head -1)
bdf=${bdf##*/}
check() { # check SOCKET LOG NTH: asks the guest for its memory check, prints it once whole
    luvmm ctl --socket "$1" check >/dev/null
    wait_line "$2" "LUVMM-CHECK" "$3"
    whole_lines "$2"
    echo "LUVMM-L1 host-update check $(last_whole "$2" LUVMM-CHECK)"
}
round() { # round N: a's device round N (DMA and its interrupt)
    luvmm ctl --socket a.sock guest devices >/dev/null
    wait_line a.log "LUVMM-ROUND done n=$1 "
    result "host_update_device_round_$1" \
        $(grep -q "LUVMM-ROUND ok n=$1 .* dma=ok irq=msi" a.log; echo $?) \
        "$(grep "LUVMM-ROUND .*n=$1 " a.log | tr '\n' ' ')"
}
start_vm() { # start_vm ID: `luvmm start --vm ID`, as luvmm@ID.service runs it; pid in $started
    luvmm start --vm "$1" --agent-socket $agent_sock 2>"$1-start.err" &
    started=$!
}

luvmm agent serve --socket $agent_sock 2>agent.err &
i=0
while ! luvmm agent status --socket $agent_sock >/dev/null 2>&1 && [ $i -lt 100 ]; do
    sleep 0.1; i=$((i + 1))
done
next="--kernel /boot/bzImage --initrd /boot/initrd-stage2.cpio.gz --append luvmm.stage=2"

case "$stage" in
1)
    mkdir -p /etc/luvmm
    cat > /etc/luvmm/a.json <<JSON
{"vcpus": 1, "memory": [{"gpa": 0, "size": 67108864}], "payload": "/luvmm/bin/payload.elf",
 "cmdline": "console=ttyS0 luvmm.fill_pages=512", "serial": {"file": "/tmp/a.log"},
 "api_socket": "/tmp/a.sock", "vfio": ["$bdf"]}
JSON
    cat > /etc/luvmm/b.json <<JSON
{"vcpus": 1, "memory": [{"gpa": 0, "size": 33554432}], "payload": "/luvmm/bin/payload.elf",
 "cmdline": "console=ttyS0 luvmm.fill_pages=256", "serial": {"file": "/tmp/b.log"},
 "api_socket": "/tmp/b.sock"}
JSON
    start_vm a
    wait_scan a.log $started host_update_scan_a
    start_vm b
    wait_line b.log "LUVMM-BOOT"
    wait_phase b.sock running
    round 1
    check a.sock a.log 1
    check b.sock b.log 1

    luvmm update run $next --agent-socket $agent_sock --json > blocked.json 2> blocked.err
    code=$?
    result host_update_run_blocked_by_the_preflight_touches_nothing \
        $([ $code = 3 ] && grep -q '"outcome":"blocked"' blocked.json \
            && grep -q '"kind":"unknown_handlers"' blocked.json \
            && [ "$(phase a.sock)" = running ] && [ "$(phase b.sock)" = running ] \
            && luvmm agent status --socket $agent_sock | grep -q '"vms":\[\]'; echo $?) \
        "exit $code: $(cat blocked.json) $(cat blocked.err)"

    luvmm update run $next --agent-socket $agent_sock --known-good-kernel \
        --require-preserved-devices --json --svg off.svg > off.json 2> off.err
    code=$?
    sed 's/^/LUVMM-L1 log update run (called off): /' off.err
    result host_update_run_called_off_leaves_every_guest_running \
        $([ $code = 4 ] && grep -q '"outcome":"called_off"' off.json \
            && grep -q '"vm":"b".*"staged"' off.json \
            && grep -q ">failed</text>" off.svg && grep -q "called off: running" off.svg \
            && [ "$(phase a.sock)" = running ] && [ "$(phase b.sock)" = running ] \
            && ! luvmm ctl --socket b.sock status | grep -q update_vm_id \
            && luvmm agent status --socket $agent_sock | grep -q '"vms":\[\]'; echo $?) \
        "exit $code: $(cat off.json); a $(phase a.sock), b $(phase b.sock); $(luvmm agent status --socket $agent_sock)"
    round 2
    check a.sock a.log 2
    check b.sock b.log 2

    # For real. The progress goes to the console as it comes: the kexec ends this stage.
    mkfifo progress
    sed 's/^/LUVMM-L1 log update run: /' < progress &
    echo "LUVMM-L1 host-update kexec now"
    luvmm update run $next --agent-socket $agent_sock --known-good-kernel --json \
        > run.json 2> progress
    code=$?
    sleep 60
    echo "LUVMM-L1 test host_update_kexec FAIL still here: exit $code $(cat run.json)"
    ;;
2)
    luvmm agent status --socket $agent_sock > ledger.json
    echo "LUVMM-L1 host-update ledger $(cat ledger.json)"
    luvmm update status --agent-socket $agent_sock --json > before.json
    code=$?
    result host_update_status_names_the_vms_not_back \
        $([ $code = 3 ] && grep -q '"verdict":"not_all_back"' before.json \
            && [ "$(grep -o '"why_not":"no restore has claimed its session yet"' before.json | wc -l)" = 2 ]; echo $?) \
        "exit $code: $(cat before.json)"
    # Both VMs' units start side by side, as systemd starts luvmm@a and luvmm@b.
    start_vm a
    vm_a=$started
    start_vm b
    vm_b=$started
    wait_phase a.sock running
    wait_phase b.sock running
    sed 's/^/LUVMM-L1 log start a: /' a-start.err
    sed 's/^/LUVMM-L1 log start b: /' b-start.err
    # Each restore asks its guest for a check at the resume: the first line after the kexec.
    for vm in a b; do
        wait_line $vm.log "LUVMM-CHECK"
        whole_lines $vm.log
        echo "LUVMM-L1 host-update check $(last_whole $vm.log LUVMM-CHECK)"
    done
    round 3
    check a.sock a.log 2
    luvmm update status --agent-socket $agent_sock --json > after.json
    code=$?
    echo "LUVMM-L1 host-update status exit=$code $(cat after.json)"
    luvmm update status --agent-socket $agent_sock > after.txt
    result host_update_status_says_every_vm_is_back \
        $([ $code = 0 ] && grep -q '"verdict":"all_back"' after.json \
            && grep -q "verdict: every VM is back (2 of 2)" after.txt; echo $?) \
        "exit $code: $(cat after.json) $(cat after.txt)"
    stop_vm a.sock $vm_a
    stop_vm b.sock $vm_b
    ;;
esac
sed 's/^/LUVMM-L1 log agent: /' agent.err
