#!/usr/bin/env bash
# Session 63, run 3 (carry .whl .ab_old .peers): build the tree with the dA GEMM's 16384-token range cap and send the
# wheel back in parts (run 4, if the budget allows, runs the rest of the suite against it); test_sm90_gemm.py; the long-range test without
# the promotion (expected to fail at 16384 tokens too); test_large_index alone; the targets grid with LoRAFusion
# (M 8192 and 2048, p 0 and 0.1, r 16/64, bf16 adapters); memcheck; the DoRA grid if time is left.
LIMIT=${LIMIT:-560}
R=$PWD; O=/tmp/r; rm -rf $O; mkdir -p $O/t $O/s $O/b $OUT/w; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C /tmp r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt; cp $0 $O/run.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 280 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -1 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; exit 0; fi
(cd /tmp/whl && split -b 15M lora_kernels-*.whl $OUT/w/part. && ls lora_kernels-*.whl > $OUT/w/name.txt && sha256sum lora_kernels-*.whl > $OUT/w/sha.txt)
PT="python3 -m pytest -q -rfE -p no:cacheprovider --tb=short"
(cd /tmp && PYTHONPATH=/tmp/site timeout 120 $PT $R/tests/test_large_index.py > $O/t/large.log 2>&1)
note "large-index rc=$?"; grep -aE "passed|failed" $O/t/large.log | tail -1 >> $O/summary.txt; grep -aE "^FAILED|^E  " $O/t/large.log | head -12 >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 150 $PT -n 16 $R/tests/test_sm90_gemm.py > $O/t/dA_gemm.log 2>&1)
note "test_sm90_gemm.py (all; the dA GEMM's included) rc=$?"; grep -aE "passed|failed" $O/t/dA_gemm.log | tail -1 >> $O/summary.txt; grep -aE "^FAILED" $O/t/dA_gemm.log >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 40 compute-sanitizer --tool memcheck python3 $R/bench/tools/sanitize_cuda.py \
  > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|sanitize run done" $O/s/memcheck.log >> $O/summary.txt; pack
for M in 8192 2048; do
  [ $(left $LIMIT) -gt 90 ] || break
  (cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout 100 python3 $R/bench/suite/targets.py \
    --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --M $M --p 0,0.1 --r 16,64 \
    --out $O/b/targets_$M.json > $O/b/targets_$M.txt 2>&1); note "targets M=$M rc=$?"
  sed -n '/^| mode/,$p' $O/b/targets_$M.txt >> $O/summary.txt; pack
done
(cd /tmp && LORA_KERNELS_DA_GEMM_PROMOTE=0 PYTHONPATH=/tmp/site timeout 40 $PT $R/tests/test_sm90_gemm.py -k long_token > $O/t/no_promote.log 2>&1)
note "long-range test without the promotion (expected to fail) rc=$?"; grep -aE "AssertionError|passed|failed" $O/t/no_promote.log | tail -2 >> $O/summary.txt; pack
if [ $(left $LIMIT) -gt 150 ]; then
  (cd /tmp && PYTHONPATH=/tmp/site timeout 140 python3 -m pytest $R/bench/suite/test_bench_lora.py --dora -q \
    -p no:cacheprovider --rep-ms 25 --warmup-ms 10 --gpu-reps 15 --b-scale 0.05 \
    --providers ours-dora-cuda,ours-dora-triton,ours-cuda,peft-dora,cublas-base \
    --benchmark-json $O/b/dora.json --jsonl $O/b/dora.jsonl > $O/b/dora.log 2>&1)
  note "dora grid rc=$?"; IN=$O/b/dora.json; [ -s $IN ] || IN=$O/b/dora.jsonl
  (cd /tmp && PYTHONPATH=/tmp/site python3 $R/bench/tools/make_table.py $IN --out /tmp/dt/ > $O/b/make_table.log 2>&1; cp /tmp/dt/bench_table.md $O/b/dora_table.md); pack
fi
note "total"; pack
