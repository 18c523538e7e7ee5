#!/bin/sh
# A host live update of a microVM with two edu devices, across a real kexec.
#   stage 1: the agent starts; the guest fills its RAM and drives its devices; an update is
#            prepared and cancelled (the guest goes on in place), prepared again, and the agent
#            kexecs.
#   stage 2: the next kernel's agent takes its ledger over; luvmm restores the VM from its
#            session under vfio-open-watch (Linux 7.2 preserves no VFIO device: both are opened
#            again), the guest's own check must find its RAM intact, and its devices must do a
#            new DMA with its interrupt; the session cannot be claimed twice.
#            A restore killed right after its claim (each VM) leaves the session to the next one;
#            the agent, killed before the first claim, is started again and still knows both.
stage=$1
cd /tmp
. /luvmm/steps.sh
payload=/luvmm/bin/payload.elf
agent_sock=/tmp/agent.sock
bdfs=""
for dev in /sys/bus/pci/drivers/vfio-pci/0000:00:*; do
    [ -e "$dev" ] && bdfs="$bdfs ${dev##*/}"
done
count=$(echo $bdfs | wc -w)
round() { # round SOCKET LOG N
    luvmm ctl --socket "$1" guest devices >/dev/null
    wait_line "$2" "LUVMM-ROUND done n=$3 "
    ok=$(grep -c "LUVMM-ROUND ok n=$3 .* dma=ok irq=msi" "$2")
    result "update_round_$3" $([ "$ok" = "$count" ]; echo $?) "$(grep "LUVMM-ROUND .*n=$3 " "$2" | tr '\n' ' ')"
}
last_check() { # last_check LOG NTH: prints the guest's NTH memory check line, once whole
    wait_line "$1" "LUVMM-CHECK" "$2"
    whole_lines "$1"
    echo "LUVMM-L1 update check $(last_whole "$1" LUVMM-CHECK)"
}
check() { # check SOCKET LOG NTH: asks the guest for its memory check
    luvmm ctl --socket "$1" check >/dev/null
    last_check "$2" "$3"
}

