#!/bin/sh
# A luvmm microVM inside L1 (nested KVM): boot the test payload, check it, save it, restore it
# in a new process, and check it again.
wait_line() { # wait_line FILE PATTERN COUNT
    i=0
    while [ "$(cat "$1" 2>/dev/null | grep -c "$2")" -lt "$3" ]; do
        i=$((i + 1))
        [ $i -gt 600 ] && { echo "LUVMM-L1 test wait_$2 FAIL timed out"; cat "$1"; return 1; }
        sleep 0.1
    done
}
cd /tmp
luvmm run --payload /luvmm/bin/payload.elf --memory-mib 64 --vcpus 2 --serial ./serial.log --api-socket a.sock 2>run.err &
first=$!
wait_line serial.log LUVMM-BOOT 1 && echo "LUVMM-L1 test nested_boot ok"
luvmm ctl --socket a.sock check >/dev/null
wait_line serial.log LUVMM-CHECK 1 && echo "LUVMM-L1 test nested_check ok"
luvmm ctl --socket a.sock save >/dev/null
luvmm restore --from-socket a.sock --serial ./serial.log --api-socket b.sock 2>restore.err &
wait_line serial.log LUVMM-CHECK 2 && echo "LUVMM-L1 test nested_restore ok"
kill -9 $first
luvmm ctl --socket b.sock shutdown >/dev/null
sed 's/^/LUVMM-L1 serial /' serial.log
sed 's/^/LUVMM-L1 log /' run.err restore.err
