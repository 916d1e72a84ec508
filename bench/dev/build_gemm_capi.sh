#!/usr/bin/env bash
# Builds bench/dev/libloragemm_sm90.so (the sm_90 GEMM behind a C entry point) for development runs.
# Usage: CUTLASS_DIR=<dir with include/ and tools/util/include/> bash bench/dev/build_gemm_capi.sh [outdir]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUTDIR="${1:-$ROOT/bench/dev/build}"
CUT="${CUTLASS_DIR:?set CUTLASS_DIR}"
mkdir -p "$OUTDIR"
FLAGS=(-std=c++17 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a
       -DLORA_KERNELS_HAVE_SM90_GEMM=1 -I"$CUT/include" -I"$CUT/tools/util/include" -I"$ROOT/csrc")
pids=()
for f in "$ROOT"/csrc/gemm_sm90*.cu "$ROOT"/bench/dev/gemm_sm90_capi.cu; do
  o="$OUTDIR/$(basename "$f" .cu).o"
  if [ ! -f "$o" ] || [ "$f" -nt "$o" ] || [ "$ROOT/csrc/gemm_sm90.cuh" -nt "$o" ]; then
    nvcc "${FLAGS[@]}" -c "$f" -o "$o" & pids+=($!)
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
nvcc -shared -cudart static -o "$OUTDIR/libloragemm_sm90.so" "$OUTDIR"/*.o
echo "built $OUTDIR/libloragemm_sm90.so"
