#!/usr/bin/env bash
# Session 29, device run 1: build; the Triton TMA main loop's GPU tests; the Triton backend's layer grid with and
# without its TMA main loop (fixed kernel 2afe4e3); host time per call (all providers); host traces of the cuda
# backend at M = 2048 (p = 0, 0.1).
R=$PWD; O=$OUT/r; mkdir -p $O
OUT=$O STEPS="build tests" T_TESTS=90 TEST_FILES="$R/tests/test_triton_tma_mainloop.py" \
  timeout 330 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
for ml in tma cublas; do mkdir -p $O/tri_$ml
  LORA_KERNELS_TRITON_MAINLOOP=$ml LORA_KERNELS_TRITON_AUTOTUNE=0 OUT=$O/tri_$ml STEPS="targets" T_TARGETS=50 \
    TARGETS_ARGS="--M 8192 --adapter-dtype bfloat16 --rounds 4 --providers ours-triton --r 16,64 --p 0 --modes fwd,fwd_bwd" \
    timeout 55 bash bench/tools/gpu_session.sh > $O/session_tri_$ml.log 2>&1
done
OUT=$O STEPS="host" T_HOST=100 timeout 105 bash bench/tools/gpu_session.sh > $O/session_host.log 2>&1
for p in 0 0.1; do
  (cd /tmp && PYTHONPATH=/tmp/site timeout 45 python3 $R/bench/dev/host_trace.py --backends cuda --M 2048 --p $p \
    --calls 50 --row-limit 30 > $O/host_trace_m2048_p$p.txt 2>&1)
done
tar -czf $OUT/run.tgz -C $OUT r && rm -rf $O
