#!/usr/bin/env bash
# bench/dev/stream_bench.cu (this tree's) built against this tree's csrc and against .ab_old/csrc (the tree before
# the largest-span split plan, bdbb008).
#   stream_ab.sh build   compiles both (CPU only; run it in the background during the wheel's build)
#   stream_ab.sh run O   runs them one after the other into O/stream_ab.txt
set -u
FLAGS=(-arch=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -D__CUDA_NO_HALF_OPERATORS__
       -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
SRC="csrc/dy_pass_sm90.cu csrc/dA_sm90.cu csrc/shrink_sm90.cu csrc/plans.cu"
if [ "$1" = build ]; then
  (nvcc "${FLAGS[@]}" -Icsrc bench/dev/stream_bench.cu $SRC -o /tmp/sb_new > /tmp/sb_new.log 2>&1; echo "new build rc=$?") &
  (cd .ab_old && nvcc "${FLAGS[@]}" -Icsrc ../bench/dev/stream_bench.cu $SRC -o /tmp/sb_old > /tmp/sb_old.log 2>&1; echo "old build rc=$?") &
  wait
  exit 0
fi
O="$2"
{ echo "=== old"; timeout 80 /tmp/sb_old 2>&1; echo "=== new"; timeout 80 /tmp/sb_new 2>&1; } > "$O/stream_ab.txt"
grep -E "===|pass P|shrink P|plain" "$O/stream_ab.txt" | grep -v plan | head -80
