#!/usr/bin/env bash
# Session 45, run 3 (warm machine, run 1's /tmp/site): test_triton_plans.py (session 44's fix of its one-launch sums
# test, which did not allow the GPU plan's cuBLAS main loop), in the device time left.
R=$PWD; O=$OUT/r; mkdir -p $O/t
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 T_TESTS=36 TEST_ARGS="--tb=short" TEST_FILES="$R/tests/test_triton_plans.py" \
  timeout 44 bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
rm -rf $O
