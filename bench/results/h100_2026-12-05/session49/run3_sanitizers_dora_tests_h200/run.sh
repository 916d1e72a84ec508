#!/usr/bin/env bash
# Session 49 run 3 (carry .ab_old .site .peers): run 2's build (this tree's csrc) with this tree's Python:
# compute-sanitizer memcheck (bench/tools/sanitize_cuda.py) and racecheck of the tensor-core recompute
# (its DoRA cases); the DoRA test files on the GPU (the Python commits after run 2: the recompute test on
# scale_colsum's path, the forward's norm parts in the Triton backward); the Triton DoRA host-time change A/B
# (session 49's Python before it, in .ab_old/old49, against this tree's) on fwd+bwd with trained-size adapters.
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b $O/s; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" >> $O/gpu.txt
rm -rf /tmp/site /tmp/old && mkdir -p /tmp/old && tar -xzf $R/.site/site.tgz -C /tmp && cp -r /tmp/site /tmp/old/site
(cd $R && find lora_kernels -name '*.py' ! -name _build_info.py -exec cp --parents {} /tmp/site/ \;)
(cd $R/.ab_old/old49 && find lora_kernels -name '*.py' ! -name _build_info.py -exec cp --parents {} /tmp/old/site/ \;)
note "unpacked"
(cd /tmp && PYTHONPATH=/tmp/site timeout $(left 70) compute-sanitizer --tool memcheck python3 $R/bench/tools/sanitize_cuda.py \
  > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|sanitize run done" $O/s/memcheck.log >> $O/summary.txt; pack
for tool in racecheck; do
  (cd /tmp && PYTHONPATH=/tmp/site timeout $(left 115) compute-sanitizer --tool $tool \
    --kernel-name kns=dora_dmag_recompute_tc python3 $R/bench/tools/sanitize_cuda.py --dora > $O/s/$tool.log 2>&1)
  note "$tool rc=$?"; grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|sanitize run done|rror" $O/s/$tool.log | head -5 >> $O/summary.txt; pack
done
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left 190) python3 -m pytest -v -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_dora.py $R/tests/test_dora_peft.py $R/tests/test_dora_memory.py \
  $R/tests/test_triton_fast_launch.py -k "triton or flagged or gpu" > $O/t/tests.log 2>&1)
note "tests rc=$?"
grep -aoE "(PASSED|FAILED|ERROR|SKIPPED) \S+::\S+" $O/t/tests.log | sort > $O/t/outcomes.txt
grep -aE "^=+ .*[0-9]+ (passed|failed|error)" $O/t/tests.log | tail -1 >> $O/summary.txt
grep -aE "^(FAILED|ERROR) " $O/t/tests.log | head -20 >> $O/summary.txt; pack
BENCH() {  # BENCH <site> <name> <limit>
  (cd /tmp && PYTHONPATH=$1 timeout $3 python3 -m pytest $R/bench/suite/test_bench_lora.py --dora -q \
    -p no:cacheprovider --rep-ms 30 --warmup-ms 10 --gpu-reps 15 --b-scale 0.05 --providers ours-dora-triton,cublas-base \
    -k "M8192-r16-p0.0 and (4096x4096 or 4096x1024)" --jsonl $O/b/$2.jsonl > $O/b/$2.log 2>&1)
  note "bench $2 rc=$?"; pack
}
[ -n "${AB:-}" ] && { BENCH /tmp/old/site old1 $(left 297); BENCH /tmp/site new1 $(left 319); }
note "total"; pack; rm -rf $O
