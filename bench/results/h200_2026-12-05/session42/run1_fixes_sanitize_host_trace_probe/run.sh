#!/usr/bin/env bash
# Session 42, run 1: build and save this tree (the stream-K probe's library built alongside); the two session-41
# test fixes (checkpointing fixture, DoRA capture's cuBLAS handle), test_gpu_graphs.py, test_fused_fwd_sm90.py
# (the interleave switch removed) and the new cross-stream ‖W_n‖² cache test; the sanitizer; host_trace of both
# backends at M = 2048 (cProfile section for triton); then, in the time left, the sm_90 GEMM's stream-K probe
# (config 6) against configs 4 and 5 and cuBLAS, bursts, M = 2048, 3072, 8192.
R=$PWD; O=$OUT/r; mkdir -p $O; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
mkdir -p $O/p
OUT=$O/p STEPS="probe_bg" PROBE_CONFIGS="4 5 6" T_PROBE_BUILD=400 bash bench/tools/gpu_session.sh > $O/session_p0.log 2>&1
OUT=$O STEPS="build save" T_BUILD=270 timeout 280 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
mkdir -p $O/t
OUT=$O/t STEPS="build tests sanitize" REUSE_BUILD=1 T_TESTS=150 TEST_ARGS="--tb=short" \
  TEST_FILES="$R/tests/test_contract.py::test_activation_checkpointing_regenerates_the_mask $R/tests/test_gpu_graphs.py $R/tests/test_fused_fwd_sm90.py $R/tests/test_dora.py::test_norm_cache_hit_on_another_stream $R/tests/test_dora.py::test_saved_y_with_small_magnitudes_and_a_bias $R/tests/test_dora.py::test_saved_y_with_zero_magnitudes $R/tests/test_bad_input.py::test_non_finite_scaling_is_a_clear_error" \
  timeout $(left 470) bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
mkdir -p $O/h
OUT=$O/h STEPS="host_trace" HOST_TRACE_ARGS="--backends triton,cuda --M 2048" T_HOST_TRACE=50 \
  timeout $(left 500) bash bench/tools/gpu_session.sh > $O/session_h.log 2>&1; pack
OUT=$O/p STEPS="gemm_probe" T_PROBE=$(left 540) PROBE_ARGS="--configs 4,5,6 --regime burst --Ms 2048,3072,8192" \
  timeout $(left 545) bash bench/tools/gpu_session.sh > $O/session_p.log 2>&1; pack
rm -rf $O
