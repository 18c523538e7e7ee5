#!/usr/bin/env bash
# Builds the L1 initramfs images of the nested bed:
#   initramfs.sh OUTDIR KERNEL_DIR BINARY...
# KERNEL_DIR is what kernel.sh printed (bzImage, selftests/). Each BINARY goes to /luvmm/bin
# with the shared libraries it needs. Writes OUTDIR/initrd-stage2.cpio.gz (what the kexec'd
# kernel boots) and OUTDIR/initrd.cpio.gz (the same plus /boot/bzImage and the stage-2 image,
# for the kexec).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: initramfs.sh OUTDIR KERNEL_DIR BINARY...}
kernel_dir=${2:?usage: initramfs.sh OUTDIR KERNEL_DIR BINARY...}
shift 2
# busybox-static, cpio and file come from the project's setup step; nothing is installed here.
bash "$here/../setup.sh" --check bed
busybox=/bin/busybox
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,boot,luvmm/bin,luvmm/scenarios,selftests,lib64,usr/lib}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here"/scenarios/*.sh "$root/luvmm/scenarios/"
install -m 0644 "$here/steps.sh" "$root/luvmm/steps.sh"
for bin in "$@"; do
    install -m 0755 "$bin" "$root/luvmm/bin/"
    # Copy the shared libraries (and the loader) a dynamic binary needs, at their own paths.
    file -L "$bin" | grep -q 'dynamically linked' || continue
    for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
for t in "$kernel_dir"/selftests/*; do
    [ -f "$t" ] && [ -x "$t" ] && cp "$t" "$root/selftests/"
done
mkdir -p "$out"
(cd "$root" && find . -path ./boot -prune -o -print | cpio -o -H newc --quiet | gzip -1) > "$out/initrd-stage2.cpio.gz"
cp "$kernel_dir/bzImage" "$root/boot/bzImage"
cp "$out/initrd-stage2.cpio.gz" "$root/boot/initrd-stage2.cpio.gz"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.cpio.gz"
echo "$out/initrd.cpio.gz"
