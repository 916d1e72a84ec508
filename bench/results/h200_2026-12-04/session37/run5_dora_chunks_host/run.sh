#!/usr/bin/env bash
# Session 37, device run 5 (run 1's build, carried): what DoRA's row chunks cost at p = 0.1 (fwd+bwd, the default
# 64 MiB chunk budget against 1 GiB, one chunk at every grid shape), GPU time and peak memory in one run; host time per
# call (bench/tools/host_time.py) of this session's tree.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
for mib in 64 1024; do
  mkdir -p $O/chunk$mib
  LORA_KERNELS_DORA_CHUNK_MIB=$mib OUT=$O/chunk$mib STEPS="dora" T_DORA=60 \
    DORA_ARGS="--providers ours-dora-cuda,cublas-base -k p0.1-fwd_bwd" \
    timeout 65 bash bench/tools/gpu_session.sh > $O/session_chunk$mib.log 2>&1; pack
done
mkdir -p $O/h
OUT=$O/h STEPS="host" T_HOST=100 timeout 105 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
rm -rf $O
