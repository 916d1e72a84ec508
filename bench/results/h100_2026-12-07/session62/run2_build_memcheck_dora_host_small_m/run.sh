#!/usr/bin/env bash
# Session 62 run 2 (carry .whl .ab_old): build the final csrc (the wide dA GEMM now the default) and send the wheel
# back in two parts (the next call runs the whole suite against it); compute-sanitizer memcheck; #17's DoRA grid
# (session 49's command: trained-size adapters, PEFT's DoRA, LoRA and the floor side by side); #16's host time and
# the small-M grid (bf16 and fp32 adapters, fwd and fwd_bwd).
LIMIT=${LIMIT:-560}
R=$PWD; O=/tmp/r; rm -rf $O; mkdir -p $O/t $O/b $O/s $OUT/w; S=$(date +%s)
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
note "wheel parts $(ls $OUT/w | tr '\n' ' ')"
(cd /tmp && PYTHONPATH=/tmp/site timeout 60 compute-sanitizer --tool memcheck python3 $R/bench/tools/sanitize_cuda.py \
  > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|sanitize run done" $O/s/memcheck.log >> $O/summary.txt; pack
if [ $(left $LIMIT) -gt 150 ]; then
  (cd /tmp && PYTHONPATH=/tmp/site timeout 140 python3 -m pytest $R/bench/suite/test_bench_lora.py --dora -q \
    -p no:cacheprovider --rep-ms 25 --warmup-ms 10 --gpu-reps 15 --b-scale 0.05 \
    --providers ours-dora-cuda,ours-dora-triton,ours-cuda,peft-dora,cublas-base \
    --benchmark-json $O/b/dora.json --jsonl $O/b/dora.jsonl > $O/b/dora.log 2>&1)
  note "dora grid rc=$?"; IN=$O/b/dora.json; [ -s $IN ] || IN=$O/b/dora.jsonl
  (cd /tmp && PYTHONPATH=/tmp/site python3 $R/bench/tools/make_table.py $IN --out /tmp/dt/ > $O/b/make_table.log 2>&1; cp /tmp/dt/bench_table.md $O/b/dora_table.md); pack
fi
if [ $(left $LIMIT) -gt 60 ]; then
  (cd /tmp && PYTHONPATH=/tmp/site timeout 55 python3 $R/bench/tools/host_time.py --out $O/b/host_time.json > $O/b/host_time.txt 2>&1)
  note "host_time rc=$?"; pack
fi
SM="--providers ours-cuda,linear-autograd --M 1,16,64 --shapes 4096x4096,4096x14336 --r 16 --p 0 --rounds 11 --gpu-batch 20 --calls 20"
for a in bfloat16 float32; do
  [ $(left $LIMIT) -gt 45 ] || break
  (cd /tmp && PYTHONPATH=/tmp/site timeout $(( $(left $LIMIT) - 5 )) python3 $R/bench/suite/targets.py $SM --adapter-dtype $a \
    --modes fwd,fwd_bwd --out $O/b/small_m_$a.json > $O/b/small_m_$a.txt 2>&1); note "small_m $a rc=$?"; pack
done
note "total"; pack
