#!/usr/bin/env bash
# Session 37, device run 1: DoRA with dropout in C++ (DoraDropoutFunction). Build and save; the DoRA GPU tests
# (entry with dropout against float64, row chunks, against the Python path, no host sync, peak memory; the C++ shim);
# the DoRA grid at p = 0 and 0.1, fwd+bwd, with PEFT's DoRA, LoRA and the floor.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build save" T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=150 TEST_FILES="$R/tests/test_cuda_dora_ops.py $R/tests/test_dora_memory.py $R/tests/test_dora.py $R/tests/test_dora_peft.py $R/tests/test_autograd_cpp.py" \
  timeout 155 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
mkdir -p $O/g
OUT=$O/g STEPS="dora" T_DORA=120 DORA_ARGS="--providers ours-dora-cuda,peft-dora,ours-cuda,cublas-base -k fwd_bwd" \
  timeout 125 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
rm -rf $O
