#!/usr/bin/env bash
# Session 54 run 2 (carry .whl .ab_old .peers): build this tree (the shrink with dropout's cp.async ring for x);
# test_shrink_drop.py (the ring's bits against plain loads, float64); the ring A/B (shrink_drop_ring.py, per-kernel
# device times); Nsight Compute of the shrink with ring 0 and 4; the targets grid (bf16 adapters) with ring 0 and 4.
LIMIT=${LIMIT:-570}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
if [ "${REUSE:-0}" != 1 ]; then
  rm -rf /tmp/site
  LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
  note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
fi
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 150 python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_shrink_drop.py > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 90 python3 $R/bench/dev/shrink_drop_ring.py > $O/b/ring_bf16.txt 2>&1); note "ring bf16 rc=$?"
(cd /tmp && PYTHONPATH=/tmp/site timeout 40 python3 $R/bench/dev/shrink_drop_ring.py --adapters float32 --r 16 \
  --shapes 8192x4096x1024,8192x4096x4096 > $O/b/ring_fp32.txt 2>&1); note "ring fp32 rc=$?"; pack
NCU="ncu --clock-control none --profile-from-start off --kernel-name regex:shrink_drop_kernel --section SpeedOfLight --section Occupancy --section WarpStateStats --metrics dram__bytes_read.sum,smsp__issue_active.avg.pct_of_peak_sustained_active"
for g in 0 4; do
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SHRINK_DROP_RING=$g timeout 60 $NCU python3 $R/bench/dev/ncu_shrink_drop.py --shape 8192x4096x4096 --r 16 --adapters bfloat16 > $O/b/ncu_ring$g.txt 2>&1)
  note "ncu ring$g rc=$?"; pack
done
for g in 4 0; do
  if [ $(left $LIMIT) -lt 80 ]; then note "skip targets ring$g"; continue; fi
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SHRINK_DROP_RING=$g LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left $((LIMIT - 5))) python3 \
    $R/bench/suite/targets.py --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --out $O/b/targets_bf16_ring$g.json \
    > $O/b/targets_bf16_ring$g.txt 2>&1)
  note "targets ring$g rc=$?"; pack
done
note "total"; pack; rm -rf $O
