#!/usr/bin/env bash
# The luvmm demo, from a fresh clone: bash tests/demo.sh (it runs the setup step for what it
# needs: binutils, QEMU, the kernel build tools and busybox).
#   1. Boot the test payload, save it, kill the VMM, restore it in a new process, and show the
#      guest's own verdict (a minute, on /dev/kvm).
#   2. A drill: a host live update rehearsed in the nested bed (the project's L1 kernel, built
#      once and cached: 11-20 min the first time), two microVMs with an edu device each, a
#      prepared update called off, then a real kexec, with the report and an SVG timeline.
#   3. A drill with the bed's Linux guest (its kernel built once and cached: about 4 min) and
#      an NVMe controller the bed's VFIO handler keeps as it ran across the kexec.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo: cargo (Rust) is needed" >&2; exit 1; }
bash tests/setup.sh bed
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "demo: /dev/kvm is missing or not accessible" >&2; exit 1; }

cargo build --release -q -p luvmm --bin luvmm
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

echo "== a drill: a host live update of two microVMs in the nested bed (L1 under QEMU)"
kernel_dir=$(bash tests/nested/kernel.sh | tail -1)
bash tests/nested/initramfs.sh "$work/bed" "$kernel_dir" "$luvmm" > /dev/null
mkdir -p target/drill
$luvmm drill --kernel "$kernel_dir/bzImage" --initrd "$work/bed/initrd-stage2.cpio.gz" \
    --payload target/guest/payload.elf --vms 2 --devices 1 --cancel-first \
    --svg target/drill/timeline.svg

echo "== a drill with a Linux guest: its NVMe controller kept as it ran across the kexec"
echo "   (handler keep), judged by the guest's own kernel, nvme driver and clocks"
guest_dir=$(bash tests/nested/guest-kernel.sh | tail -1)
$luvmm drill --kernel "$kernel_dir/bzImage" --initrd "$work/bed/initrd-stage2.cpio.gz" \
    --guest linux --guest-kernel "$guest_dir/vmlinux" --guest-initrd "$guest_dir/initrd.cpio.gz" \
    --vfio-handler keep --svg target/drill/linux-timeline.svg
echo "== demo passed; the drills' timelines are target/drill/timeline.svg and linux-timeline.svg"
