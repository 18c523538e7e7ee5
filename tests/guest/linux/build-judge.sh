#!/usr/bin/env bash
# Builds the Linux guest's judge, static, with the flags both its users share (the initramfs in
# tests/nested/guest-kernel.sh, and tests/build.rs for the host tests): build-judge.sh OUT -> OUT
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-judge.sh OUTFILE}
command -v gcc >/dev/null || { echo "build-judge.sh: gcc not found: run bash tests/setup.sh" >&2; exit 1; }
gcc -static -O2 -Wall -Werror -pthread -o "$out.tmp" "$here/judge.c"
mv "$out.tmp" "$out"
