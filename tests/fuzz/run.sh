#!/usr/bin/env bash
# Runs each fuzz target on a scratch copy of its checked-in corpus (tests/fuzz/corpus/TARGET):
#   run.sh --seconds N [TARGET...]     for N seconds each (what .ci/run does)
#   run.sh --runs N [TARGET...]        for N executions each
# cargo-fuzz comes from the setup step; the installed stable toolchain builds the targets with
# RUSTC_BOOTSTRAP=1 (libFuzzer and the address sanitizer need unstable flags).
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
    --seconds) limit=(-max_total_time="${2:?}") ;;
    --runs) limit=(-runs="${2:?}") ;;
    *) echo "usage: run.sh --seconds N | --runs N [TARGET...]" >&2; exit 2 ;;
esac
shift 2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(state_decode http_request vm_config)
cargo fuzz --version >/dev/null 2>&1 || { echo "run.sh: cargo-fuzz missing; run: bash tests/setup.sh" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target"
    start=$(date +%s)
    # New inputs go to the scratch directory (the first one); the checked-in seeds are read only.
    # Safe Rust needs no address sanitizer, and runs several times faster without.
    cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none "$target" "$scratch/$target" "tests/fuzz/corpus/$target" -- \
        "${limit[@]}" -max_len=65536 -print_final_stats=1 2>"$scratch/$target.log" \
        || { tail -40 "$scratch/$target.log" >&2; echo "fuzz: $target FAILED" >&2; exit 1; }
    runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$scratch/$target.log")
    echo "fuzz: $target ok: $runs executions in $(( $(date +%s) - start )) s, no crash"
done
