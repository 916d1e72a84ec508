#!/usr/bin/env bash
# Session 41, run 2 (carries .site/site.tgz from run 1): the run-1 failures again with their tracebacks (after the
# two test fixes), then the lead tiles' interleave switch against the default (fp32 adapters, fwd, p = 0).
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
mkdir -p $O/t
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=255 T_TESTS=130 TEST_ARGS="--tb=short" \
  TEST_FILES="$R/tests/test_contract.py::test_activation_checkpointing_regenerates_the_mask $R/tests/test_gpu_graphs.py::test_cuda_graph_capture_dora $R/tests/test_compile_cpu.py::test_dora_compiles_to_one_graph $R/tests/test_cuda_plans_host.py" \
  timeout 160 bash bench/tools/gpu_session.sh > $O/session_t.log 2>&1; pack
mkdir -p $O/ab
OUT=$O/ab STEPS=env_ab ENV_AB=LORA_KERNELS_FUSED_DEBUG=512 ENV_AB_REPEATS=2 T_ENV_AB=180 \
  ENV_AB_ARGS="--providers ours-cuda --M 2048,8192 --r 16,64 --p 0 --modes fwd --adapter-dtype float32" \
  timeout 185 bash bench/tools/gpu_session.sh > $O/session_ab.log 2>&1; pack
