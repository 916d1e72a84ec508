#!/usr/bin/env bash
# Session 45, run 1 for a short budget (LIMIT seconds): build this tree (csrc changed: the DoRA saved-y recompute
# rule's big_adapter flag), then the cuda DoRA ops' tests and test_dora.py's saved-y and float64 tests in the time left.
LIMIT=${LIMIT:-360}
R=$PWD; O=$OUT/r; mkdir -p $O/t; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build" T_BUILD=280 timeout 290 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1; pack
D=$R/tests/test_dora.py
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 T_TESTS=$(left $((LIMIT - 25))) TEST_ARGS="--tb=short" \
  TEST_FILES="$R/tests/test_cuda_dora_ops.py $D::test_saved_y_where_the_adapter_dominates_or_cancels $D::test_saved_y_with_zero_magnitudes $D::test_saved_y_with_small_magnitudes_and_a_bias $D::test_saved_y_or_recompute_same_grads $D::test_fp32_adapters_on_half_base $D::test_against_float64 $R/tests/test_dora_memory.py" \
  timeout $(left $((LIMIT - 5))) bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
rm -rf $O
