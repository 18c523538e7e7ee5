#!/bin/sh
# A microVM with every vfio-pci device on bus 0 (two edu devices and an NVMe controller) moves
# from one luvmm process to another, twice, with its devices: nothing reopened, nothing reset.
#   1. The guest drives every device (round 1), the VM is handed to process B while
#      vfio-open-watch records every VFIO and iommufd open, A is killed, and the guest drives
#      every device again in B (round 2): the NVMe command goes on the admin queue set up at
#      boot (slot 2: no re-initialisation). B adopted the devices before the pause and kept
#      them.
#   2. C builds ahead while the guest runs in B; then the guest leaves interrupts in flight (an
#      edu DMA whose completion interrupt comes after the guest asked to be paused; an NVMe
#      completion behind a masked MSI-X vector), which sets the NVMe up anew, so C adopts the
#      devices again from the state handed over; B is shut down the normal way; in C the edu
#      interrupt has arrived, the NVMe message is still pending and unmasking delivers it;
#      round 3 works.
#   3. Failures, each leaving the guest running in one process: a target that takes the fds
#      and dies (the source resumes), a state with devices but no device fds, and a VM on the
#      legacy VFIO container (refused with the reason).
#   4. Figures: the blackout (source pause to target resume) with 0, 1 and 3 devices.
cd /tmp
payload=/luvmm/bin/payload.elf
. /luvmm/steps.sh
bdfs=""
for dev in /sys/bus/pci/drivers/vfio-pci/0000:00:*; do
    [ -e "$dev" ] && bdfs="$bdfs ${dev##*/}"
done
count=$(echo $bdfs | wc -w)
vfio_args() { for b in "$@"; do printf -- '--vfio %s ' "$b"; done; }
echo "LUVMM-L1 log handover devices:$bdfs"

round() { # round SOCKET LOG N: the guest drives every device; all must be ok
    luvmm ctl --socket "$1" guest devices >/dev/null
    if ! wait_line "$2" "LUVMM-ROUND done n=$3 devices=$count"; then
        result "vfio_handover_round_$3" 1 "no round $3 done line: $(grep LUVMM-ROUND "$2" | tail -3 | tr '\n' ' ')"
        return
    fi
    ok=$(grep -c "LUVMM-ROUND ok n=$3 " "$2")
    result "vfio_handover_round_$3" $([ "$ok" = "$count" ]; echo $?) \
        "$ok of $count devices ok: $(grep "LUVMM-ROUND .* n=$3 " "$2" | tr '\n' ' ')"
}
take_over() { # take_over FROM-SOCKET TO-NAME [BETWEEN]: hands the VM over to a new luvmm,
    # watched. The target builds ahead (devices adopted) from what the source stages; with
    # BETWEEN, the guest runs on at the stage, the target stops there (a test fault), and the
    # shell command BETWEEN runs before the target asks for the VM; without, the VM is paused
    # and saved before the stage.
    if [ -z "$3" ]; then
        luvmm ctl --socket "$1" save > "save-$2.out" 2>&1
        faults=""
    else
        faults=stop-after-stage
    fi
    vfio-open-watch -- sh -c '
        . /luvmm/steps.sh
        LUVMM_TEST_FAULTS="$3" luvmm restore --from-socket "$0" --serial "./$1.log" \
            --api-socket "$1.sock" 2>"$1.err" &
        target=$!
        echo $target > "$1.pid"
        if [ -n "$2" ]; then
            i=0
            while ! grep -q "^State:.*stopped" /proc/$target/status 2>/dev/null; do
                i=$((i + 1)); [ $i -gt 300 ] && exit 1; sleep 0.1
            done
            eval "$2"
            kill -CONT $target
        fi
        i=0
        while ! luvmm ctl --socket "$1.sock" status 2>/dev/null | grep -q "\"phase\":\"running\""; do
            i=$((i + 1)); [ $i -gt 300 ] && exit 1; sleep 0.1
        done' "$1" "$2" "$3" "$faults" > "watch-$2.out" 2> "watch-$2.err"
    sed "s/^/LUVMM-L1 watch handover_$2 /" "watch-$2.out"
    sed "s/^/LUVMM-L1 log watch $2: /" "watch-$2.err"
}
ahead() { # ahead NAME: whether target NAME kept the devices it adopted ahead
    luvmm ctl --socket "$1.sock" status | grep -o '"devices_ahead":[a-z]*' | cut -d: -f2
}

