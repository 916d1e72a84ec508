#!/usr/bin/env bash
# Builds bench/dev/stream_bench.cu once per variant in VARIANTS (default "0": LK_DS_DBG bits of csrc/stream_sm90.cuh,
# 1 no products, 2 no side operands, 4 no proxy fence) and runs each build; with SB_PROBE=1 also
# bench/dev/stream_tma_probe.cu (the loader alone, cp.async against TMA); with SB_NCU=1 Nsight Compute on the first
# build's passes at 8192 x 4096, r = 16. Output under $OUT. No torch needed.
set -u
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
FLAGS=(-arch=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Icsrc -D__CUDA_NO_HALF_OPERATORS__
       -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
SRCS=(bench/dev/stream_bench.cu csrc/dy_pass_sm90.cu csrc/dA_sm90.cu csrc/plans.cu)
for v in ${VARIANTS:-0}; do
  nvcc "${FLAGS[@]}" -DLK_DS_DBG="$v" "${SRCS[@]}" -o "/tmp/sb$v" > "/tmp/sb$v.log" 2>&1 &
done
wait
for v in ${VARIANTS:-0}; do
  grep -E "error" "/tmp/sb$v.log" | head -5
  timeout 120 "/tmp/sb$v" 2>&1 | tee "$OUT/stream_bench_v$v.txt"
done
if [ -n "${SB_PROBE:-}" ]; then  # the loader alone, cp.async against TMA (bench/dev/stream_tma_probe.cu)
  nvcc -arch=sm_90a -O3 -std=c++17 -Icsrc bench/dev/stream_tma_probe.cu -o /tmp/stp > /tmp/stp.log 2>&1 ||
    grep -E "error" /tmp/stp.log | head -5
  timeout 60 /tmp/stp 2>&1 | tee "$OUT/stream_tma_probe.txt"
fi
if [ -n "${SB_NCU:-}" ]; then
  first=$(echo ${VARIANTS:-0} | cut -d' ' -f1)
  timeout 150 ncu --clock-control none --kernel-name regex:stream_sm90 --launch-skip 0 --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section SourceCounters "/tmp/sb$first" > "$OUT/stream_ncu.txt" 2>&1
  grep -E "stream_sm90|Duration|DRAM Throughput|Compute \(SM\)|Issued Warp|Eligible|No Eligible|Stall|stall" \
    "$OUT/stream_ncu.txt" | head -60
fi
