#!/usr/bin/env bash
# Session 38, device run 1: build and save; the fused forward's u tiles (mode 1, today's default for fp32 adapters at
# r = 64) against the lead tiles (mode 2) over M = 1024 .. 8192 in the targets' burst regime (r = 64, p = 0, fp32
# adapters; r = 32 / bf16 adapters too at M = 2048, 8192); the host-side profile of the cuda backend's fwd+bwd.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build save" T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
cd /tmp
for mode in 1 2; do
  LORA_KERNELS_FUSED_FWD=$mode PYTHONPATH=/tmp/site timeout 100 python3 $R/bench/suite/targets.py --providers ours-cuda \
    --M 1024,2048,3072,4096,6144,8192 --r 64 --p 0 --modes fwd --adapter-dtype float32 \
    --out $O/targets_sweep_r64_mode$mode.json > $O/targets_sweep_r64_mode$mode.txt 2>&1
  pack
done
for M in 16 2048; do
  PYTHONPATH=/tmp/site timeout 50 python3 $R/bench/dev/host_trace.py --backends cuda --M $M --p 0 > $O/host_trace_m${M}_p0.txt 2>&1
  PYTHONPATH=/tmp/site timeout 50 python3 $R/bench/dev/host_trace.py --backends cuda --M $M --p 0.1 > $O/host_trace_m${M}_p0.1.txt 2>&1
  pack
done
rm -rf $O
