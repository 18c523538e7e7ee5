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

kill_when_stopped() { # kill_when_stopped PID: once PID stopped itself (a test fault), SIGKILL
    i=0
    while ! grep -q '^State:.*stopped' /proc/$1/status 2>/dev/null && [ $i -lt 300 ]; do
        sleep 0.1; i=$((i + 1))
    done
    kill -9 $1
    wait $1 2>/dev/null
}

result() { # result NAME EXIT-CODE DETAIL: one test line, ok when EXIT-CODE is 0
    if [ "$2" = 0 ]; then echo "LUVMM-L1 test $1 ok"; else echo "LUVMM-L1 test $1 FAIL $3"; fi
}

phase() { # phase SOCKET: the VM's phase, as its luvmm reports it
    luvmm ctl --socket "$1" status 2>/dev/null | sed -n 's/.*"phase":"\([a-z_]*\)".*/\1/p'
}

wait_phase() { # wait_phase SOCKET PHASE: up to 30 s
    i=0
    while [ "$(phase "$1")" != "$2" ]; do
        i=$((i + 1)); [ $i -gt 300 ] && return 1; sleep 0.1
    done
}

wait_line() { # wait_line LOG PATTERN [COUNT]: up to 60 s for COUNT lines matching PATTERN
    i=0
    while n=$(grep -c "$2" "$1" 2>/dev/null); [ "${n:-0}" -lt "${3:-1}" ]; do
        i=$((i + 1)); [ $i -gt 600 ] && return 1; sleep 0.1
    done
}

last_whole() { # last_whole LOG PATTERN: the last line matching PATTERN that the guest finished
    # A check requested at the resume and one asked for later may follow each other: the
    # later one can be half written when the earlier one is found, so only whole lines count.
    head -n "$(wc -l < "$1")" "$1" | grep "$2" | tail -1
}

whole_lines() { # whole_lines LOG: waits (up to 5 s) until the guest finished its last line
    i=0
    while [ "$(tail -c1 "$1" 2>/dev/null | od -An -tx1 | tr -d ' ')" != 0a ] && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
}

selftest() { # selftest NAME ARGS...: runs a kernel selftest and reports it in one line
    name=$1; shift
    "/selftests/$name" "$@" > "/tmp/$name.log" 2>&1
    code=$?
    # A skipped test passes nothing: kselftest exits 4 for a skip, and a harness test that
    # skips one case still exits 0, so its TAP output is read too.
    skips=$(grep -cE '# SKIP|skip:[1-9]' "/tmp/$name.log")
    if [ "$code" = 0 ] && [ "$skips" = 0 ]; then
        echo "LUVMM-L1 selftest $name $* ok"
    else
        echo "LUVMM-L1 selftest $name $* FAIL (exit $code, $skips skip lines)"
        sed 's/^/LUVMM-L1 log /' "/tmp/$name.log" | tail -20
    fi
}

hostcheck() { # luvmm host-check --json as one line: hostcheck stage=$stage exit=CODE JSON
    luvmm host-check --json >/tmp/hostcheck.json 2>/tmp/hostcheck.err
    code=$?
    echo "LUVMM-L1 hostcheck stage=$stage exit=$code $(tr -d '\n' </tmp/hostcheck.json)"
    sed 's/^/LUVMM-L1 log /' /tmp/hostcheck.err
}

nvme_bdf() { # nvme_bdf: the BDF of L1's (last) QEMU NVMe controller
    for dev in /sys/bus/pci/devices/*; do
        [ "$(cat "$dev/vendor"):$(cat "$dev/device")" = 0x1b36:0x0010 ] && echo "${dev##*/}"
    done | tail -1
}
