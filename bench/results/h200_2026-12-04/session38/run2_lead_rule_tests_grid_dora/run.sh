#!/usr/bin/env bash
# Session 38, device run 2: build and save this tree (the fused forward's default takes the lead tiles at every count);
# the GPU tests of the forward paths (fused forward, small M, DoRA's fused p = 0 forward); the targets grid with fp32
# adapters (M = 2048, 8192; r = 16, 64; p = 0; fwd and fwd_bwd), burst; the DoRA grid at p = 0, fwd+bwd.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build save" T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=140 TEST_FILES="$R/tests/test_fused_fwd_sm90.py $R/tests/test_small_m.py $R/tests/test_dora_sm90.py $R/tests/test_cuda_dora_ops.py" \
  timeout 145 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
cd /tmp
PYTHONPATH=/tmp/site timeout 75 python3 $R/bench/suite/targets.py --providers ours-cuda --M 2048,8192 --r 16,64 --p 0 \
  --modes fwd,fwd_bwd --adapter-dtype float32 --out $O/targets_fp32_p0.json > $O/targets_fp32_p0.txt 2>&1
pack
cd $R; mkdir -p $O/g
OUT=$O/g STEPS="dora" T_DORA=70 DORA_ARGS="--providers ours-dora-cuda,peft-dora,ours-cuda,cublas-base -k p0.0-fwd_bwd" \
  timeout 75 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
rm -rf $O