luvmm agent serve --socket $agent_sock 2>agent.err &
agent=$!
i=0
while [ ! -S $agent_sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done

case "$stage" in
1)
    args=""
    for b in $bdfs; do args="$args --vfio $b"; done
    luvmm run --payload $payload --memory-mib 64 $args --serial ./a.log --api-socket a.sock \
        --cmdline "console=ttyS0 luvmm.fill_pages=512" 2>a.err &
    vmm=$!
    wait_scan a.log $vmm update_scan
    round a.sock a.log 1
    check a.sock a.log 1
    # The pre-flight: this kernel cannot preserve the devices (warnings), and nobody has said
    # the next kernel carries the same handlers (a blocker until the operator does).
    next="--kernel /boot/bzImage --initrd /boot/initrd-stage2.cpio.gz --append luvmm.stage=2"
    luvmm update check $next --agent-socket $agent_sock --vm a.sock --json > check1.json
    code1=$?
    luvmm update check $next --agent-socket $agent_sock --vm a.sock --known-good-kernel \
        --json > check2.json
    code2=$?
    luvmm update check --kernel /nonexistent --agent-socket $agent_sock --known-good-kernel \
        > check3.out
    code3=$?
    echo "LUVMM-L1 update check1 exit=$code1 $(cat check1.json)"
    echo "LUVMM-L1 update check2 exit=$code2 $(cat check2.json)"
    result update_preflight_blocks_an_unknown_kernel \
        $([ $code1 = 3 ] && grep -q '"kind":"unknown_handlers"' check1.json; echo $?) \
        "exit $code1: $(cat check1.json)"
    result update_preflight_passes_a_known_good_kernel \
        $([ $code2 = 0 ] && [ "$(grep -o '"handler":"absent"' check2.json | wc -l)" = "$count" ]; echo $?) \
        "exit $code2: $(cat check2.json)"
    result update_preflight_blocks_a_kernel_that_does_not_load \
        $([ $code3 = 3 ] && grep -q "does not load: cannot open kernel /nonexistent" check3.out; echo $?) \
        "exit $code3: $(cat check3.out)"
    # Prepared, then called off: the guest goes on where it was.
    luvmm ctl --socket a.sock update prepare --vm-id vm1 --agent-socket $agent_sock > prep1.json 2>&1
    echo "LUVMM-L1 update prepare1 $(cat prep1.json)"
    result update_prepared $([ "$(phase a.sock)" = preserved ] && grep -q '"preserved":false' prep1.json; echo $?) \
        "phase $(phase a.sock): $(cat prep1.json)"
    result update_agent_ready $(luvmm agent status --socket $agent_sock | grep -q '"phase":"ready"'; echo $?) \
        "$(luvmm agent status --socket $agent_sock)"
    luvmm ctl --socket a.sock update cancel > cancel.out 2>&1
    result update_cancelled $([ "$(phase a.sock)" = running ] \
        && luvmm agent status --socket $agent_sock | grep -q '"vms":\[\]'; echo $?) \
        "phase $(phase a.sock): $(cat cancel.out)"
    round a.sock a.log 2
    check a.sock a.log 2
    # A VM id the agent will not take: refused, and the guest runs on.
    luvmm ctl --socket a.sock update prepare --vm-id "bad.id" --agent-socket $agent_sock > bad.out 2>&1
    result update_bad_vm_id_refused $(grep -q "invalid VM id" bad.out && [ "$(phase a.sock)" = running ]; echo $?) \
        "$(cat bad.out)"
    # The agent's deadline: a VMM that subscribes and never gets ready calls the update off
    # for everyone, and vm1's luvmm, which follows the agent, resumes its guest in place.
    agent-scenario hold --socket $agent_sock --vm slow --seconds 60 > hold.out 2>&1 &
    holder=$!
    wait_line hold.out "holding luvmm-slow"
    luvmm ctl --socket a.sock update prepare --vm-id vm1 --agent-socket $agent_sock > prep-d.json 2>&1
    luvmm agent update --socket $agent_sock --kernel /boot/bzImage \
        --initrd /boot/initrd-stage2.cpio.gz --append luvmm.stage=2 --deadline 5 > deadline.out 2>&1
    # The pre-flight while the update is pending leaves the agent's kernel loaded.
    luvmm update check $next --agent-socket $agent_sock --known-good-kernel > pending.out 2>&1
    loaded=$(cat /sys/kernel/kexec_loaded)
    result nothing_lost_a_preflight_leaves_a_pending_updates_kernel_loaded \
        $([ "$loaded" = 1 ] && grep -q "a next kernel is loaded already" pending.out; echo $?) \
        "kexec_loaded=$loaded: $(cat pending.out)"
    wait_phase a.sock running
    status=$(luvmm agent status --socket $agent_sock)
    # vm1 resumed and released its session; the holder's is left cancelled.
    result update_deadline_calls_everyone_off $([ "$(phase a.sock)" = running ] \
        && ! echo "$status" | grep -q '"vm":"vm1"' \
        && echo "$status" | grep -q '"vm":"slow","session":"luvmm-slow","phase":"cancelled"'; echo $?) \
        "phase $(phase a.sock); $(cat deadline.out); $status"
    kill $holder 2>/dev/null
    check a.sock a.log 3
    # A next kernel that does not load: the update is off, and vm1 resumes by itself.
    luvmm ctl --socket a.sock update prepare --vm-id vm1 --agent-socket $agent_sock > prep-k.json 2>&1
    luvmm agent update --socket $agent_sock --kernel /nonexistent > noload.out 2>&1
    noload=$?
    wait_phase a.sock running
    result update_kernel_that_does_not_load_calls_it_off \
        $([ $noload != 0 ] && grep -q "cannot open kernel /nonexistent" noload.out \
            && [ "$(phase a.sock)" = running ]; echo $?) \
        "exit $noload: $(cat noload.out); phase $(phase a.sock)"
    # A second VM, without devices, whose VMM is killed once it is ready: the agent's copy of
    # its session carries it through the kexec.
    luvmm run --payload $payload --memory-mib 32 --serial ./v2.log --api-socket v2.sock \
        --cmdline "console=ttyS0 luvmm.fill_pages=256" 2>v2.err &
    vm2=$!
    wait_scan v2.log $vm2 update_scan_vm2
    check v2.sock v2.log 1
    luvmm ctl --socket v2.sock update prepare --vm-id vm2 --agent-socket $agent_sock > prep-vm2.json 2>&1
    result update_vm2_prepared $([ "$(phase v2.sock)" = preserved ]; echo $?) "$(cat prep-vm2.json)"
    kill -9 $vm2
    # A third VM, whose state carries an MSR no KVM lists (a test fault in its VMM's save):
    # after the kexec its restore is refused by name, and its session released.
    LUVMM_TEST_FAULTS=save-unknown-msr luvmm run --payload $payload --memory-mib 16 \
        --serial ./v3.log --api-socket v3.sock --cmdline "console=ttyS0 luvmm.fill_pages=64" 2>v3.err &
    wait_scan v3.log $! update_scan_vm3
    luvmm ctl --socket v3.sock update prepare --vm-id vm3 --agent-socket $agent_sock > prep-vm3.json 2>&1
    echo "LUVMM-L1 update prepare vm3 $(cat prep-vm3.json)"
    # For real this time.
    luvmm ctl --socket a.sock update prepare --vm-id vm1 --agent-socket $agent_sock > prep2.json 2>&1
    echo "LUVMM-L1 update prepare2 $(cat prep2.json)"
    sed 's/^/LUVMM-L1 log a: /' a.err
    echo "LUVMM-L1 update kexec now"
    luvmm agent update --socket $agent_sock --kernel /boot/bzImage \
        --initrd /boot/initrd-stage2.cpio.gz --append luvmm.stage=2 > kexec.out 2>&1
    sleep 60
    echo "LUVMM-L1 test update_kexec FAIL still here: $(cat kexec.out)"
    ;;
