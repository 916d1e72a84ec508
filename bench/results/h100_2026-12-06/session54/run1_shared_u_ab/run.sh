#!/usr/bin/env bash
# Session 54 run 1 (carry .whl .ab_old .peers): build this tree; the fused forward's GPU tests (with the shared-u
# instance's float64 tests); the A/B of shared u (LORA_KERNELS_FUSED_SHARE unset / 1 / 2 / 4, per-kernel device
# times, fused_gap.py, r = 16 and 32); Nsight Compute's DRAM bytes at 8192 x 4096 -> 1024 with and without it; the
# targets grid (bf16 adapters) default and with SHARE=2 as time allows.
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
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 120 python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_fused_fwd_sm90.py > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
G="python3 $R/bench/dev/fused_gap.py --modes 2 --r 16,32 --shapes 8192x4096x1024,8192x4096x4096,8192x4096x14336,8192x14336x4096,2048x4096x4096"
for c in 0 1 2 4 0 2 8; do
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_SHARE=$c timeout 45 $G --tag c$c >> $O/b/gap.txt 2>&1); note "gap c$c rc=$?"
done
pack
NCU="ncu --clock-control none --profile-from-start off --kernel-name device_kernel --section SpeedOfLight --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct"
for c in 0 2; do
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_SHARE=$c timeout $(left $((LIMIT - 5))) $NCU python3 $R/bench/dev/ncu_fused.py --shape 8192x4096x1024 > $O/b/ncu_8192x4096x1024_c$c.txt 2>&1)
  note "ncu c$c rc=$?"; pack
done
for c in 0 2; do
  if [ $(left $LIMIT) -lt 80 ]; then note "skip targets c$c"; continue; fi
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_SHARE=$c LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left $((LIMIT - 5))) python3 \
    $R/bench/suite/targets.py --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --out $O/b/targets_bf16_c$c.json \
    > $O/b/targets_bf16_c$c.txt 2>&1)
  note "targets c$c rc=$?"; pack
done
note "total"; pack; rm -rf $O
