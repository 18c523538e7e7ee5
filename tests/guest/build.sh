#!/usr/bin/env bash
# Builds the luvmm test payload with binutils alone: build.sh OUTDIR -> OUTDIR/payload.elf
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
for tool in as ld; do
    command -v "$tool" >/dev/null || { echo "build.sh: '$tool' not found: run bash tests/setup.sh" >&2; exit 1; }
done
as --64 -o "$out/payload.o" "$here/payload.S"
ld -m elf_x86_64 -static -nostdlib --no-warn-rwx-segments -T "$here/payload.ld" -o "$out/payload.elf.tmp" "$out/payload.o" 2>/dev/null \
  || ld -m elf_x86_64 -static -nostdlib -T "$here/payload.ld" -o "$out/payload.elf.tmp" "$out/payload.o"
mv "$out/payload.elf.tmp" "$out/payload.elf"
