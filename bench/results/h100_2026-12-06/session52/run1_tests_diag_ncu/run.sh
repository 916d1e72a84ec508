#!/usr/bin/env bash
# Session 52 run 1 (carry .whl .ab_old .peers): build this tree; the GPU tests of the shrink/fused paths (session 51's
# last tree, never GPU-run); then where the fused forward's time goes at N = 1024 (bf16 adapters, lead tiles):
# debug bit 6 (lead tiles run no u batch), bits 0+6 (nor wait: ~ the bare GEMM plus its extension K-tile), bit 7 (the
# row-block-major tile order), and a per-tile trace (bit 4); then Nsight Compute on the two shrink paths with dropout.
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
rm -rf /tmp/site
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left 330) python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_shrink_drop.py $R/tests/test_dy_pass_sm90.py $R/tests/test_fused_fwd_sm90.py \
  > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
AB="python3 $R/bench/dev/fused_ab.py --modes 2 --adapter-dtype bf16 --r 16,64 --rounds 5 --calls 10"
SH=8192x4096x1024,2048x4096x1024,8192x4096x4096,2048x4096x4096
for d in 0 64 65 128 0; do
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_DEBUG=$d timeout $(left $((LIMIT - 90))) $AB --tag d$d --shapes $SH >> $O/b/diag.txt 2>&1)
  note "diag debug=$d rc=$?"; pack
done
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_DEBUG=16 timeout $(left $((LIMIT - 70))) $AB --tag trace --trace --shapes 8192x4096x1024,8192x4096x4096 >> $O/b/trace.txt 2>&1)
note "trace rc=$?"; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout $(left $((LIMIT - 5))) ncu --clock-control none --profile-from-start off \
  --kernel-name regex:'shrink|keep_bits' --section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section InstructionStats --section Occupancy --section WarpStateStats --section SchedulerStats \
  python3 $R/bench/dev/ncu_shrink_drop.py > $O/b/ncu.txt 2>&1)
note "ncu rc=$?"; pack
note "total"; pack; rm -rf $O
