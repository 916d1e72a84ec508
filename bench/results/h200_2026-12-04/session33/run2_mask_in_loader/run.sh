#!/usr/bin/env bash
# Session 33, run 2: build; the dropout tests (the mask made in the sm_90 shrink and dA loaders, dA before dx);
# sanitizer; the stream bench (each pass making the mask against the keep-bits pass + the pass); the M = 8192 grid at
# p = 0.1 with the mask in the passes and with the keep-bits pass (LORA_KERNELS_MASK_IN_PASS=0), bf16 and fp32 adapters.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build" T_BUILD=222 timeout 225 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1; pack
OUT=$O STEPS="tests" T_TESTS=100 TEST_FILES="$R/tests/test_dropout_bits.py $R/tests/test_dy_pass_sm90.py $R/tests/test_device_seed.py" \
  timeout 103 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
mkdir -p $O/in_pass $O/bits_pass $O/fp32_in_pass $O/fp32_bits_pass
TA="--M 8192 --p 0.1 --providers ours-cuda --rounds 5"
OUT=$O/in_pass STEPS="targets" TARGETS_ARGS="$TA --adapter-dtype bfloat16" T_TARGETS=30 timeout 32 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
OUT=$O/bits_pass LORA_KERNELS_MASK_IN_PASS=0 STEPS="targets" TARGETS_ARGS="$TA --adapter-dtype bfloat16" T_TARGETS=30 timeout 32 bash bench/tools/gpu_session.sh > $O/session4.log 2>&1; pack
OUT=$O/fp32_in_pass STEPS="targets" TARGETS_ARGS="$TA --adapter-dtype float32" T_TARGETS=30 timeout 32 bash bench/tools/gpu_session.sh > $O/session5.log 2>&1; pack
OUT=$O/fp32_bits_pass LORA_KERNELS_MASK_IN_PASS=0 STEPS="targets" TARGETS_ARGS="$TA --adapter-dtype float32" T_TARGETS=30 timeout 32 bash bench/tools/gpu_session.sh > $O/session6.log 2>&1; pack
OUT=$O STEPS="sanitize" T_SANITIZE=40 timeout 42 bash bench/tools/gpu_session.sh > $O/session7.log 2>&1; pack
OUT=$O SB_WIDTHS=4096,1024 STEPS="stream" T_STREAM=80 timeout 82 bash bench/tools/gpu_session.sh > $O/session8.log 2>&1; pack
rm -rf $O
