#!/usr/bin/env bash
# Session 38, device run 5 (run 2's build, carried): host time per call again (run 4's host was slower throughout:
# F.linear's fwd+bwd 237 us against 194 in session 37), first thing on the machine; DoRA at p = 0.1 with 256 MiB row
# chunks (default 64) against the floor, GPU time and peak memory.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
mkdir -p $O/h
OUT=$O/h STEPS="host" T_HOST=100 timeout 105 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
for mib in 64 256; do
  mkdir -p $O/chunk$mib
  LORA_KERNELS_DORA_CHUNK_MIB=$mib OUT=$O/chunk$mib STEPS="dora" T_DORA=55 \
    DORA_ARGS="--providers ours-dora-cuda,cublas-base -k p0.1-fwd_bwd" \
    timeout 60 bash bench/tools/gpu_session.sh > $O/session_chunk$mib.log 2>&1; pack
done
rm -rf $O
