#!/usr/bin/env bash
# Compile-check every csrc/*.cu that does not include torch headers, with plain nvcc for sm_90 (no GPU needed), as
# C++17 and as C++20.
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
  for std in c++17 c++20; do  # setup.py builds with C++20 for torch >= 2.14, with C++17 before
    if "$NVCC" -std=$std -O3 -c -gencode=arch=compute_90,code=sm_90 -Icsrc "$f" -o "$out"; then
      echo "ok ($std): $f"
    else
      echo "FAILED ($std): $f" >&2; fail=1
    fi
  done
done
# The sm_90 GEMM's instances need the CUTLASS headers (the pinned nvidia-cutlass wheel, unpacked without its
# Python dependencies) and sm_90a: above they compiled without the kernels (LORA_KERNELS_HAVE_SM90_GEMM unset).
# One layout per C++ standard, and the fused forward's two bf16 instances: four translation units.
CUT=/tmp/compile_cu_cutlass
if [ ! -f "$CUT/cutlass_library/source/include/cute/tensor.hpp" ]; then
  rm -rf "$CUT" && mkdir -p "$CUT/whl"
  python3 -m pip download -q --no-deps -d "$CUT/whl" "nvidia-cutlass==4.2.0.0" \
    && (cd "$CUT" && python3 -m zipfile -e whl/nvidia_cutlass-*.whl . >/dev/null)
fi
if [ -f "$CUT/cutlass_library/source/include/cute/tensor.hpp" ]; then
  INC=(-I"$CUT/cutlass_library/source/include" -I"$CUT/cutlass_library/source/tools/util/include")
  # (the fused forward's lead-tile instance to PTX only: the front end's checks at half the time)
  for pair in "c++20 -c csrc/gemm_sm90_bf16_nk.cu" "c++17 -c csrc/gemm_sm90_bf16_kn.cu" \
              "c++17 -c csrc/fused_fwd_sm90_bf16.cu" "c++17 -ptx csrc/fused_fwd_sm90_lead_bf16.cu"; do
    set -- $pair
    if "$NVCC" -std=$1 -O3 -DNDEBUG --expt-relaxed-constexpr $2 -gencode=arch=compute_90a,code=sm_90a \
         -DLORA_KERNELS_HAVE_SM90_GEMM=1 "${INC[@]}" -Icsrc "$3" -o "$tmp/sm90.out"; then
      echo "ok ($1 $2, sm_90a, CUTLASS): $3"
    else
      echo "FAILED ($1 $2, sm_90a, CUTLASS): $3" >&2; fail=1
    fi
  done
else
  echo "FAILED: could not fetch the CUTLASS headers (nvidia-cutlass==4.2.0.0)" >&2; fail=1
fi
exit $fail