# ---- 1. A to B, A killed
luvmm run --payload $payload --memory-mib 64 $(vfio_args $bdfs) --serial ./a.log \
    --api-socket a.sock --cmdline "console=ttyS0 luvmm.fill_pages=256" 2>a.err &
a=$!
wait_scan a.log $a handover_scan
sed 's/^/LUVMM-L1 serial a /' a.log
round a.sock a.log 1
take_over a.sock b
b=$(cat b.pid)
# Staged while paused: the devices the target adopted ahead are the ones handed over.
result vfio_handover_devices_adopted_ahead_kept $([ "$(ahead b)" = true ]; echo $?) \
    "devices_ahead=$(ahead b): $(grep 'passthrough:.*adopted' b.err | tr '\n' ' ')"
result vfio_handover_source_confirmed $([ "$(phase a.sock)" = handed_over ]; echo $?) \
    "source is $(phase a.sock)"
kill -9 $a; wait $a 2>/dev/null
round b.sock b.log 2
nvme_slot=$(grep -o "n=2 .*nvme=ok irq=msix sq_slot=[0-9]*" b.log | sed 's/.*sq_slot=//')
result vfio_handover_nvme_kept_its_queues $([ "$nvme_slot" = 2 ]; echo $?) \
    "round 2's NVMe command went to slot '$nvme_slot', not 2"
luvmm ctl --socket b.sock check >/dev/null
wait_line b.log "LUVMM-CHECK"
whole_lines b.log
result vfio_handover_memory_intact $(last_whole b.log LUVMM-CHECK | grep -q "LUVMM-CHECK ok"; echo $?) \
    "$(last_whole b.log LUVMM-CHECK)"
sed 's/^/LUVMM-L1 log b: /' b.err

# ---- 2. Interrupts in flight, B to C, B shut down normally. C stages while the guest runs;
# then the guest masks an NVMe MSI-X vector and starts an edu DMA, and asks to be paused: the
# devices C adopted ahead are no longer as the guest set them up, and C adopts them again.
in_flight='luvmm ctl --socket b.sock guest irq_in_flight >/dev/null; wait_phase b.sock paused'
take_over b.sock c "$in_flight"
if [ "$(phase c.sock)" = running ] \
    && grep -q "LUVMM-INFLIGHT armed nvme_held=1 edu_in_flight=1" b.log; then
    c=$(cat c.pid)
    result vfio_handover_devices_set_up_anew_adopted_again \
        $([ "$(ahead c)" = false ] && grep -q "set up anew after the stage" c.err; echo $?) \
        "devices_ahead=$(ahead c): $(grep 'passthrough:.*adopted' c.err | tr '\n' ' ')"
    stop_vm b.sock $b
    luvmm ctl --socket c.sock guest irq_landed >/dev/null
    wait_line c.log "LUVMM-INFLIGHT \(ok\|FAIL\)" 2
    grep "LUVMM-INFLIGHT" c.log | sed 's/^/LUVMM-L1 serial c /'
    result vfio_handover_irq_raised_during_the_switch_arrives \
        $(grep -q "LUVMM-INFLIGHT ok .* edu dma=ok irq=msi$" c.log; echo $?) \
        "$(grep LUVMM-INFLIGHT c.log | tr '\n' ' ')"
    result vfio_handover_pending_msix_kept \
        $(grep -q "LUVMM-INFLIGHT ok .* nvme pending=kept irq=msix" c.log; echo $?) \
        "$(grep LUVMM-INFLIGHT c.log | tr '\n' ' ')"
    # The target saw the signals waiting in the eventfds it was handed (the kernel's count).
    waiting=$(grep -o "interrupts waiting in its eventfds: [1-9]" c.err | wc -l)
    result vfio_handover_signals_waited_in_eventfds $([ "$waiting" -ge 2 ]; echo $?) \
        "$(grep 'interrupts waiting' c.err | tr '\n' ' ')"
    round c.sock c.log 3
    sed 's/^/LUVMM-L1 log c: /' c.err
else
    result vfio_handover_irq_raised_during_the_switch_arrives 1 \
        "the guest never asked to be paused: $(grep LUVMM-INFLIGHT b.log) phase $(phase b.sock), target $(phase c.sock): $(cat c.err)"
    c=$b
    cp b.log c.log
    ln -sf b.sock c.sock
fi

