#!/usr/bin/env bash
# The project's one setup step: installs, serially and once, every Debian package and rustup
# component luvmm's demo, CI and tests need. Nothing else installs anything: the tests and the
# scripts they run call `setup.sh --check` and fail naming this command when a tool is missing.
#
#   setup.sh [demo|bed|all]           install what the demo, the nested bed's scripts, or
#                                     everything (CI included) needs; default: all
#   setup.sh --check [demo|bed|all]   install nothing; list what is missing, exit 1 if anything is
#
# Installing needs root (or sudo) and Debian's archive; with everything present it only checks.
set -euo pipefail

check_only=0
if [ "${1:-}" = --check ]; then check_only=1; shift; fi
profile=${1:-all}

# The demo: the guest payload is assembled and linked with binutils (as, ld).
demo_pkgs=(binutils)
# The nested bed adds: QEMU for L1; the L1 kernel's build (make, gcc, bc, bison, flex,
# libelf, openssl headers, rsync for `make headers`, static libc for the LUO selftests, perl
# for checkpatch of the project's patches); cpio, gzip and a static busybox for its initramfs;
# Debian's keyring and dpkg-deb to fetch and unpack linux-source-7.2 from sid; systemd's
# systemd-analyze, which verifies the project's unit files; librsvg's rsvg-convert, which
# renders the drill's timeline picture in its test; debootstrap and zstd for the systemd L1's
# root, Debian sid's systemd (nested/sid-root.sh, built at the end of this step).
bed_pkgs=("${demo_pkgs[@]}" qemu-system-x86 build-essential bc bison flex libelf-dev libssl-dev
          rsync cpio gzip xz-utils patch perl busybox-static file debian-archive-keyring dpkg
          systemd librsvg2-bin debootstrap zstd)
# QEMU 10 or newer for L1: 7.2's TCG (bookworm's) loses L1's own timer interrupt now and then
# while a nested Linux guest idles, which stops the bed for tens of seconds or for good. On
# bookworm it comes from bookworm-backports, which this step adds to apt's sources.
qemu_min=10
# `.ci/run` checks formatting and lints, and fuzzes with cargo-fuzz (from crates.io).
rust_components=(rustfmt clippy)
cargo_fuzz_version=0.13.2

case "$profile" in
    demo) pkgs=("${demo_pkgs[@]}"); components=() ;;
    bed) pkgs=("${bed_pkgs[@]}"); components=() ;;
    all) pkgs=("${bed_pkgs[@]}"); components=("${rust_components[@]}") ;;
    *) echo "usage: setup.sh [--check] [demo|bed|all]" >&2; exit 2 ;;
esac

missing_pkgs=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing_pkgs+=("$p")
done
qemu_backports=0
if [ "$profile" != demo ] && [[ " ${missing_pkgs[*]} " != *" qemu-system-x86 "* ]] &&
    ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' qemu-system-x86)" ge "1:$qemu_min"; then
    missing_pkgs+=("qemu-system-x86>=$qemu_min")
fi
for p in "${missing_pkgs[@]}"; do
    case "$p" in qemu-system-x86*) qemu_backports=1 ;; esac
done
missing_components=()
if [ ${#components[@]} -gt 0 ]; then
    command -v rustup >/dev/null || { echo "setup.sh: rustup not found (Rust is needed)" >&2; exit 1; }
    installed=$(rustup component list --installed)
    for c in "${components[@]}"; do
        grep -q "^$c-" <<<"$installed" || missing_components+=("$c")
    done
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo not found (Rust is needed)" >&2; exit 1; }
missing_tools=()
if [ "$profile" = all ] && ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
    missing_tools+=("cargo-fuzz@$cargo_fuzz_version")
fi

# The systemd L1's root: built last, with debootstrap, by this step.
sid_root=$(dirname "$0")/nested/sid-root.sh
if [ "$profile" != demo ] && ! bash "$sid_root" --check >/dev/null 2>&1; then
    missing_tools+=("sid-root")
fi

if [ $check_only = 1 ]; then
    if [ ${#missing_pkgs[@]} -gt 0 ] || [ ${#missing_components[@]} -gt 0 ] || [ ${#missing_tools[@]} -gt 0 ]; then
        echo "missing: ${missing_pkgs[*]} ${missing_components[*]} ${missing_tools[*]}; run: bash tests/setup.sh${1:+ $profile}" >&2
        exit 1
    fi
    exit 0
fi

if [ ${#missing_pkgs[@]} -gt 0 ]; then
    sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    echo "setup.sh: installing ${missing_pkgs[*]}"
    qemu_release=()
    if [ $qemu_backports = 1 ] && [ "$(. /etc/os-release && echo "$VERSION_CODENAME")" = bookworm ]; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" |
            "${sudo[@]}" tee /etc/apt/sources.list.d/luvmm-bookworm-backports.list >/dev/null
        qemu_release=(-t bookworm-backports)
    fi
    "${sudo[@]}" apt-get update -qq
    plain=()
    for p in "${missing_pkgs[@]}"; do
        case "$p" in qemu-system-x86*) ;; *) plain+=("$p") ;; esac
    done
    if [ ${#plain[@]} -gt 0 ]; then
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "${plain[@]}" >/dev/null
    fi
    if [ $qemu_backports = 1 ]; then
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${qemu_release[@]}" qemu-system-x86 >/dev/null
        dpkg --compare-versions "$(dpkg-query -W -f='${Version}' qemu-system-x86)" ge "1:$qemu_min" ||
            { echo "setup.sh: QEMU $qemu_min or newer is not available from apt" >&2; exit 1; }
    fi
fi
if [ ${#missing_components[@]} -gt 0 ]; then
    echo "setup.sh: adding rustup components ${missing_components[*]}"
    rustup component add "${missing_components[@]}"
fi
if [[ " ${missing_tools[*]} " == *" cargo-fuzz@"* ]]; then
    echo "setup.sh: installing cargo-fuzz $cargo_fuzz_version from crates.io"
    cargo install --locked --quiet cargo-fuzz --version "$cargo_fuzz_version"
fi
if [[ " ${missing_tools[*]} " == *" sid-root "* ]]; then
    echo "setup.sh: building the systemd L1's root (Debian sid, debootstrap)"
    bash "$sid_root" >/dev/null
fi
# The crates of the workspace and of the fuzz targets (their Cargo.lock files pin them), so
# that no test step downloads anything.
for manifest in Cargo.toml tests/fuzz/Cargo.toml; do
    cargo fetch --locked --manifest-path "$(dirname "$0")/../$manifest" --quiet
done
echo "setup.sh: $profile ready"
