#!/usr/bin/env bash
# Session 41, run 1: build and save this tree; the whole GPU suite against it.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build save" T_BUILD=255 timeout 265 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=300 timeout 310 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
rm -rf $O
