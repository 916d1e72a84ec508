#!/usr/bin/env bash
# Session 38, device run 4 (run 2's build, carried; this tree's Python and tests over it): tests/test_fused_fwd_sm90.py
# with the mended wide-tile test, and the two tests run 3's suite step left running at its time limit; host time per
# call (bench/tools/host_time.py).
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt 2>&1
OUT=$O STEPS="build" REUSE_BUILD=1 OVERLAY_PY=1 T_BUILD=260 timeout 270 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=150 TEST_FILES="$R/tests/test_fused_fwd_sm90.py $R/tests/test_triton_backend.py::test_fp32_adapter_products_are_fp32 $R/tests/test_triton_tma_mainloop.py::test_tma_fp16_vs_float64" \
  timeout 155 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
mkdir -p $O/h
OUT=$O/h STEPS="host" T_HOST=100 timeout 105 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
rm -rf $O
