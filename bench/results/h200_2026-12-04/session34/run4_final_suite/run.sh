#!/usr/bin/env bash
# Session 34, device run 4: build of the final tree (dora_gram with vector loads); per-kernel GPU time of DoRA's
# fwd+bwd at p = 0 (r = 16, 64); then the whole GPU suite.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build" T_BUILD=200 timeout 205 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 50 python3 $R/bench/tools/profile_layer.py --backends dora-cuda \
   --shapes 8192x4096x1024,8192x4096x4096 --r 16,64 --p 0 > $O/profile_dora.txt 2>&1); pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=315 timeout 320 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
rm -rf $O
