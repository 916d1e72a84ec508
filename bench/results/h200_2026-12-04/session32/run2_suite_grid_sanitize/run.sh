#!/usr/bin/env bash
# Session 32, run 2: build of the final tree; the whole GPU suite; the M = 8192 grid with LoRAFusion (bf16 adapters);
# compute-sanitizer.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build tests" T_BUILD=222 T_TESTS=300 timeout 500 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
OUT=$O STEPS="targets" TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 5" T_TARGETS=62 \
  timeout 64 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
OUT=$O STEPS="sanitize" T_SANITIZE=28 timeout 30 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
rm -rf $O
