#!/usr/bin/env bash
# Session 44's plan (session 43's, plus session 44's tests), run 1: build and save this tree (with the stream-K probe's library, all seven configs, built
# alongside); the tests of session 43's changes (Triton: the TMA descriptor cache of triton 3.6's launcher, the one
# sum launch of the backward; DoRA's norm where the rank-r sum cancels, cuda combine included); the host-time
# bench (floor, PEFT, both backends) and host_trace at M = 2048; then, in the time left, the stream-K probe at the
# shapes with less than a wave of tiles (->1024 etc.).
R=$PWD; O=$OUT/r; mkdir -p $O; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
mkdir -p $O/p
OUT=$O/p STEPS="probe_bg" PROBE_CONFIGS="0 1 2 3 4 5 6" T_PROBE_BUILD=400 bash bench/tools/gpu_session.sh > $O/session_p0.log 2>&1
OUT=$O STEPS="build save" T_BUILD=270 timeout 280 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
mkdir -p $O/t
OUT=$O/t STEPS="build tests sanitize" REUSE_BUILD=1 T_TESTS=210 TEST_ARGS="--tb=short" \
  TEST_FILES="$R/tests/test_triton_plans.py $R/tests/test_triton_tma_mainloop.py $R/tests/test_gpu_graphs.py $R/tests/test_dora.py::test_dora_linear_where_the_rank_sum_cancels $R/tests/test_dora.py::test_weight_norm_where_the_rank_sum_cancels $R/tests/test_dora.py::test_dora_linear_with_cancelling_rows $R/tests/test_dora.py::test_dmagnitude_of_recomputed_z_with_float32_adapters $R/tests/test_triton_backend.py $R/tests/test_large_index.py $R/tests/test_bad_input.py" \
  timeout $(left 510) bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
mkdir -p $O/h
OUT=$O/h STEPS="host host_trace" HOST_TRACE_ARGS="--backends triton,cuda --M 2048" T_HOST=100 T_HOST_TRACE=50 \
  timeout $(left 560) bash bench/tools/gpu_session.sh > $O/session_h.log 2>&1; pack
OUT=$O/p STEPS="gemm_probe" T_PROBE=$(left 575) PROBE_ARGS="--configs 4,5,6 --regime burst --Ms 2048,3072" \
  timeout $(left 580) bash bench/tools/gpu_session.sh > $O/session_p.log 2>&1; pack
rm -rf $O
