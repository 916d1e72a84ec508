#!/usr/bin/env bash
# Session 46, run 3 (the carried build of run 1): where the Triton backend's host time goes at M = 2048 with and
# without dropout (host_time.py: fwd+bwd 538.6 us at p = 0.1 against 400.6 at p = 0; on the CPU harness the two
# differ by 16 us), and the cuda backend's beside it.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
for a in "2048 0.1" "2048 0" "16 0.1"; do
  set -- $a; mkdir -p $O/m$1_p$2
  OUT=$O/m$1_p$2 STEPS="build host_trace" REUSE_BUILD=1 T_HOST_TRACE=100 \
    HOST_TRACE_ARGS="--backends triton,cuda --M $1 --p $2" \
    timeout 120 bash bench/tools/gpu_session.sh > $O/m$1_p$2/session.log 2>&1; pack
done
rm -rf $O
