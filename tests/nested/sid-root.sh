#!/usr/bin/env bash
# Debian sid's systemd, for the bed's systemd L1 (`host_update_systemd_*`) and for verifying
# luvmm's units against the systemd they are written for: a minbase root with systemd (262 or
# later: it carries fd stores across a kexec through LUO), udev and kexec-tools, built once by
# debootstrap into the cache, with its packed image beside it.
#
#   sid-root.sh          build it if missing (the setup step runs this), print its directory
#   sid-root.sh --check  print its directory, or fail naming the setup step
#
# The directory holds root/ (the tree, also what chroot runs) and root.cpio.zst (root/ as an
# initramfs archive: the bed adds its own files in a second archive).
# Env: LUVMM_CACHE (default ~/.cache/luvmm).
set -euo pipefail
cache=${LUVMM_CACHE:-$HOME/.cache/luvmm}
log() { echo "sid-root.sh: $*" >&2; }
# Bumped when what goes into the root changes.
recipe=1
packages=systemd,systemd-sysv,udev,kexec-tools
min_systemd=261
dir=$cache/sid-root-$recipe
if [ -f "$dir/done" ]; then
    log "cached: $dir"
    echo "$dir"; exit 0
fi
if [ "${1:-}" = --check ]; then
    log "no sid root in $dir; run: bash tests/setup.sh bed"
    exit 1
fi
[ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap is missing; run: bash tests/setup.sh bed"; exit 1; }
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { log "no Debian mirror in the system's apt sources"; exit 1; }

start=$(date +%s)
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp"
log "debootstrap sid ($packages) from $mirror"
debootstrap --variant=minbase --include="$packages" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    sid "$dir.tmp/root" "$mirror" > "$dir.tmp/debootstrap.log" 2>&1 ||
    { tail -20 "$dir.tmp/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
version=$(chroot "$dir.tmp/root" dpkg-query -W -f='${Version}' systemd)
[ "${version%%[.~-]*}" -ge $min_systemd ] ||
    { log "sid's systemd is $version; $min_systemd or later is needed"; exit 1; }
# What an initramfs root does without: documentation, translations, apt's caches.
rm -rf "$dir.tmp"/root/usr/share/{doc,man,info,locale} "$dir.tmp"/root/var/cache/apt/* \
    "$dir.tmp"/root/var/lib/apt/lists/*
echo "$version" > "$dir.tmp/systemd-version"
(cd "$dir.tmp/root" && find . | cpio -o -H newc --quiet | zstd -q -T0 -6) > "$dir.tmp/root.cpio.zst"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
touch "$dir/done"
log "systemd $version, $(du -sh "$dir/root" | cut -f1) ($(du -h "$dir/root.cpio.zst" | cut -f1) packed) in $(( $(date +%s) - start )) s"
echo "$dir"
