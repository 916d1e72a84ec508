#!/usr/bin/env bash
# Session 48 run 1 (carry .whl, .ab_old): build the wheel from this tree (csrc unchanged since session 46) and save
# it; GPU tests of the files session 47 changed on the CPU only (the Triton forward_scaled, DoRA through it); then
# the DoRA grid's ours-dora-triton rows at p = 0, A/B: the tree before forward_scaled (1c021a6's Python over the
# same build) against this tree, alternating.
LIMIT=${LIMIT:-560}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/ab; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O/t STEPS="build save" T_BUILD=300 bash bench/tools/gpu_session.sh > $O/t/build_session.log 2>&1
mv $O/t/site.tgz $OUT/site.tgz 2>/dev/null; pack
T=tests; FILES=""
for f in test_triton_backend test_triton_tma_mainloop test_dora test_dora_peft test_dora_memory test_triton_plans \
         test_triton_fast_launch test_triton_specialization test_bad_input test_gpu_graphs test_contract test_dora_sm90; do
  [ -f $R/$T/$f.py ] && FILES="$FILES $R/$T/$f.py"; done
OUT=$O/t STEPS="tests" REUSE_BUILD=1 T_TESTS=$(left 380) TEST_WORKERS=16 TEST_ARGS="--tb=short" \
  TEST_FILES="$FILES" timeout $(left 395) bash bench/tools/gpu_session.sh > $O/t/session.log 2>&1; pack
rm -rf /tmp/siteA && cp -r /tmp/site /tmp/siteA && (cd $R/.ab_old/old48 && find lora_kernels -name '*.py' \
  ! -name _build_info.py -exec cp --parents {} /tmp/siteA/ \;)
DA="--dora -q -p no:cacheprovider --rep-ms 30 --warmup-ms 10 --gpu-reps 15 --providers ours-dora-triton,cublas-base"
for i in 0 1 2 3; do
  site=$([ $((i % 2)) = 0 ] && echo /tmp/siteA || echo /tmp/site); tag=$([ $((i % 2)) = 0 ] && echo A || echo B)
  [ $(left $((LIMIT - 10))) -gt 30 ] || break
  (cd /tmp && PYTHONPATH=$site timeout $(left $((LIMIT - 10))) python3 -m pytest $R/bench/suite/test_bench_lora.py \
    $DA -k "p0.0-" --jsonl $O/ab/${tag}_$i.jsonl > $O/ab/${tag}_$i.log 2>&1); pack
done
rm -rf $O
