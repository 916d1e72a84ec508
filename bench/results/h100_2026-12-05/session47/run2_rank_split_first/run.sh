#!/usr/bin/env bash
# Session 47 run 2 (carry .whl, .ab_old, .site): the Triton rank-r term with fp32 adapters split (three MMAs, no
# rounding of u and B): tests, precision probe (triton and cuda), and an A/B of its speed against the previous
# kernels (.ab_old/old_py over a copy of the build) on the targets grid.
LIMIT=${LIMIT:-450}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/prec $O/ab; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
FILES="$R/tests/test_triton_backend.py $R/tests/test_dora_peft.py $R/tests/test_bad_input.py $R/tests/test_triton_tma_mainloop.py $R/tests/test_contract.py"
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_TESTS=150 TEST_WORKERS=16 TEST_ARGS="--tb=short" \
  TEST_FILES="$FILES" timeout 170 bash bench/tools/gpu_session.sh > $O/t/session.log 2>&1; pack
rm -rf /tmp/siteA && cp -r /tmp/site /tmp/siteA && cp $R/.ab_old/old_py/*.py /tmp/siteA/lora_kernels/backends/triton/kernels/
(cd /tmp && PYTHONPATH=/tmp/site timeout 60 python3 $R/bench/dev/dora_model_check.py --backends triton,cuda --p 0 \
  > $O/t/dora_model_check.txt 2>&1); pack
for be in triton cuda; do
  (cd /tmp && PYTHONPATH=/tmp/site timeout 50 python3 $R/bench/dev/precision_probe.py --M 2048 --backend $be --r 16,64 \
    --out $O/prec/$be.json > $O/prec/$be.txt 2>&1); pack
done
(cd /tmp && PYTHONPATH=/tmp/siteA timeout 40 python3 $R/bench/dev/precision_probe.py --M 2048 --backend triton --r 16,64 \
  --out $O/prec/triton_old.json > $O/prec/triton_old.txt 2>&1); pack
TA="--providers ours-triton --M 8192 --r 16,64 --p 0 --rounds 9"
i=0
while [ $(left $((LIMIT - 60))) -gt 60 ] && [ $i -lt 4 ]; do
  site=$([ $((i % 2)) = 0 ] && echo /tmp/siteA || echo /tmp/site); tag=$([ $((i % 2)) = 0 ] && echo A || echo B)
  (cd /tmp && PYTHONPATH=$site timeout $(left $((LIMIT - 8))) python3 $R/bench/suite/targets.py $TA \
    --out $O/ab/${tag}_$i.json > $O/ab/${tag}_$i.txt 2>&1); pack; i=$((i + 1))
done
(cd /tmp && python3 $R/bench/dev/env_ab.py --compare $O/ab/A_*.json --vs $O/ab/B_*.json > $O/ab/compare.txt 2>&1); pack
rm -rf $O
