#!/usr/bin/env bash
# Session 37, device run 3 (run 1's build, carried): the fused forward's modes at M = 2048 (bench/dev/fused_ab.py,
# back to back) with and without dropout, both adapter dtypes; then the targets grid's forward at M = 2048 (burst
# regime) with the default rule and with the fused forward forced (LORA_KERNELS_FUSED_FWD=1: u tiles, =2: lead tiles).
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
S=2048x4096x4096,2048x4096x1024,2048x4096x14336,2048x14336x4096
cd /tmp
for ad in bf16 fp32; do
  for p in 0.0 0.1; do
    PYTHONPATH=/tmp/site timeout 60 python3 $R/bench/dev/fused_ab.py --modes 0,1,2 --shapes $S --r 16,64 --p $p \
      --adapter-dtype $ad > $O/fused_ab_m2048_${ad}_p$p.txt 2>&1
  done
done
pack
for ad in bfloat16 float32; do
  for mode in default 1 2; do
    if [ $mode = default ]; then E=""; else E="LORA_KERNELS_FUSED_FWD=$mode"; fi
    env $E PYTHONPATH=/tmp/site timeout 60 python3 $R/bench/suite/targets.py --providers ours-cuda --M 2048 --p 0,0.1 \
      --modes fwd --adapter-dtype $ad --out $O/targets_m2048_${ad}_$mode.json > $O/targets_m2048_${ad}_$mode.txt 2>&1
  done
  pack
done
rm -rf $O