2)
    # The agent killed between the kexec and the first claim: started again, it takes the
    # ledger from the file it keeps and still hands both sessions out (checked below).
    kill -9 $agent
    wait $agent 2>/dev/null
    luvmm agent serve --socket $agent_sock 2>>agent.err &
    agent=$!
    i=0
    while ! luvmm agent status --socket $agent_sock > status.json 2>/dev/null && [ $i -lt 100 ]; do
        sleep 0.1; i=$((i + 1))
    done
    result nothing_lost_the_agent_started_again_before_the_first_claim \
        $(grep -q '"vm":"vm1","session":"luvmm-vm1","phase":"incoming"' status.json \
            && grep -q '"vm":"vm2","session":"luvmm-vm2","phase":"incoming"' status.json; echo $?) \
        "$(cat status.json)"
    # A restore killed right after its claim, or (vm1, whose devices the old kernel did not
    # preserve) once it retrieved the RAM and opened its devices: the agent keeps the session
    # for the next restore, which gets the same RAM memfds (the guest's own check below).
    killed_at() { # killed_at FAULT VM NAME
        LUVMM_TEST_FAULTS=$1 luvmm restore --session "$2" --agent-socket $agent_sock \
            --serial "./killed-$2.log" 2>"killed-$2.err" &
        kill_when_stopped $!
        status=$(luvmm agent status --socket $agent_sock)
        result "nothing_lost_a_restore_killed_$3_leaves_$2_claimable" \
            $(grep -q "test fault: stopping here" "killed-$2.err" \
                && echo "$status" | grep -q "\"vm\":\"$2\",\"session\":\"luvmm-$2\",\"phase\":\"failed\".*exited before it finished"; echo $?) \
            "$status; $(cat "killed-$2.err")"
    }
    killed_at stop-after-claim vm1 after_its_claim
    killed_at stop-after-device-bind vm1 after_it_took_its_ram_and_devices
    killed_at stop-after-claim vm2 after_its_claim
    # A serial path that cannot be opened: refused before the claim, so the restore below
    # still gets the session.
    luvmm restore --session vm1 --agent-socket $agent_sock --serial /nonexistent/dir/a.log \
        > badserial.out 2>&1
    badserial=$?
    result update_bad_serial_refused_before_the_claim \
        $([ $badserial != 0 ] && grep -q "refused before anything was taken" badserial.out; echo $?) \
        "exit $badserial: $(cat badserial.out)"
    # A device the VM needs is not bound to vfio-pci: refused before anything leaves the
    # session, so the restore can be tried again once it is.
    gone=$(echo $bdfs | cut -d' ' -f2)
    echo "$gone" > /sys/bus/pci/drivers/vfio-pci/unbind
    luvmm restore --session vm1 --agent-socket $agent_sock --serial none > unbound.out 2>&1
    unbound=$?
    echo "$gone" > /sys/bus/pci/drivers_probe
    result update_device_missing_refused_before_any_retrieve \
        $([ $unbound != 0 ] && grep -q "nothing was taken from the session (fix it and retry): $gone: bound to no driver, not vfio-pci" unbound.out \
            && [ -e /sys/bus/pci/drivers/vfio-pci/$gone ]; echo $?) "exit $unbound: $(cat unbound.out)"
    vfio-open-watch -- sh -c '
        luvmm restore --session vm1 --agent-socket "$0" --serial ./b.log --api-socket b.sock \
            2>b.err &
        echo $! > b.pid
        i=0
        while ! luvmm ctl --socket b.sock status 2>/dev/null | grep -q "\"phase\":\"running\""; do
            i=$((i + 1)); [ $i -gt 300 ] && exit 1; sleep 0.1
        done' $agent_sock > watch.out 2> watch.err
    sed "s/^/LUVMM-L1 watch restore /" watch.out
    sed 's/^/LUVMM-L1 log b: /' b.err
    vmm=$(cat b.pid)
    last_check b.log 1
    round b.sock b.log 3
    check b.sock b.log 2
    result update_finished $(luvmm ctl --socket b.sock status | grep -q '"finish_ms":[0-9]'; echo $?) \
        "$(luvmm ctl --socket b.sock status)"
    luvmm restore --session vm1 --agent-socket $agent_sock --serial none > again.out 2>&1
    result update_second_restore_refused $(grep -q "restored and finished in this boot" again.out; echo $?) "$(cat again.out)"
    # The VM whose VMM was killed after it was ready comes back too.
    luvmm restore --session vm2 --agent-socket $agent_sock --serial ./v2.log --api-socket v2.sock \
        2>v2.err &
    vm2=$!
    last_check v2.log 1
    sed 's/^/LUVMM-L1 log v2: /' v2.err
    # vm3's saved MSR is not one this kernel's KVM lists: refused by name before any RAM is
    # retrieved, the session kept; a release then gives it back.
    luvmm restore --session vm3 --agent-socket $agent_sock --serial none > msr.out 2>&1
    msr=$?
    status=$(luvmm agent status --socket $agent_sock)
    result nothing_lost_a_saved_msr_this_kvm_lacks_is_refused_by_name \
        $([ $msr != 0 ] && grep -q "MSR 0x4c55564d: saved, and this host's KVM does not list it" msr.out \
            && echo "$status" | grep -q '"vm":"vm3","session":"luvmm-vm3","phase":"failed"'; echo $?) \
        "exit $msr: $(cat msr.out); $status"
    luvmm update release --session vm3 --agent-socket $agent_sock > release3.out 2>&1
    status=$(luvmm agent status --socket $agent_sock)
    result nothing_lost_a_session_whose_restore_failed_can_be_released \
        $(echo "$status" | grep -q '"vm":"vm3","session":"luvmm-vm3","phase":"finished"'; echo $?) \
        "$(cat release3.out); $status"
    luvmm restore --session vm9 --agent-socket $agent_sock --serial none > unknown.out 2>&1
    result update_unknown_session_refused $(grep -q 'no VM "vm9" is known to the agent' unknown.out; echo $?) \
        "$(cat unknown.out)"
    stop_vm v2.sock $vm2
    echo "LUVMM-L1 update status $(luvmm ctl --socket b.sock status)"
    stop_vm b.sock $vmm
    ;;
esac
sed 's/^/LUVMM-L1 log agent: /' agent.err
