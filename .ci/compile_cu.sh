#!/usr/bin/env bash
# Compile-check every csrc/*.cu that does not include torch headers, with plain nvcc for sm_90 (no GPU needed), as
# C++17 and as C++20.
set -u
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null || { echo "compile_cu: nvcc not found" >&2; exit 1; }
fail=0
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  if grep -qE '#include\s*[<"](torch/|ATen/|c10/)' "$f"; then echo "skip (includes torch): $f"; continue; fi
  out="/tmp/compile_cu_$(basename "$f" .cu).o"
  for std in c++17 c++20; do  # setup.py builds with C++20 for torch >= 2.14, with C++17 before
    if "$NVCC" -std=$std -O3 -c -gencode=arch=compute_90,code=sm_90 -Icsrc "$f" -o "$out"; then
      echo "ok ($std): $f"
    else
      echo "FAILED ($std): $f" >&2; fail=1
    fi
  done
done
exit $fail
