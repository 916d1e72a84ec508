#!/usr/bin/env bash
# Next session, run 1 (carry .whl .ab_old .peers): build; the whole targets grid with LoRAFusion (M 8192 and 2048,
# p 0 and 0.1, r 16/64, bf16 adapters; the dA GEMM is the default since session 61); the dx GEMM's 128x256 tile at
# 4096->1024 against auto (not reached in session 61); e2e training per backend (dropout 0 / 0.05). First the dA
# GEMM's tests (the wide opt-in's included, not yet GPU-run) and the wide opt-in against the default.
LIMIT=${LIMIT:-570}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt; cp $0 $O/run.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 280 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -1 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; pack; exit 0; fi
PT="python3 -m pytest -q -rfE -p no:cacheprovider --tb=short -n 16"
(cd /tmp && PYTHONPATH=/tmp/site timeout 90 $PT $R/tests/test_sm90_gemm.py -k "dA_gemm" > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -2 >> $O/summary.txt; grep -aE "^FAILED" $O/t/tests.log | head >> $O/summary.txt
for c in d 1 d 1; do  # the wide dA GEMM (opt-in since session 61) against the dA pass: fp32 adapters at r = 64
  [ $(left $LIMIT) -gt 60 ] || break
  (cd /tmp && env LORA_KERNELS_DA_GEMM=${c/d/} PYTHONPATH=/tmp/site timeout 40 python3 $R/bench/suite/targets.py \
    --providers ours-cuda --adapter-dtype float32 --M 8192 --p 0 --r 64 --out $O/b/w_$c.json > $O/b/w_$c.txt 2>&1)
  note "targets w_$c rc=$?"; grep -aE "^fwd_bwd" $O/b/w_$c.txt >> $O/summary.txt; pack
done
for M in 8192 2048; do
  [ $(left $LIMIT) -gt 90 ] || break
  (cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout 100 python3 $R/bench/suite/targets.py \
    --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --M $M --p 0,0.1 --r 16,64 \
    --out $O/b/targets_$M.json > $O/b/targets_$M.txt 2>&1); note "targets M=$M rc=$?"
  sed -n '/^| mode/,$p' $O/b/targets_$M.txt >> $O/summary.txt; pack
done
T="python3 $R/bench/suite/targets.py --providers ours-cuda --adapter-dtype bfloat16 --M 8192 --p 0"
for c in d 4 d 4; do
  [ $(left $LIMIT) -gt 60 ] || break
  (cd /tmp && env LORA_KERNELS_SM90_GEMM_CONFIG=$c PYTHONPATH=/tmp/site timeout 25 $T --r 16,64 \
    --shapes 4096x1024 --out $O/b/cfg_$c.json > $O/b/cfg_$c.txt 2>&1)
  note "targets cfg_$c rc=$?"; grep -aE "^fwd_bwd" $O/b/cfg_$c.txt >> $O/summary.txt; pack
done
for b in cuda triton; do
  [ $(left $LIMIT) -gt 100 ] || break
  (cd /tmp && PYTHONPATH=/tmp/site timeout $(( $(left $LIMIT) - 10 )) python3 $R/bench/train/e2e_train.py \
    --layers 2 --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --batch 8 --seq 1024 --rank 16 \
    --steps 6 --warmup 3 --loss-steps 0 --backend $b --out $O/b/e2e_$b.json > $O/b/e2e_$b.log 2>&1)
  note "e2e $b rc=$?"; grep "^\[e2e\]" $O/b/e2e_$b.log >> $O/summary.txt; pack
done
note "total"; pack
