#!/usr/bin/env bash
# Session 29, device run 2: build (saved as site.tgz for the last run); the streaming passes with the largest-span
# plan against the previous plan (stream_bench, both trees); kernel timelines at p = 0 and 0.1; the Triton backend's
# TMA main loop against cuBLAS at r = 16, 32 and both p.
R=$PWD; O=$OUT/r; mkdir -p $O
(bash .ab_old/stream_ab.sh build > $O/stream_ab_build.txt 2>&1) &
OUT=$O STEPS="build save" timeout 330 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null
wait
timeout 170 bash .ab_old/stream_ab.sh run $O > $O/stream_ab_summary.txt 2>&1
OUT=$O STEPS="timeline" T_TIMELINE=60 \
  TIMELINE_ARGS="--shapes 8192x4096x4096,8192x4096x1024 --r 16,64 --p 0,0.1 --adapter-dtype bfloat16" \
  timeout 65 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1
for ml in tma cublas; do mkdir -p $O/tri_$ml
  LORA_KERNELS_TRITON_MAINLOOP=$ml LORA_KERNELS_TRITON_AUTOTUNE=0 OUT=$O/tri_$ml STEPS="targets" T_TARGETS=60 \
    TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 3 --providers ours-triton --r 16,32 --p 0,0.1 --modes fwd,fwd_bwd" \
    timeout 65 bash bench/tools/gpu_session.sh > $O/session_tri_$ml.log 2>&1
done
tar -czf $OUT/run.tgz -C $OUT r && rm -rf $O
