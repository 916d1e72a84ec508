#!/usr/bin/env bash
# Session 41, run 3 (carries .site/site.tgz): the checkpointing test and test_gpu_graphs.py after their fixes.
R=$PWD; O=$OUT/r; mkdir -p $O/t
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=255 T_TESTS=110 TEST_ARGS="--tb=short" \
  TEST_FILES="$R/tests/test_contract.py::test_activation_checkpointing_regenerates_the_mask $R/tests/test_gpu_graphs.py" \
  timeout 140 bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
