#!/usr/bin/env bash
# Session 33, run 5: build; the fused-forward and dropout tests; the forward at M = 8192, p = 0.1 with the new
# default (u tiles where M >= 8192 and N >= 2.5 K), fp32 and bf16 adapters.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build" T_BUILD=222 timeout 228 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1; pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=110 TEST_FILES="$R/tests/test_fused_fwd_sm90.py $R/tests/test_dropout_bits.py" \
  timeout 113 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
for a in float32 bfloat16; do mkdir -p $O/$a
  OUT=$O/$a STEPS="targets" T_TARGETS=22 TARGETS_ARGS="--M 8192 --rounds 5 --providers ours-cuda --p 0.1 --modes fwd --adapter-dtype $a" \
    timeout 24 bash bench/tools/gpu_session.sh > $O/session_$a.log 2>&1; pack
done
rm -rf $O
