#!/usr/bin/env bash
# Session 38, device run 3 (run 2's build, carried; this tree's Python and tests over it): the whole GPU suite against
# the installed wheel; compute-sanitizer memcheck.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=330 timeout 335 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1
gzip -f $O/t/tests.log; pack
mkdir -p $O/s
OUT=$O/s STEPS="sanitize" T_SANITIZE=110 timeout 115 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1
gzip -c /tmp/sanitize.log > $O/s/sanitize.log.gz; pack
rm -rf $O
