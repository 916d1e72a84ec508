#!/usr/bin/env bash
# Compile-check every csrc/*.cu that does not include torch headers, with plain nvcc for sm_90 (no GPU needed).
set -u
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null || { echo "compile_cu: nvcc not found" >&2; exit 1; }
fail=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  if grep -qE '#include\s*[<"](torch/|ATen/|c10/)' "$f"; then echo "skip (includes torch): $f"; continue; fi
  out="$tmp/$(basename "$f" .cu).o"
  if "$NVCC" -std=c++17 -O3 -c -gencode=arch=compute_90,code=sm_90 -Icsrc "$f" -o "$out"; then
    echo "ok: $f"
  else
    echo "FAILED: $f" >&2; fail=1
  fi
done
exit $fail
