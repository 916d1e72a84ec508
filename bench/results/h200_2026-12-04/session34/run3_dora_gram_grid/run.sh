#!/usr/bin/env bash
# Session 34, device run 3: build with csrc/dora_gram.cu (A Aᵀ in one launch, in place of at::mm); the DoRA GPU
# tests; per-kernel GPU time of DoRA's fwd+bwd at p = 0 (r = 16, 64); the DoRA grid (ours, PEFT's DoRA, LoRA, floor).
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build" T_BUILD=222 timeout 230 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1; pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=100 TEST_FILES="$R/tests/test_cuda_dora_ops.py $R/tests/test_dora_sm90.py $R/tests/test_dora.py $R/tests/test_dora_memory.py $R/tests/test_dora_peft.py" \
  timeout 105 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 55 python3 $R/bench/tools/profile_layer.py --backends dora-cuda \
   --shapes 8192x4096x1024,8192x4096x4096 --r 16,64 --p 0 > $O/profile_dora.txt 2>&1); pack
mkdir -p $O/g
OUT=$O/g STEPS="dora" T_DORA=170 DORA_ARGS="--providers ours-dora-cuda,peft-dora,ours-cuda,cublas-base" \
  timeout 175 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
rm -rf $O
