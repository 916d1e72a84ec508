#!/usr/bin/env bash
# Session 36, device run 1: the register-A scaled dx GEMM, double-buffered A registers, one group per K-tile; per-kernel
# GPU time of DoRA's and LoRA's fwd+bwd at p = 0 (the dx GEMM with and without the scale); the DoRA GPU tests; the
# DoRA grid at p = 0, fwd+bwd.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build save" T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 70 python3 $R/bench/tools/profile_layer.py --backends dora-cuda,cuda \
   --shapes 8192x4096x4096,8192x14336x4096 --r 16 --p 0 > $O/profile_dora.txt 2>&1); pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=60 TEST_FILES="$R/tests/test_cuda_dora_ops.py $R/tests/test_dora_memory.py" \
  timeout 65 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
mkdir -p $O/g
OUT=$O/g STEPS="dora" T_DORA=45 DORA_ARGS="--providers ours-dora-cuda,peft-dora,ours-cuda,cublas-base -k p0.0-fwd_bwd" \
  timeout 50 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
rm -rf $O
