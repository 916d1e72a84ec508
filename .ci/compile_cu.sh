#!/usr/bin/env bash
# Compile-check every csrc/*.cu that does not include torch headers, with plain nvcc for sm_90 (no GPU needed), as
# C++17 and (front end only) as C++20, and those with hand-written wgmma kernels also for sm_90a (their bodies compile
# only there); then the CUTLASS translation units (sm_90a, the pinned nvidia-cutlass headers). The jobs run $(nproc)
# at a time, the slow CUTLASS ones first, so that CI's two cores finish together.
set -u
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null || { echo "compile_cu: nvcc not found" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The defines that torch's CUDAExtension adds to every nvcc command (torch.utils.cpp_extension COMMON_NVCC_FLAGS):
# without them a __half built from a float compiled here and failed in the wheel build (fifteenth session).
TORCH_DEFINES="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__"
TORCH_DEFINES="$TORCH_DEFINES -D__CUDA_NO_HALF2_OPERATORS__"
export NVCC tmp TORCH_DEFINES

# The sm_90 GEMM's instances need the CUTLASS headers (the pinned nvidia-cutlass wheel, unpacked without its
# Python dependencies) and sm_90a: in the plain jobs they compile without the kernels (LORA_KERNELS_HAVE_SM90_GEMM
# unset). One layout per C++ standard, the dA GEMM and the fused forward's five bf16 instances: eight translation
# units. Through ptxas: the C++17 layout, the dA GEMM (its host pass too: a builder type that depends on no template
# parameter broke it) and the lead-tile instance (the default). To PTX only (the front end's checks
# at two thirds of the time): the C++20 layout, the u-tile instance, the dropout lead-tile one and the split ones.
CUT=/tmp/compile_cu_cutlass
if [ ! -f "$CUT/cutlass_library/source/include/cute/tensor.hpp" ]; then
  rm -rf "$CUT" && mkdir -p "$CUT/whl"
  python3 -m pip download -q --no-deps -d "$CUT/whl" "nvidia-cutlass==4.2.0.0" \
    && (cd "$CUT" && python3 -m zipfile -e whl/nvidia_cutlass-*.whl . >/dev/null)
fi
jobs=()  # "kind std mode file"
fail=0
if [ -f "$CUT/cutlass_library/source/include/cute/tensor.hpp" ]; then
  export CUT
  jobs+=("cutlass c++17 -c csrc/fused_fwd_sm90_lead_bf16.cu" "cutlass c++20 -ptx csrc/gemm_sm90_bf16_nk.cu"
         "cutlass c++17 -c csrc/gemm_sm90_bf16_kn.cu" "cutlass c++17 -c csrc/dA_gemm_sm90.cu" "cutlass c++17 -ptx csrc/fused_fwd_sm90_bf16.cu"
         "cutlass c++17 -ptx csrc/fused_fwd_sm90_lead_drop_bf16.cu" "cutlass c++17 -ptx csrc/fused_fwd_sm90_split_bf16.cu"
         "cutlass c++17 -ptx csrc/fused_fwd_sm90_split_drop_bf16.cu")
else
  echo "FAILED: could not fetch the CUTLASS headers (nvidia-cutlass==4.2.0.0)" >&2; fail=1
fi
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  if grep -qE '#include\s*[<"](torch/|ATen/|c10/)' "$f"; then echo "skip (includes torch): $f"; continue; fi
  # setup.py: C++20 for torch >= 2.14, C++17 before. C++17 through ptxas (the build as on the GPU machines); C++20
  # through the front end only (-ptx with cicc at -O0: every template instantiated and checked, no NVVM
  # optimisation), 40 s for all files against several minutes: a standard's errors are the front end's.
  jobs+=("plain c++17 -c $f" "plain c++20 -ptx $f")
  # the hand-written wgmma kernels compile their bodies only for sm_90a (LK_WGMMA): through ptxas there as well
  if grep -qE '#include\s*"(wgmma|stream_sm90)\.cuh"' "$f"; then jobs+=("sm90a c++17 -c $f"); fi
done

one() {  # one job: kind std mode file; prints ok/FAILED, exits non-zero on failure
  set -- $1
  local kind=$1 std=$2 mode=$3 f=$4 out
  out="$tmp/$(basename "$f" .cu).$std.$kind.out"
  if [ "$kind" = cutlass ]; then
    if "$NVCC" -std=$std -O3 -DNDEBUG --expt-relaxed-constexpr $TORCH_DEFINES $mode \
         -gencode=arch=compute_90a,code=sm_90a -DLORA_KERNELS_HAVE_SM90_GEMM=1 -I"$CUT/cutlass_library/source/include" \
         -I"$CUT/cutlass_library/source/tools/util/include" -Icsrc "$f" -o "$out" 2>"$out.err"; then
      echo "ok ($std $mode, sm_90a, CUTLASS): $f"
    else
      cat "$out.err" >&2; echo "FAILED ($std $mode, sm_90a, CUTLASS): $f" >&2; return 1
    fi
  elif [ "$kind" = sm90a ]; then
    if "$NVCC" -std=$std -O3 --expt-relaxed-constexpr $TORCH_DEFINES $mode -gencode=arch=compute_90a,code=sm_90a -Icsrc \
         "$f" -o "$out" 2>"$out.err"; then
      echo "ok ($std $mode, sm_90a): $f"
    else
      cat "$out.err" >&2; echo "FAILED ($std $mode, sm_90a): $f" >&2; return 1
    fi
  elif "$NVCC" -std=$std -O3 --expt-relaxed-constexpr $TORCH_DEFINES $mode $([ "$mode" = -ptx ] && echo -Xcicc -O0) \
         -gencode=arch=compute_90,code=sm_90 -Icsrc "$f" -o "$out" 2>"$out.err"; then
    echo "ok ($std $mode): $f"
  else
    cat "$out.err" >&2; echo "FAILED ($std $mode): $f" >&2; return 1
  fi
}
export -f one
printf '%s\n' "${jobs[@]}" | xargs -P "$(nproc)" -I{} bash -c 'one "{}"' || fail=1
exit $fail
