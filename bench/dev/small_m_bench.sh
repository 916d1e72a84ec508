#!/usr/bin/env bash
# Builds and runs bench/dev/small_m_bench.cu on the GPU machine (cuBLAS from the nvidia-cublas wheel torch uses),
# then Nsight Compute on the one-launch small-M kernel at M = 1 and 64 (4096 -> 4096). Output under $OUT.
set -u
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
HDR=$(find "$SITE/nvidia" -name cublas_v2.h | head -1)
LIB=$(find "$SITE/nvidia" -name 'libcublas.so*' | grep -v Lt | head -1)
echo "cublas: $HDR $LIB" | tee "$OUT/small_m_bench.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/small_m_bench.txt"
nvcc -arch=sm_90a -O3 -std=c++17 -Icsrc -I"$(dirname "$HDR")" -D__CUDA_NO_HALF_OPERATORS__ \
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
  bench/dev/small_m_bench.cu csrc/plans.cu -L"$(dirname "$LIB")" -l:"$(basename "$LIB")" -Xlinker -rpath="$(dirname "$LIB")" \
  -o /tmp/smb 2>&1 | grep -v "warning #128\|^ *\^\|detected during\|^$\|Remark" | head -20
timeout 240 /tmp/smb 2>&1 | tee -a "$OUT/small_m_bench.txt"
if [ -n "${SMB_NCU:-}" ]; then
  timeout 150 ncu --clock-control none --kernel-name regex:"${SMB_NCU_KERNELS:-lora_small_m}" --launch-skip 3 \
    --launch-count "${SMB_NCU_COUNT:-1}" --section SpeedOfLight --section WarpStateStats --section Occupancy \
    --section MemoryWorkloadAnalysis --section SchedulerStats /tmp/smb > "$OUT/small_m_ncu.txt" 2>&1
  grep -E "lora_|mm_kernel|Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|Achieved Occupancy|Stall|Issued|Eligible|Active Warps" \
    "$OUT/small_m_ncu.txt" | head -60
fi