# ---- 3. Failures
# A target that takes the fds and dies: the source resumes, and its devices still work.
luvmm ctl --socket c.sock save >/dev/null 2>&1
if handover-taker c.sock > taker.out 2>&1 && grep -q "devices=$count" taker.out \
    && luvmm ctl --socket c.sock resume >/dev/null; then
    round c.sock c.log 4
else
    result vfio_handover_round_4 1 "handover to the dying target: $(cat taker.out)"
fi
sed 's/^/LUVMM-L1 log taker: /' taker.out
# A state with devices and no device fds: refused before anything is built.
luvmm ctl --socket c.sock save --export devices.bin >/dev/null
ram=""
for fd in /proc/$c/fd/*; do
    case "$(readlink "$fd")" in *luvmm-ram0*) ram=$fd ;; esac
done
luvmm restore --state devices.bin --memory-fd 9 --serial none 9<"$ram" > nofds.out 2>&1
result vfio_handover_state_without_device_fds_refused \
    $(grep -q "they can only come with their fds" nofds.out; echo $?) "$(cat nofds.out)"
luvmm ctl --socket c.sock resume >/dev/null
luvmm ctl --socket c.sock check >/dev/null
wait_line c.log "LUVMM-CHECK" 2
whole_lines c.log
result vfio_handover_guest_runs_after_failures \
    $(last_whole c.log LUVMM-CHECK | grep -q "LUVMM-CHECK ok"; echo $?) \
    "$(last_whole c.log LUVMM-CHECK)"
stop_vm c.sock $c

# The legacy container: refused with the reason, and the VM goes on where it was.
first=$(echo $bdfs | cut -d' ' -f1)
luvmm run --payload $payload --memory-mib 16 --vfio "$first" --vfio-backend legacy \
    --serial ./legacy.log --api-socket l.sock 2>legacy.err &
l=$!
wait_scan legacy.log $l legacy_scan
luvmm ctl --socket l.sock save >/dev/null
luvmm restore --from-socket l.sock --serial none > legacy.out 2>&1
legacy_refused=$?
luvmm ctl --socket l.sock resume >/dev/null
luvmm ctl --socket l.sock check >/dev/null
wait_line legacy.log "LUVMM-CHECK"
whole_lines legacy.log
result vfio_handover_legacy_refused \
    $([ $legacy_refused != 0 ] && grep -q "409.*legacy VFIO container" legacy.out \
        && grep -q "LUVMM-CHECK ok" legacy.log; echo $?) "$(cat legacy.out)"
stop_vm l.sock $l

# ---- 4. Figures: blackout by device count
for n in 0 1 $count; do
    set -- $bdfs
    devs=""
    i=0
    while [ $i -lt $n ]; do devs="$devs $1"; shift; i=$((i + 1)); done
    rm -f f.log f.sock g.sock    # the killed source leaves its socket behind
    luvmm run --payload $payload --memory-mib 64 $(vfio_args $devs) --serial ./f.log \
        --api-socket f.sock --cmdline "console=ttyS0 luvmm.fill_pages=16" 2>f.err &
    f=$!
    if ! wait_scan f.log $f vfio_handover_figure_scan; then
        sed 's/^/LUVMM-L1 log figure: /' f.err
        for p in /proc/[0-9]*; do
            ls -l "$p/fd" 2>/dev/null | grep -q 'vfio\|iommu' \
                && echo "LUVMM-L1 log figure: $(cat "$p/comm") (${p#/proc/}) holds VFIO fds"
        done
    fi
    luvmm ctl --socket f.sock save >/dev/null
    luvmm restore --from-socket f.sock --serial none --api-socket g.sock 2>g.err &
    g=$!
    wait_phase g.sock running
    blackout=$(luvmm ctl --socket g.sock status | sed -n 's/.*"blackout_ms":\([0-9.]*\).*/\1/p')
    echo "LUVMM-L1 figure handover_blackout devices=$n ms=$blackout"
    # Setup: each device opened, bound and attached; guest RAM mapped into the shared IOAS once.
    opens=$(grep -o 'attached in [0-9.]* ms' f.err | grep -o '[0-9.]*' | tr '\n' ',')
    map=$(grep -o 'mapped by file in [0-9.]* ms' f.err | grep -o '[0-9.]*')
    echo "LUVMM-L1 figure setup devices=$n open_ms=${opens%,} map_file_ms=${map:-none}"
    kill -9 $f; wait $f 2>/dev/null
    stop_vm g.sock $g
done
