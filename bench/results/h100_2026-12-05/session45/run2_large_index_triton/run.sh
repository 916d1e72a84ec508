#!/usr/bin/env bash
# Session 45, run 2 (warm machine, run 1's /tmp/site): the Triton backend's large-index cases with y past 2^31
# elements (session 44's grouped split sums), in the few seconds of device time left.
R=$PWD; O=$OUT/r; mkdir -p $O/t
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 T_TESTS=75 TEST_WORKERS=2 TEST_ARGS="--tb=short -k triton-cuda-MxN" \
  TEST_FILES="$R/tests/test_large_index.py" \
  timeout 85 bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
rm -rf $O
