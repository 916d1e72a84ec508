#!/usr/bin/env bash
# Builds libloragemm_sm90.so (the sm_90 GEMM behind a C entry point) for development runs: one object per
# (dtype, layout, config), compiled in parallel. Config 6 (not in the default list): config 4's tile on CUTLASS's
# stream-K scheduler (bench/dev/gemm_sm90_probe_inst.cu).
# Usage: CUTLASS_DIR=<dir with include/ and tools/util/include/> [DTYPES="0 1"] [CONFIGS="0 1 2 3 4 5"] [FP16_CONFIGS=..] \
#        bash bench/dev/build_gemm_capi.sh [outdir]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUTDIR="${1:-$ROOT/bench/dev/build}"
CUT="${CUTLASS_DIR:?set CUTLASS_DIR}"
mkdir -p "$OUTDIR"
FLAGS=(-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a
       -DLORA_KERNELS_HAVE_SM90_GEMM=1 -I"$CUT/include" -I"$CUT/tools/util/include" -I"$ROOT/csrc")
rm -f "$OUTDIR"/*.o
pids=()
for dt in ${DTYPES:-0 1}; do for lay in 0 1; do
  cfgs="${CONFIGS:-0 1 2 3 4 5}"; [ "$dt" = 1 ] && cfgs="${FP16_CONFIGS:-$cfgs}"
  for cfg in $cfgs; do
  nvcc "${FLAGS[@]}" -DPROBE_DT=$dt -DPROBE_LAYOUT=$lay -DPROBE_CFG=$cfg -c "$ROOT/bench/dev/gemm_sm90_probe_inst.cu" \
    -o "$OUTDIR/inst_${dt}_${lay}_${cfg}.o" & pids+=($!)
done; done; done
# The host dispatcher only for its config choice (lora_gemm_sm90_pick): built without the production instances.
nvcc "${FLAGS[@]}" -ULORA_KERNELS_HAVE_SM90_GEMM -c "$ROOT/csrc/gemm_sm90.cu" -o "$OUTDIR/gemm_sm90.o" & pids+=($!)
nvcc "${FLAGS[@]}" -c "$ROOT/bench/dev/gemm_sm90_capi.cu" -o "$OUTDIR/gemm_sm90_capi.o" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
nvcc -shared -cudart static -o "$OUTDIR/libloragemm_sm90.so" "$OUTDIR"/*.o
echo "built $OUTDIR/libloragemm_sm90.so"
