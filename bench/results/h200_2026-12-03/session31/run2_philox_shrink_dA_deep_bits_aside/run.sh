#!/usr/bin/env bash
# Session 31, device run 2: the shrink making its own dropout mask (no keep-bits pass in the forward), dA with dropout
# on the 6-stage masked ring, the backward's keep bits beside the dy pass. stream_bench (this tree, 8192 x 4096) during
# the wheel's build; the GPU tests of the changed paths; layer A/B at M = 8192, p = 0.1, bf16 adapters:
# LORA_KERNELS_SHRINK_PHILOX=0 against the default (forward), LORA_KERNELS_BITS_ASIDE=0 against the default
# (forward+backward); compute-sanitizer.
R=$PWD; O=$OUT/r; mkdir -p $O/stream
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
(SB_WIDTHS=4096 OUT=$O/stream STEPS="stream" T_STREAM=215 timeout 220 bash bench/tools/gpu_session.sh > $O/session_stream.log 2>&1) &
SP=$!
OUT=$O STEPS="build" T_BUILD=222 timeout 228 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
wait $SP; pack
TF=""; for f in test_dy_pass_sm90 test_contract test_dropout_bits test_gpu_graphs; do TF="$TF $R/tests/$f.py"; done
OUT=$O STEPS="tests" T_TESTS=140 TEST_FILES="$TF" timeout 145 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1
pack
for v in 0 1; do mkdir -p $O/philox$v
  LORA_KERNELS_SHRINK_PHILOX=$v OUT=$O/philox$v STEPS="targets" T_TARGETS=26 \
    TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 4 --providers ours-cuda --p 0.1 --modes fwd" \
    timeout 28 bash bench/tools/gpu_session.sh > $O/session_philox$v.log 2>&1
done; pack
for v in 0 1; do mkdir -p $O/aside$v
  LORA_KERNELS_BITS_ASIDE=$v OUT=$O/aside$v STEPS="targets" T_TARGETS=37 \
    TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 4 --providers ours-cuda --p 0.1 --modes fwd_bwd" \
    timeout 39 bash bench/tools/gpu_session.sh > $O/session_aside$v.log 2>&1
done; pack
OUT=$O STEPS="sanitize" T_SANITIZE=45 timeout 48 bash bench/tools/gpu_session.sh > $O/session_san.log 2>&1; pack
rm -rf $O
