#!/usr/bin/env bash
# Session 54 run 3 (carry .whl .ab_old .peers): build this tree (the ring issues nothing past a warp's last step;
# LORA_KERNELS_SHRINK_DROP_WAVES); test_shrink_drop.py; the ring A/B at the split's 2 waves (default) and 1 wave;
# Nsight Compute of the fused forward at 8192 x 4096 -> 1024 (default, row-block-major order without u or waits
# (debug 193), row-block-major with them (debug 128)) against our K-extended GEMM, with scheduler and warp-state
# sections; the targets grid with the candidate shrink setting if time is left.
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
if [ "${REUSE:-0}" != 1 ]; then
  rm -rf /tmp/site
  LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
  note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
fi
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 120 python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_shrink_drop.py > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
RS="python3 $R/bench/dev/shrink_drop_ring.py --shapes 8192x4096x1024,8192x4096x4096,8192x14336x4096,2048x4096x4096 --r 16,32,64 --rings 0,2,4,0,2,4"
for w in 2 1; do
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SHRINK_DROP_WAVES=$w timeout 60 $RS > $O/b/ring_w$w.txt 2>&1); note "ring waves $w rc=$?"
done
(cd /tmp && PYTHONPATH=/tmp/site timeout 40 python3 $R/bench/dev/shrink_drop_ring.py --adapters float32 --r 16 \
  --shapes 8192x4096x1024,8192x4096x4096,8192x14336x4096 > $O/b/ring_fp32.txt 2>&1); note "ring fp32 rc=$?"; pack
NCU="ncu --clock-control none --profile-from-start off --kernel-name device_kernel --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
for d in 0 193 128; do
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_DEBUG=$d timeout $(left $((LIMIT - 5))) $NCU python3 $R/bench/dev/ncu_fused.py --shape 8192x4096x1024 > $O/b/ncu_fused_d$d.txt 2>&1)
  note "ncu d$d rc=$?"; pack
done
if [ $(left $LIMIT) -gt 80 ]; then
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SHRINK_DROP_RING=${GRID_RING:-2} LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left $((LIMIT - 5))) python3 \
    $R/bench/suite/targets.py --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --out $O/b/targets_bf16.json \
    > $O/b/targets_bf16.txt 2>&1)
  note "targets ring${GRID_RING:-2} rc=$?"; pack
fi
note "total"; pack; rm -rf $O
