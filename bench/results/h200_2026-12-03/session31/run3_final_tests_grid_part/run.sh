#!/usr/bin/env bash
# Session 31, device run 3 (last, short): build of the final tree (dA's 6-stage masked ring; the shrink Philox and the
# side-stream bits reverted); the streaming passes' GPU tests and the dropout-bits tests; the M = 8192 grid at
# p = 0.1 with LoRAFusion (bf16 adapters).
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O STEPS="build" T_BUILD=205 timeout 208 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
TF="$R/tests/test_dy_pass_sm90.py $R/tests/test_dropout_bits.py"
OUT=$O STEPS="tests" T_TESTS=45 TEST_FILES="$TF" timeout 48 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1
pack
OUT=$O STEPS="targets" TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 3 --p 0.1" T_TARGETS=36 \
  timeout 38 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
rm -rf $O
