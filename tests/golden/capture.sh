#!/usr/bin/env bash
# Writes a golden state: a 4 MiB, 2-vCPU payload VM saved by this luvmm, its RAM, and its last
# check line, into tests/golden/<format major.minor>/. Checked in, they are restored by the
# `golden` test of every later luvmm, so a format change that breaks old states fails CI.
#   capture.sh LUVMM     (e.g. target/debug/luvmm)
set -euo pipefail
luvmm=${1:?usage: capture.sh LUVMM}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
vmm=
trap 'kill $vmm 2>/dev/null || true; rm -rf "$work"' EXIT
bash "$here/../guest/build.sh" "$work"
payload=$work/payload.elf
wait_for() { # wait_for PATTERN
    for _ in $(seq 300); do grep -q "$1" "$work/serial.log" 2>/dev/null && return 0; sleep 0.1; done
    echo "capture.sh: no '$1' from the guest" >&2; exit 1
}
"$luvmm" run --payload "$payload" --memory-mib 4 --vcpus 2 --serial "$work/serial.log" \
    --api-socket "$work/vm.sock" & vmm=$!
wait_for LUVMM-SMP
"$luvmm" ctl --socket "$work/vm.sock" check >/dev/null
wait_for LUVMM-CHECK
"$luvmm" ctl --socket "$work/vm.sock" save --export "$work/state.bin" >/dev/null
format=$(od -An -tu2 -j8 -N4 "$work/state.bin" | awk '{print $1 "." $2}')
out=$here/$format
mkdir -p "$out"
ram=
for fd in /proc/"$vmm"/fd/*; do
    if [ "$(readlink "$fd")" = "/memfd:luvmm-ram0 (deleted)" ]; then ram=$fd; break; fi
done
[ -n "$ram" ] || { echo "capture.sh: no RAM memfd in /proc/$vmm/fd" >&2; exit 1; }
gzip -9 -n < "$ram" > "$out/ram0.gz"
cp "$work/state.bin" "$out/state.bin"
grep LUVMM-CHECK "$work/serial.log" | tail -1 > "$out/check"
echo "capture.sh: wrote $out ($(wc -c < "$out/state.bin") byte state, $(wc -c < "$out/ram0.gz") byte RAM image)"
