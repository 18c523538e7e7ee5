#!/usr/bin/env bash
# The luvmm demo: boot the test payload, save it, kill the VMM, restore it in a new process,
# and show the guest's own verdict. Run from a fresh clone: bash tests/demo.sh (it runs the
# setup step for what it needs: binutils).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo: cargo (Rust) is needed" >&2; exit 1; }
bash tests/setup.sh demo
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "demo: /dev/kvm is missing or not accessible" >&2; exit 1; }

cargo build --release -q -p luvmm-vmm --bin luvmm
luvmm=target/release/luvmm
bash tests/guest/build.sh target/guest
work=$(mktemp -d)
trap 'kill $first $second 2>/dev/null || true; rm -rf "$work"' EXIT
first=; second=
wait_for() { # wait_for FILE PATTERN COUNT
    for _ in $(seq 600); do
        [ "$(grep -c "$2" "$1" 2>/dev/null || true)" -ge "$3" ] && return 0
        sleep 0.05
    done
    echo "demo: timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

echo "== boot the payload (256 MiB, 2 vCPUs) in VMM #1"
$luvmm run --payload target/guest/payload.elf --memory-mib 256 --vcpus 2 \
    --serial "$work/serial.log" --api-socket "$work/first.sock" & first=$!
wait_for "$work/serial.log" LUVMM-BOOT 1
$luvmm ctl --socket "$work/first.sock" check
wait_for "$work/serial.log" LUVMM-CHECK 1
echo "== pause and save VMM #1's state into a memfd"
$luvmm ctl --socket "$work/first.sock" save
echo "== restore in VMM #2 from VMM #1's memfds (SCM_RIGHTS), then kill VMM #1"
$luvmm restore --from-socket "$work/first.sock" --serial "$work/serial.log" \
    --api-socket "$work/second.sock" & second=$!
wait_for "$work/serial.log" LUVMM-CHECK 2
kill -9 "$first"; wait "$first" 2>/dev/null || true; first=
$luvmm ctl --socket "$work/second.sock" status
echo "== the guest's serial log (one boot, the heartbeat and check counter go on across the switch)"
cat "$work/serial.log"
$luvmm ctl --socket "$work/second.sock" shutdown
wait "$second" || true; second=
grep -q "LUVMM-CHECK LOST" "$work/serial.log" && { echo "demo: guest memory was lost" >&2; exit 1; }
echo "== demo passed"
