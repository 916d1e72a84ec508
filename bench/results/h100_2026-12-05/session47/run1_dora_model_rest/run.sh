#!/usr/bin/env bash
# Next session, run 1 (carry .whl, .ab_old and .site: session 46's build of 757099b's sources, still this tree's
# unless csrc/ or lora_kernels/ changed since; the build step checks): session 46's DoRA model failure, per backend,
# with tracebacks and every grad's margin (bench/dev/dora_model_check.py: as is, dy kept, no row rule), then the
# test files session 46's run 4 did not reach, in LIMIT s.
LIMIT=${LIMIT:-420}
R=$PWD; O=$OUT/r; mkdir -p $O/diag $O/t; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O/diag STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_TESTS=120 TEST_WORKERS=3 TEST_ARGS="--tb=long -k gpu_model" \
  TEST_FILES="$R/tests/test_dora_peft.py" timeout 140 bash bench/tools/gpu_session.sh > $O/diag/session.log 2>&1; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 150 python3 $R/bench/dev/dora_model_check.py --backends cuda,triton,torch \
  --p 0 > $O/diag/dora_model_check.txt 2>&1); pack
FILES="$R/tests/test_cuda_dora_ops.py $R/tests/test_dora_memory.py $R/tests/test_dora_peft.py $R/tests/test_dropout_bits.py $R/tests/test_fused_fwd_sm90.py $R/tests/test_peft_patch.py $R/tests/test_triton_tma_mainloop.py $R/tests/test_compile_cpu.py $R/tests/test_first_contact.py $R/tests/test_config.py $R/tests/test_host_time_bench.py $R/tests/test_dora_sm90.py $R/tests/test_triton_smaller_gpus.py $R/tests/test_triton_specialization.py"
OUT=$O/t STEPS="build tests" REUSE_BUILD=1 OVERLAY_PY=1 T_TESTS=$(left $((LIMIT - 10))) TEST_ARGS="--tb=short" TEST_FILES="$FILES" \
  timeout $(left $((LIMIT - 3))) bash bench/tools/gpu_session.sh > $O/t/session.log 2>&1; pack
rm -rf $O
