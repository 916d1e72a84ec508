#!/usr/bin/env bash
# Builds and runs bench/dev/stream_bench.cu (the dy pass, dA and the shrink against a plain read; SB_WIDTHS=4096,...
# times a subset of the widths 4096, 1024, 14336); with SB_PROBE=1
# also bench/dev/stream_tma_probe.cu (the loader alone, cp.async against TMA); with SB_NCU=1 Nsight Compute on the
# passes at 8192 x 4096, r = 16. Output under $OUT. No torch needed. (The twenty-first session's runs with parts of
# the kernel left out built commit 2790135's LK_DS_DBG variants.)
set -u
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
FLAGS=(-arch=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Icsrc -D__CUDA_NO_HALF_OPERATORS__
       -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
nvcc "${FLAGS[@]}" bench/dev/stream_bench.cu csrc/dy_pass_sm90.cu csrc/dA_sm90.cu csrc/shrink_sm90.cu csrc/plans.cu \
  csrc/dA.cu csrc/shrink.cu csrc/dropout_bits.cu -o /tmp/sb \
  > /tmp/sb.log 2>&1 || grep -E "error" /tmp/sb.log | head -5
timeout 240 /tmp/sb 2>&1 | tee "$OUT/stream_bench.txt"
if [ -n "${SB_PROBE:-}" ]; then
  nvcc -arch=sm_90a -O3 -std=c++17 -Icsrc bench/dev/stream_tma_probe.cu -o /tmp/stp > /tmp/stp.log 2>&1 ||
    grep -E "error" /tmp/stp.log | head -5
  timeout 60 /tmp/stp 2>&1 | tee "$OUT/stream_tma_probe.txt"
fi
if [ -n "${SB_NCU:-}" ]; then
  timeout 150 ncu --clock-control none --kernel-name regex:stream_sm90 --launch-skip 0 --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section SourceCounters /tmp/sb > "$OUT/stream_ncu.txt" 2>&1
  grep -E "stream_sm90|Duration|DRAM Throughput|Compute \(SM\)|Issued Warp|Eligible|No Eligible|Stall|stall" \
    "$OUT/stream_ncu.txt" | head -60
fi
