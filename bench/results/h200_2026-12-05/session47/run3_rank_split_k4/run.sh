#!/usr/bin/env bash
# Session 47 run 3 (carry .whl, .ab_old, .site): the split rank-r term with the TMA output stored in halves where
# the whole tile does not fit (fp32 adapters): GPU tests of the changed files, then an A/B of the Triton layer
# against the previous kernels (.ab_old/old_py over a copy of the build) on the targets grid, then the precision probe.
LIMIT=${LIMIT:-330}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/prec $O/ab; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
FILES="$R/tests/test_triton_tma_mainloop.py $R/tests/test_triton_backend.py $R/tests/test_dora_peft.py $R/tests/test_bad_input.py"
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_TESTS=110 TEST_WORKERS=16 TEST_ARGS="--tb=short" \
  TEST_FILES="$FILES" timeout 130 bash bench/tools/gpu_session.sh > $O/t/session.log 2>&1; pack
rm -rf /tmp/siteA && cp -r /tmp/site /tmp/siteA && T=/tmp/siteA/lora_kernels/backends/triton &&
  cp $R/.ab_old/old_py/{common,output_gemm,small_m}.py $T/kernels/ && cp $R/.ab_old/old_py/{configs,launch}.py $T/
TA="--providers ours-triton --M 8192 --r 16,64 --p 0 --rounds 7"
i=0
while [ $(left $((LIMIT - 40))) -gt 45 ] && [ $i -lt 4 ]; do
  site=$([ $((i % 2)) = 0 ] && echo /tmp/siteA || echo /tmp/site); tag=$([ $((i % 2)) = 0 ] && echo A || echo B)
  (cd /tmp && PYTHONPATH=$site timeout $(left $((LIMIT - 40))) python3 $R/bench/suite/targets.py $TA \
    --out $O/ab/${tag}_$i.json > $O/ab/${tag}_$i.txt 2>&1); pack; i=$((i + 1))
done
(cd /tmp && python3 $R/bench/dev/env_ab.py --compare $O/ab/A_*.json --vs $O/ab/B_*.json > $O/ab/compare.txt 2>&1); pack
(cd /tmp && PYTHONPATH=/tmp/site timeout $(left $((LIMIT - 3))) python3 $R/bench/dev/precision_probe.py --M 2048 \
  --backend triton --r 16,64 --out $O/prec/triton.json > $O/prec/triton.txt 2>&1); pack
rm -rf $O
