#!/usr/bin/env bash
# Session 36, device run 5 (run 2's build, carried): tests/test_autograd_cpp.py after run 4's one failure (a test
# change only), then the host-time benchmark (bench/tools/host_time.py).
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_TESTS=90 TEST_FILES="$R/tests/test_autograd_cpp.py" \
  timeout 110 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
gzip -f $O/tests.log; pack
mkdir -p $O/h
OUT=$O/h STEPS="host" T_HOST=120 timeout 125 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
rm -rf $O
