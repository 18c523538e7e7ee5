#!/usr/bin/env bash
# The luvmm test command: the setup step (installs, serially, whatever is missing), then every
# test in the workspace, the nested bed included. Tests that need /dev/kvm fail loudly without
# it; none is skipped, and none installs anything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh all
cargo test --workspace
