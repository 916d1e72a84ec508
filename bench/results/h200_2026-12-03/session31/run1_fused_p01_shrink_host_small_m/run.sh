#!/usr/bin/env bash
# Session 31, device run 1: build of main (32c991c); the fused forward's modes at p = 0.1 (0 shrink + GEMM, 1 u tiles,
# 2 lead tiles) on the four shapes, r = 16 / 64, fp32 adapters; the shrink rule A/B (fp32 adapters, r = 16, p = 0.1,
# forward: LORA_KERNELS_SM90_SHRINK=0 against the default); host time; small M.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O STEPS="build" T_BUILD=222 timeout 228 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
S=8192x4096x4096,8192x4096x1024,8192x4096x14336,8192x14336x4096
(cd /tmp && PYTHONPATH=/tmp/site timeout 105 python3 $R/bench/dev/fused_ab.py --modes 0,1,2 --p 0.1 --shapes $S \
   --r 16,64 --rounds 4 > $O/fused_ab_p01.txt 2>&1); pack
for v in 0 1; do mkdir -p $O/shrink$v
  LORA_KERNELS_SM90_SHRINK=$v OUT=$O/shrink$v STEPS="targets" T_TARGETS=19 \
    TARGETS_ARGS="--M 8192 --rounds 4 --providers ours-cuda --p 0.1 --r 16 --modes fwd" \
    timeout 21 bash bench/tools/gpu_session.sh > $O/session_shrink$v.log 2>&1
done; pack
OUT=$O STEPS="host" T_HOST=95 timeout 98 bash bench/tools/gpu_session.sh > $O/session_host.log 2>&1; pack
OUT=$O STEPS="small_m" T_SMALL_M=95 timeout 98 bash bench/tools/gpu_session.sh > $O/session_small.log 2>&1; pack
rm -rf $O
