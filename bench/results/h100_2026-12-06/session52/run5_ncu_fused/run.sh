#!/usr/bin/env bash
# Session 52 run 3 (carry .whl .ab_old .peers): build this tree; Nsight Compute on the fused forward kernel (default, and
# debug bits 0+6: no u batch, no waits) against our K-extended GEMM kernel at 8192x4096->1024 and ->4096, bf16 adapters
# r = 16; then the GPU tests of the paths this session touched.
LIMIT=${LIMIT:-560}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
[ -n "$REUSE" ] && ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1 || { rm -rf /tmp/site
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack; }
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
NCU="ncu --clock-control none --profile-from-start off --kernel-name device_kernel --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy"
for sh in 8192x4096x1024 8192x4096x4096; do
  for d in 0 65; do
    (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_DEBUG=$d timeout $(left $((LIMIT - 120))) $NCU python3 $R/bench/dev/ncu_fused.py --shape $sh > $O/b/ncu_${sh}_d$d.txt 2>&1)
    note "ncu $sh d$d rc=$?"; pack
  done
done
[ -z "$REUSE" ] && (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left $((LIMIT - 5))) python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_fused_fwd_sm90.py $R/tests/test_contract.py $R/tests/test_gpu_graphs.py \
  $R/tests/test_device_seed.py > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
note "total"; pack; rm -rf $O
