#!/usr/bin/env bash
# Builds the initramfs of the systemd L1 (Debian sid's systemd as init):
#   systemd-initramfs.sh OUTDIR KERNEL_DIR BINARY...
# Two archives back to back, which the kernel unpacks in turn: sid-root.sh's root (from the
# setup step) and the bed's own files: each BINARY in /luvmm/bin (luvmm also as
# /usr/local/bin/luvmm, where its units run it), the repository's luvmm@.service enabled for
# VMs a and b (their configs in /etc/luvmm), the scenario unit and scripts. Writes
# OUTDIR/initrd-systemd-stage2.img (what the kexec'd kernel boots) and
# OUTDIR/initrd-systemd.img (the same plus /boot/bzImage and the stage-2 image, for the
# kexec).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: systemd-initramfs.sh OUTDIR KERNEL_DIR BINARY...}
kernel_dir=${2:?usage: systemd-initramfs.sh OUTDIR KERNEL_DIR BINARY...}
shift 2
bash "$here/../setup.sh" --check bed
sid=$(bash "$here/sid-root.sh" --check)
overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT
mkdir -p "$overlay"/{luvmm/bin,luvmm/scenarios,usr/local/bin,etc/luvmm,boot} \
    "$overlay"/etc/systemd/system/multi-user.target.wants
for bin in "$@"; do
    install -m 0755 "$bin" "$overlay/luvmm/bin/"
done
ln -s /luvmm/bin/luvmm "$overlay/usr/local/bin/luvmm"
# systemd is init; its machine id is fixed, as an installed host's is, so no first-boot setup
# asks anything on the console.
ln -s /lib/systemd/systemd "$overlay/init"
echo 6c75766d6d2062656400000000000001 > "$overlay/etc/machine-id"
units=$overlay/etc/systemd/system
install -m 0644 "$here/../../vmm/cli/systemd/luvmm@.service" "$units/"
install -m 0644 "$here/systemd/luvmm-bed.service" "$units/"
install -m 0755 "$here/systemd/bed-unit.sh" "$overlay/luvmm/bed-unit.sh"
for vm in a b; do
    ln -s ../luvmm@.service "$units/multi-user.target.wants/luvmm@$vm.service"
done
ln -s ../luvmm-bed.service "$units/multi-user.target.wants/luvmm-bed.service"
# b calls a staged or prepared update off by itself after 8 s without a kexec (300 s by
# default), for the scenario's late stage.
mkdir -p "$units/luvmm@b.service.d"
printf '[Service]\nExecStart=\nExecStart=/usr/local/bin/luvmm start --vm %%i --agent-socket /run/luvmm/agent.sock --update-limit 8\n' \
    > "$units/luvmm@b.service.d/limit.conf"
# Nothing else takes the serial console; nothing asks on it.
for unit in serial-getty@ttyS0.service getty@tty1.service systemd-firstboot.service; do
    ln -s /dev/null "$units/$unit"
done
install -m 0755 "$here"/scenarios/*.sh "$overlay/luvmm/scenarios/"
install -m 0644 "$here/steps.sh" "$overlay/luvmm/steps.sh"
# Two payload VMs, as an operator configures them for `luvmm start` (luvmm@ID.service).
cat > "$overlay/etc/luvmm/a.json" <<JSON
{"vcpus": 1, "memory": [{"gpa": 0, "size": 67108864}], "payload": "/luvmm/bin/payload.elf",
 "cmdline": "console=ttyS0 luvmm.fill_pages=512", "serial": {"file": "/var/log/luvmm-a.log"},
 "api_socket": "/run/luvmm-a.sock"}
JSON
cat > "$overlay/etc/luvmm/b.json" <<JSON
{"vcpus": 1, "memory": [{"gpa": 0, "size": 33554432}], "payload": "/luvmm/bin/payload.elf",
 "cmdline": "console=ttyS0 luvmm.fill_pages=256", "serial": {"file": "/var/log/luvmm-b.log"},
 "api_socket": "/run/luvmm-b.sock"}
JSON
pack() { (cd "$1" && find . -path ./boot -prune -o -print | cpio -o -H newc --quiet | zstd -q -T0 -3); }
mkdir -p "$out"
{ cat "$sid/root.cpio.zst"; pack "$overlay"; } > "$out/initrd-systemd-stage2.img"
boot=$(mktemp -d)
trap 'rm -rf "$overlay" "$boot"' EXIT
mkdir -p "$boot/boot"
cp "$kernel_dir/bzImage" "$boot/boot/bzImage"
cp "$out/initrd-systemd-stage2.img" "$boot/boot/initrd-stage2.img"
{ cat "$out/initrd-systemd-stage2.img"; (cd "$boot" && find . | cpio -o -H newc --quiet | zstd -q -T0 -1); } \
    > "$out/initrd-systemd.img"
echo "$out/initrd-systemd.img"
