#!/usr/bin/env bash
# Session 29, device run 3 (last): run 2's build (carried .site/site.tgz, this tree's Python over it); the GPU tests of
# the paths this session changed (the streaming passes' plans, the Triton backend's auto main loop, and the contract
# and PEFT tests over every backend); the M = 8192 grid with LoRAFusion (bf16 adapters); compute-sanitizer; the
# M = 2048 grid; host time. The archive is rewritten after every step.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
TF=""; for f in test_dy_pass_sm90 test_contract test_triton_tma_mainloop test_triton_backend test_autograd_cpp test_peft_patch; do
  TF="$TF $R/tests/$f.py"; done
REUSE_BUILD=1 OVERLAY_PY=1 OUT=$O STEPS="build tests" T_TESTS=190 TEST_FILES="$TF" \
  timeout 205 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1; pack
OUT=$O STEPS="targets" TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 6" T_TARGETS=70 \
  timeout 75 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
OUT=$O STEPS="sanitize" T_SANITIZE=40 timeout 45 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
mkdir -p $O/m2048 && OUT=$O/m2048 STEPS="targets" TARGETS_ARGS="--M 2048 --adapter-dtype bfloat16 --rounds 6 --providers ours-cuda" \
  T_TARGETS=36 timeout 40 bash bench/tools/gpu_session.sh > $O/session4.log 2>&1; pack
OUT=$O STEPS="host" T_HOST=90 timeout 95 bash bench/tools/gpu_session.sh > $O/session5.log 2>&1; pack
rm -rf $O
