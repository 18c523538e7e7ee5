#!/usr/bin/env bash
# The luvmm test command: installs what the tests need, then runs every test in the workspace.
# Tests that need /dev/kvm fail loudly without it; none is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v as >/dev/null || ! command -v ld >/dev/null; then
    echo "run.sh: installing binutils for the guest payload"
    apt-get update -qq && apt-get install -y -qq binutils >/dev/null
fi
cargo test --workspace
