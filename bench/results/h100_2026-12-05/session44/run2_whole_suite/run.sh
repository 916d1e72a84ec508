#!/usr/bin/env bash
# Session 43 plan, run 2 (carries .site/site.tgz from run 1): the whole GPU suite against that build.
R=$PWD; O=$OUT/r; mkdir -p $O/t
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=255 T_TESTS=420 \
  timeout 470 bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
rm -rf $O
