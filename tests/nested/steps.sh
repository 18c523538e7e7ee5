# Shell steps the nested scenarios share; sourced, in L1, from /luvmm/steps.sh.

wait_scan() { # wait_scan LOG PID NAME: waits for the guest's PCI scan to end
    i=0
    while ! grep -q "LUVMM-DEV scan done" "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 1200 ] || ! kill -0 "$2" 2>/dev/null; then
            echo "LUVMM-L1 test $3 FAIL the guest never finished its PCI scan"
            return 1
        fi
        sleep 0.1
    done
}

stop_vm() { # stop_vm SOCKET PID: asks the VMM to shut down; kills it if it is not gone in 10 s
    luvmm ctl --socket "$1" shutdown >/dev/null 2>&1
    i=0
    while kill -0 "$2" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -9 "$2" 2>/dev/null
    wait "$2" 2>/dev/null
}
