#!/usr/bin/env bash
# Session 30, device run 2: the streaming passes' bench with dropout (dA masked in the wgmma kernel against the
# mma.sync kernel and the kept-x route; the wgmma shrink with dropout at r <= 16 against mma.sync), alongside the
# wheel's build (saved as site.tgz); the GPU tests of the changed path; dA's routes A/B in the grid (p = 0.1,
# fwd+bwd: LORA_KERNELS_DA_MASKED=0 against the default).
R=$PWD; O=$OUT/r; mkdir -p $O/stream
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
(OUT=$O/stream STEPS="stream" T_STREAM=255 timeout 262 bash bench/tools/gpu_session.sh > $O/session_stream.log 2>&1) &
SP=$!
OUT=$O STEPS="build save" T_BUILD=228 timeout 238 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null
wait $SP; pack
TF=""; for f in test_dy_pass_sm90 test_contract test_autograd_cpp test_gpu_graphs; do TF="$TF $R/tests/$f.py"; done
OUT=$O STEPS="build tests" REUSE_BUILD=1 T_TESTS=150 TEST_FILES="$TF" timeout 160 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1
pack
for v in 0 1; do mkdir -p $O/da_masked$v
  LORA_KERNELS_DA_MASKED=$v OUT=$O/da_masked$v STEPS="targets" T_TARGETS=40 \
    TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 4 --providers ours-cuda --p 0.1 --modes fwd_bwd" \
    timeout 45 bash bench/tools/gpu_session.sh > $O/session_da$v.log 2>&1
done; pack
rm -rf $O
