#!/usr/bin/env bash
# Session 36, device run 3 (run 2's build, carried): the DoRA grid at p = 0 and 0.1, fwd+bwd, peak memory with the
# caller's dy and with a dy made by autograd (y held both ways); the peak trace at the test's shape with an autograd
# dy; end to end, a 2-layer Llama of Llama-3-8B layer shapes with DoRA on every linear, patched (cuda) vs PEFT.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
mkdir -p $O/g
OUT=$O/g STEPS="dora" T_DORA=120 DORA_ARGS="--providers ours-dora-cuda,peft-dora,ours-cuda,cublas-base -k fwd_bwd" \
  timeout 125 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 40 python3 $R/bench/dev/peak_trace.py --p 0 --autograd-dy > $O/peak_trace_p0_autograd_dy.txt 2>&1
 PYTHONPATH=/tmp/site timeout 40 python3 $R/bench/dev/peak_trace.py --p 0 > $O/peak_trace_p0_caller_dy.txt 2>&1); pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 200 python3 $R/bench/train/e2e_train.py --layers 2 --hidden 4096 \
  --intermediate 14336 --heads 32 --kv-heads 8 --batch 8 --seq 1024 --rank 16 --steps 6 --warmup 3 --loss-steps 10 \
  --backend cuda --dora --out $O/e2e_dora_cuda.json > $O/e2e_dora_cuda.log 2>&1); pack
rm -rf $O
