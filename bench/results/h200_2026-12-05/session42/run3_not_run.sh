#!/usr/bin/env bash
# Session 42, run 3: the sm_90 GEMM's stream-K probe (config 6: config 4's 128 x 256 tile on CUTLASS's stream-K
# scheduler) against configs 4 and 5 and cuBLAS, bursts, M = 2048, 3072, 8192, both layouts, bf16.
R=$PWD; O=$OUT/r; mkdir -p $O/p
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O/p STEPS="gemm_probe" PROBE_CONFIGS="0 1 2 3 4 5 6" T_PROBE_BUILD=330 T_PROBE=180 \
  PROBE_ARGS="--configs 4,5,6 --regime burst --Ms 2048,3072,8192" \
  timeout 540 bash bench/tools/gpu_session.sh > $O/session_p.log 2>&1; pack
rm -rf $O
