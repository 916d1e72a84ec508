#!/usr/bin/env bash
# bench/dev/stream_bench.cu (this tree's) built against this tree's csrc and against another tree's (OLD, default
# .ab_old/csrc: e.g. `rm -rf .ab_old/csrc && mkdir -p .ab_old && git archive main csrc | tar -x -C .ab_old`, then
# carried to the device), and run one after the other: the streaming passes of two trees side by side in one call.
#   stream_ab.sh build     compiles both (CPU only; run it in the background during the wheel's build)
#   stream_ab.sh run OUT   runs them into OUT/stream_ab.txt and prints the timing lines
set -u
OLD="${OLD:-.ab_old/csrc}"
FLAGS=(-arch=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -D__CUDA_NO_HALF_OPERATORS__
       -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
SRC="dy_pass_sm90.cu dA_sm90.cu shrink_sm90.cu plans.cu dA.cu shrink.cu dropout_bits.cu"
if [ "$1" = build ]; then
  (nvcc "${FLAGS[@]}" -Icsrc bench/dev/stream_bench.cu $(for f in $SRC; do echo csrc/$f; done) -o /tmp/sb_new \
     > /tmp/sb_new.log 2>&1; echo "new build rc=$?") &
  (nvcc "${FLAGS[@]}" -I"$OLD" bench/dev/stream_bench.cu $(for f in $SRC; do echo "$OLD/$f"; done) -o /tmp/sb_old \
     > /tmp/sb_old.log 2>&1; echo "old build rc=$?") &
  wait
  exit 0
fi
O="$2"
{ echo "=== old ($OLD)"; timeout 150 /tmp/sb_old 2>&1; echo "=== new"; timeout 150 /tmp/sb_new 2>&1; } > "$O/stream_ab.txt"
grep -E "^=== |pass P|shrink P|p=0.1|plain" "$O/stream_ab.txt" | grep -v ": plan" | head -160
