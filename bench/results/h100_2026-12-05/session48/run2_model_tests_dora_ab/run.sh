#!/usr/bin/env bash
# Session 48 run 2 (warm machine of run 1, carry .whl .ab_old .site): the DoRA model test's p = 0 cases that run 1's
# limit cut, then the rest of the DoRA A/B (B = this tree, A = 1c021a6's Python over the same build), alternating.
LIMIT=${LIMIT:-400}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/ab; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
[ -d /tmp/siteA/lora_kernels ] || { rm -rf /tmp/siteA && cp -r /tmp/site /tmp/siteA && (cd $R/.ab_old/old48 &&
  find lora_kernels -name '*.py' ! -name _build_info.py -exec cp --parents {} /tmp/siteA/ \;); }
FILES="$R/tests/test_dora_peft.py::test_gpu_model_matches_peft_bf16_fp32_adapters $R/tests/test_triton_fast_launch.py $R/tests/test_dora_sm90.py"
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 T_TESTS=75 TEST_WORKERS=16 TEST_ARGS="--tb=short" \
  TEST_FILES="$FILES" timeout 85 bash bench/tools/gpu_session.sh > $O/t/session.log 2>&1; pack
DA="--dora -q -p no:cacheprovider --rep-ms 30 --warmup-ms 10 --gpu-reps 15 --providers ours-dora-triton,cublas-base"
for i in 1 2 3; do
  site=$([ $((i % 2)) = 0 ] && echo /tmp/siteA || echo /tmp/site); tag=$([ $((i % 2)) = 0 ] && echo A || echo B)
  [ $(left $((LIMIT - 10))) -gt 60 ] || break
  (cd /tmp && PYTHONPATH=$site timeout $(left $((LIMIT - 10))) python3 -m pytest $R/bench/suite/test_bench_lora.py \
    $DA -k "p0.0-" --jsonl $O/ab/${tag}_$i.jsonl > $O/ab/${tag}_$i.log 2>&1); pack
done
rm -rf $O
