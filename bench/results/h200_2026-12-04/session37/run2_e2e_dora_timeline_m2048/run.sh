#!/usr/bin/env bash
# Session 37, device run 2 (run 1's build, carried): end to end, a 2-layer Llama of Llama-3-8B layer shapes with DoRA
# on every linear, patched (cuda; dropout now in the C++ entry) vs PEFT; kernel timelines at M = 2048 (4096->4096,
# 4096->1024, r = 16, p = 0 and 0.1) against the floor's.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 200 python3 $R/bench/train/e2e_train.py --layers 2 --hidden 4096 \
  --intermediate 14336 --heads 32 --kv-heads 8 --batch 8 --seq 1024 --rank 16 --steps 6 --warmup 3 --loss-steps 10 \
  --backend cuda --dora --out $O/e2e_dora_cuda.json > $O/e2e_dora_cuda.log 2>&1); pack
mkdir -p $O/tl
OUT=$O/tl STEPS="timeline" T_TIMELINE=100 TIMELINE_ARGS="--shapes 2048x4096x4096,2048x4096x1024 --r 16 --p 0,0.1 --adapter-dtype bfloat16" \
  timeout 105 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
rm -rf $O
