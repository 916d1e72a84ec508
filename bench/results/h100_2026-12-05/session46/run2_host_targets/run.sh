#!/usr/bin/env bash
# Session 46, run 2 (warm machine, run 1's /tmp/site): host time per call, then the GEMM issue's targets grid.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
OUT=$O STEPS="build host targets" REUSE_BUILD=1 T_HOST=150 T_TARGETS=380 \
  timeout 560 bash bench/tools/gpu_session.sh > $O/session.log 2>&1; pack
rm -rf $O
