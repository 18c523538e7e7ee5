#!/usr/bin/env bash
# Builds (or finds in the cache) the nested bed's L1 kernel and the kernel's own LUO selftests.
#
#   kernel.sh            -> prints the cache directory holding bzImage, selftests/, version
#
# The source is Debian sid's linux-source-7.2, fetched through a private apt configuration (the
# system's sources are never edited). The cache key is the source package version, the config
# fragment and every patch in patches/, so a change to any of them rebuilds and nothing else
# does. A cold build takes about 11 minutes on 2 cores, a patch change about a minute (the build
# tree is kept), a cached one a few seconds.
# Env: LUVMM_CACHE (default ~/.cache/luvmm), JOBS (default nproc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LUVMM_CACHE:-$HOME/.cache/luvmm}
jobs=${JOBS:-$(nproc)}
log() { echo "kernel.sh: $*" >&2; }

# The build tools come from the project's setup step; nothing is installed here.
bash "$here/../setup.sh" --check bed
. "$here/source.sh"

# One kernel.sh at a time: tests that start together would otherwise patch and build the one
# kept build tree at once. A second one waits, then finds the first one's build cached.
mkdir -p "$cache"
exec 9>"$cache/kernel.lock"
flock 9

fragment_hash=$(cat "$here/kernel.config" $(ls "$here"/patches/*.patch 2>/dev/null) | sha256sum | cut -c1-16)
version=$(source_version || true)
if [ -z "${version:-}" ]; then
    # Offline: reuse the newest cached build of this fragment, saying so.
    found=$(ls -dt "$cache"/kernel-*-"$fragment_hash" 2>/dev/null | head -1 || true)
    if [ -n "$found" ] && [ -f "$found/bzImage" ]; then
        log "sid index unreachable; using cached $(basename "$found")"
        echo "$found"; exit 0
    fi
    log "cannot reach Debian sid to fetch linux-source-7.2, and nothing is cached"; exit 1
fi
out=$cache/kernel-$version-$fragment_hash
if [ -f "$out/bzImage" ] && [ -f "$out/selftests/done" ]; then
    log "cached: $out"
    echo "$out"; exit 0
fi

start=$(date +%s)
src=$(source_tree "$version")
# One build tree per source version, kept between builds: a change to the patches takes the
# old ones out (patch -R) and puts the new ones in, so make rebuilds only what they touch
# (about a minute, against a cold build's 11). A tree that will not take its patches back, or
# one left half-prepared, is made again from the source.
build=$cache/build-$version
applied=$build/.luvmm-patches
fresh_tree() {
    rm -rf "$build"
    cp -a "$src" "$build"
    mkdir -p "$applied"
}
if [ ! -d "$applied" ]; then
    fresh_tree
else
    for p in $(ls -r "$applied"/*.patch 2>/dev/null); do
        if ! patch -d "$build" -p1 -R -s -E < "$p" >&2; then
            log "cannot take $(basename "$p") out of the kept build tree: starting from the source"
            fresh_tree
            break
        fi
        rm -f "$p"
    done
fi
for p in $(ls "$here"/patches/*.patch 2>/dev/null); do
    # The project's kernel patches are held to the kernel's own style.
    perl "$src/scripts/checkpatch.pl" --strict --no-tree --quiet "$p" >&2 ||
        { log "$(basename "$p") is not checkpatch --strict clean"; exit 1; }
    log "applying $(basename "$p")"
    if ! patch -d "$build" -p1 -s -E < "$p" >&2; then
        # A half-applied patch cannot be taken out reliably: the next build starts afresh.
        rm -rf "$applied"
        log "$(basename "$p") does not apply"; exit 1
    fi
    cp "$p" "$applied/"
done
cd "$build"

apply_fragment() {
    grep -E '^CONFIG_' "$here/kernel.config" | while IFS='=' read -r key value; do
        sym=${key#CONFIG_}
        case "$value" in
            y) scripts/config --enable "$sym" ;;
            n) scripts/config --disable "$sym" ;;
            m) scripts/config --module "$sym" ;;
            *) scripts/config --set-val "$sym" "$value" ;;
        esac
    done
}
make -s x86_64_defconfig
# Twice: a symbol can only be set once its dependencies, later in the list, are on.
apply_fragment; make -s olddefconfig
apply_fragment; make -s olddefconfig
bad=0
while IFS='=' read -r key value; do
    if [ "$value" = n ]; then
        if grep -qE "^$key=" .config; then log "config: $key wanted n"; bad=1; fi
    elif ! grep -qxF "$key=$value" .config; then
        log "config: $key wanted $value, got: $(grep -E "^$key=|^# $key is not set" .config || echo absent)"; bad=1
    fi
done < <(grep -E '^CONFIG_' "$here/kernel.config")
[ $bad = 0 ] || { log "the config fragment did not take"; exit 1; }

log "building bzImage with -j$jobs (cold: about 11 minutes on 2 cores)"
make -s -j"$jobs" bzImage
log "building the LUO selftests (static)"
make -s headers >/dev/null
mkdir -p "$build/selftests-out"
make -s -C tools/testing/selftests/liveupdate LDFLAGS=-static OUTPUT="$build/selftests-out" >/dev/null

mkdir -p "$out.tmp/selftests"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp .config "$out.tmp/config"
for f in "$build"/selftests-out/*; do
    [ -x "$f" ] && [ -f "$f" ] && cp "$f" "$out.tmp/selftests/"
done
cp tools/testing/selftests/liveupdate/do_kexec.sh "$out.tmp/selftests/" 2>/dev/null || true
echo "$version" > "$out.tmp/version"
touch "$out.tmp/selftests/done"
rm -rf "$out"; mv "$out.tmp" "$out"
log "built in $(( $(date +%s) - start )) s: $out"
echo "$out"
