#!/usr/bin/env bash
# Builds (or finds in the cache) the Linux microVM guest luvmm boots inside the nested bed: a
# small kernel from the same linux-source-7.2 as L1 (tinyconfig plus tests/guest/linux/
# kernel.config) and a busybox initramfs with the guest's /init.
#
#   guest-kernel.sh   -> prints, as its last line, the directory holding vmlinux, bzImage and
#                        initrd.cpio.gz
#
# The kernel's cache key is the source version and the config fragment; the initramfs is
# rebuilt (in a second) when its inputs change. A cold kernel build takes about 4 minutes on
# 2 cores. Env: LUVMM_CACHE (default ~/.cache/luvmm), JOBS (default nproc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
guest=$here/../guest/linux
cache=${LUVMM_CACHE:-$HOME/.cache/luvmm}
jobs=${JOBS:-$(nproc)}
log() { echo "guest-kernel.sh: $*" >&2; }

bash "$here/../setup.sh" --check bed
. "$here/source.sh"

# One guest-kernel.sh at a time: a second one waits, then finds the first one's build cached.
mkdir -p "$cache"
exec 9>"$cache/guest-kernel.lock"
flock 9

kernel_hash=$(sha256sum < "$guest/kernel.config" | cut -c1-16)
version=$(source_version || true)
if [ -z "${version:-}" ]; then
    found=$(ls -dt "$cache"/guest-kernel-*-"$kernel_hash" 2>/dev/null | head -1 || true)
    [ -n "$found" ] && [ -f "$found/vmlinux" ] ||
        { log "cannot reach Debian sid to fetch linux-source-7.2, and nothing is cached"; exit 1; }
    log "sid index unreachable; using cached $(basename "$found")"
    version=${found#"$cache"/guest-kernel-}
    version=${version%-"$kernel_hash"}
fi
kernel=$cache/guest-kernel-$version-$kernel_hash
if [ ! -f "$kernel/vmlinux" ]; then
    start=$(date +%s)
    src=$(source_tree "$version")
    # Out of tree: the guest needs no patches, so the unpacked source is shared with L1's.
    build=$cache/guest-build-$version-$kernel_hash
    mkdir -p "$build"
    make -s -C "$src" O="$build" tinyconfig >/dev/null
    apply_fragment() {
        grep -E '^CONFIG_' "$guest/kernel.config" | while IFS='=' read -r key value; do
            sym=${key#CONFIG_}
            case "$value" in
                y) "$src/scripts/config" --file "$build/.config" --enable "$sym" ;;
                n) "$src/scripts/config" --file "$build/.config" --disable "$sym" ;;
                *) "$src/scripts/config" --file "$build/.config" --set-val "$sym" "$value" ;;
            esac
        done
    }
    # Twice: a symbol can only be set once its dependencies, later in the list, are on.
    apply_fragment; make -s -C "$src" O="$build" olddefconfig >/dev/null
    apply_fragment; make -s -C "$src" O="$build" olddefconfig >/dev/null
    bad=0
    while IFS='=' read -r key value; do
        if [ "$value" = n ]; then
            if grep -qE "^$key=" "$build/.config"; then log "config: $key wanted n"; bad=1; fi
        elif ! grep -qxF "$key=$value" "$build/.config"; then
            log "config: $key wanted $value, got: $(grep -E "^$key=|^# $key is not set" "$build/.config" || echo absent)"; bad=1
        fi
    done < <(grep -E '^CONFIG_' "$guest/kernel.config")
    [ $bad = 0 ] || { log "the config fragment did not take"; exit 1; }
    log "building the guest kernel with -j$jobs (cold: about 4 minutes on 2 cores)"
    make -s -C "$src" O="$build" -j"$jobs" vmlinux bzImage
    mkdir -p "$kernel.tmp"
    cp "$build/vmlinux" "$build/arch/x86/boot/bzImage" "$build/.config" "$kernel.tmp/"
    rm -rf "$kernel"; mv "$kernel.tmp" "$kernel"
    rm -rf "$build"
    log "built in $(( $(date +%s) - start )) s: $kernel"
fi

# The initramfs: busybox, the guest's /init and its judge (built static from judge.c).
initrd_hash=$(cat "$guest/init" "$guest/judge.c" "$guest/build-judge.sh" /bin/busybox | sha256sum | cut -c1-16)
out=$cache/guest-$version-$kernel_hash-$initrd_hash
if [ ! -f "$out/initrd.cpio.gz" ]; then
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp}
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    install -m 0755 "$guest/init" "$root/init"
    bash "$guest/build-judge.sh" "$root/bin/judge"
    mkdir -p "$out.tmp"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp/initrd.cpio.gz"
    ln -f "$kernel/vmlinux" "$kernel/bzImage" "$out.tmp/"
    rm -rf "$out"; mv "$out.tmp" "$out"
fi
echo "$out"
