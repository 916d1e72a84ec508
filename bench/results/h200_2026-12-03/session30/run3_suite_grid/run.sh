#!/usr/bin/env bash
# Session 30, device run 3 (last): build of this tree (dA masked in the wgmma kernel, the wgmma shrink with dropout
# at r <= 16 for fp32 adapters); the whole GPU suite; the M = 8192 grid with LoRAFusion (bf16 adapters); the shrink
# rule A/B at r = 16, p = 0.1, fp32 adapters (LORA_KERNELS_SM90_SHRINK=0: the mma.sync shrink, as before).
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O STEPS="build tests" T_BUILD=180 T_TESTS=300 timeout 490 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
OUT=$O STEPS="targets" TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 5" T_TARGETS=60 \
  timeout 63 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
for v in 0 1; do mkdir -p $O/shrink$v
  LORA_KERNELS_SM90_SHRINK=$v OUT=$O/shrink$v STEPS="targets" T_TARGETS=18 \
    TARGETS_ARGS="--M 8192 --rounds 4 --providers ours-cuda --p 0.1 --r 16 --modes fwd" \
    timeout 20 bash bench/tools/gpu_session.sh > $O/session_shrink$v.log 2>&1
done; pack; rm -rf $O
