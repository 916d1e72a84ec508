#!/usr/bin/env bash
# Compile-check the CUDA extension's sources on a machine without a GPU (CI's kind: a CPU torch, nvcc with cudart):
#   bash bench/dev/cpu_compile_check.sh [files...]      (default: csrc/binding.cpp and every csrc/*.cu that builds
#                                                        without CUTLASS)
# binding.cpp: g++ -fsyntax-only against the CPU torch's headers, which carry c10/cuda's but not the header its CMake
# generates (a one-line stand-in is written for it). The .cu files: nvcc for sm_90a, to an object in a temp dir.
# Catches what a signature change in csrc/lora_kernels.cuh or an Impl's interface breaks before a device build does.
# The sm_90 GEMM files (gemm_sm90*, fused_fwd_sm90*) need CUTLASS: give its include dir as CUTLASS_DIR to add them.
set -u
cd "$(dirname "$0")/../.."
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/inc/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/inc/c10/cuda/impl/cuda_cmake_macros.h"
TORCH_INC=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PY_INC=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CUDA_INC=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include
[ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=/usr/local/cuda/include
FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then
  FILES=(csrc/binding.cpp)
  for f in csrc/*.cu; do
    case "$f" in *gemm_sm90*|*fused_fwd_sm90*) [ -n "${CUTLASS_DIR:-}" ] && FILES+=("$f");; *) FILES+=("$f");; esac
  done
fi
rc=0
for f in "${FILES[@]}"; do
  case "$f" in
    *.cpp) g++ -std=c++17 -fsyntax-only -I"$TMP/inc" -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" \
             -I"$CUDA_INC" -I"$PY_INC" -Icsrc -DTORCH_EXTENSION_NAME=lora_kernels_cuda "$f" ;;
    *.cu) nvcc -std=c++17 -O1 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -gencode=arch=compute_90a,code=sm_90a \
            -Icsrc ${CUTLASS_DIR:+-I"$CUTLASS_DIR"} -c "$f" -o "$TMP/$(basename "$f").o" ;;
  esac
  s=$?; echo "$f: $([ $s -eq 0 ] && echo ok || echo FAILED)"; [ $s -eq 0 ] || rc=1
done
exit $rc
