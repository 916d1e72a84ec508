#!/usr/bin/env bash
# Session 46, run 4 (the carried build of run 1), on what device time was left: the Triton backend's cases with y
# past 2^31 elements (its dA/dB split sums are Kahan sums since session 45, not yet run there on a GPU) on 4
# workers, then the test files that run 1 did not run, on 16 workers, in the time left of LIMIT s.
LIMIT=${LIMIT:-200}
R=$PWD; O=$OUT/r; mkdir -p $O/big $O/rest; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O/big STEPS="build tests" REUSE_BUILD=1 T_TESTS=100 TEST_WORKERS=4 TEST_ARGS="--tb=short -k triton" \
  TEST_FILES="$R/tests/test_large_index.py" timeout 115 bash bench/tools/gpu_session.sh > $O/big/session.log 2>&1; pack
RUN1="test_triton_plans.py test_triton_backend.py test_contract.py test_dora.py test_gpu_graphs.py test_triton_fast_launch.py test_large_index.py"
FILES=""; for f in $R/tests/test_*.py; do case " $RUN1 " in *" $(basename $f) "*) ;; *) FILES="$FILES $f";; esac; done
OUT=$O/rest STEPS="build tests" REUSE_BUILD=1 T_TESTS=$(left $((LIMIT - 10))) TEST_ARGS="--tb=short" TEST_FILES="$FILES" \
  timeout $(left $((LIMIT - 3))) bash bench/tools/gpu_session.sh > $O/rest/session.log 2>&1; pack
rm -rf $O
