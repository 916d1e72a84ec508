#!/usr/bin/env bash
# Session 46, run 1: build and save this tree (session 45's csrc: the DoRA saved-y rule's big_adapter flag);
# compute-sanitizer; then the files session 45 changed on the CPU only (Kahan split sums, plans, DoRA), in LIMIT s.
LIMIT=${LIMIT:-585}
R=$PWD; O=$OUT/r; mkdir -p $O; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build save" T_BUILD=300 timeout 310 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
mkdir -p $O/t
OUT=$O/t STEPS="build sanitize tests" REUSE_BUILD=1 T_TESTS=$(left $((LIMIT - 50))) T_SANITIZE=40 TEST_ARGS="--tb=short" \
  TEST_FILES="$R/tests/test_triton_plans.py $R/tests/test_triton_backend.py $R/tests/test_contract.py $R/tests/test_dora.py $R/tests/test_gpu_graphs.py $R/tests/test_triton_fast_launch.py" \
  timeout $(left $((LIMIT - 5))) bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
rm -rf $O
