#!/usr/bin/env bash
# Session 47 run 4 (carry .whl, .ab_old, .site): the split only where the pass rounds once (TMA, Triton main loop;
# the small-M forward an fp32 dot; the cuBLAS prefill as before): GPU tests of the changed files, then one A/B pair
# of the Triton layer at r = 16 (the TMA path) against the previous kernels.
LIMIT=${LIMIT:-185}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/ab; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
FILES="$R/tests/test_triton_backend.py $R/tests/test_triton_tma_mainloop.py $R/tests/test_dora_peft.py::test_gpu_model_matches_peft_bf16_fp32_adapters $R/tests/test_bad_input.py::test_nonfinite_dropped_elements_propagate_like_reference"
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_TESTS=95 TEST_WORKERS=16 TEST_ARGS="--tb=short" \
  TEST_FILES="$FILES" timeout 110 bash bench/tools/gpu_session.sh > $O/t/session.log 2>&1; pack
rm -rf /tmp/siteA && cp -r /tmp/site /tmp/siteA && T=/tmp/siteA/lora_kernels/backends/triton &&
  cp $R/.ab_old/old_py/{common,output_gemm,small_m}.py $T/kernels/ && cp $R/.ab_old/old_py/{configs,launch}.py $T/
TA="--providers ours-triton --M 8192 --r 16 --p 0 --rounds 5"
for i in 0 1; do
  site=$([ $i = 0 ] && echo /tmp/siteA || echo /tmp/site); tag=$([ $i = 0 ] && echo A || echo B)
  (cd /tmp && PYTHONPATH=$site timeout $(left $((LIMIT - 5))) python3 $R/bench/suite/targets.py $TA \
    --out $O/ab/${tag}_$i.json > $O/ab/${tag}_$i.txt 2>&1); pack
done
(cd /tmp && python3 $R/bench/dev/env_ab.py --compare $O/ab/A_*.json --vs $O/ab/B_*.json > $O/ab/compare.txt 2>&1); pack
rm -rf $O
