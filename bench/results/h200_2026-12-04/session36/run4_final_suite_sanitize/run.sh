#!/usr/bin/env bash
# Session 36, device run 4 (run 2's build, carried; this tree's Python over it): the whole GPU suite, then
# compute-sanitizer memcheck on a small cuda fwd+bwd (its DoRA calls take the in-place c ⊙ dy path).
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_TESTS=400 timeout 430 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
gzip -f $O/tests.log; pack
mkdir -p $O/s
OUT=$O/s STEPS="build sanitize" REUSE_BUILD=1 OVERLAY_PY=1 T_SANITIZE=120 timeout 130 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1
gzip -f /tmp/sanitize.log; cp /tmp/sanitize.log.gz $O/s/ 2>/dev/null; pack
rm -rf $O
