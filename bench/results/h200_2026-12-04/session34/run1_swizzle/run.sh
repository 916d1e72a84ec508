#!/usr/bin/env bash
# Prepared in session 33 for the next session's first device call: build; the sm_90 GEMM's swizzle choice (9ee5bf6)
# timed against swizzle 4 on the shapes whose tile grid swizzle 4 pads (N = 11008, 5120; M = 8200), the forward with
# dropout on the keep bits + shrink + GEMM path (mode 0) and the fused-off forward at p = 0; then the fused GEMM tests.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build" T_BUILD=222 timeout 228 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1; pack
S=8192x4096x11008,8192x11008x4096,8192x5120x13824,8192x13824x5120,8200x4096x4096,8192x4096x14336
for sw in 4 auto; do
  E=""; [ $sw = 4 ] && E="LORA_KERNELS_SM90_GEMM_SWIZZLE=4"
  (cd /tmp && env $E PYTHONPATH=/tmp/site timeout 55 python3 $R/bench/dev/fused_ab.py --tag sw$sw --modes 0 --p 0.1 \
     --shapes $S --r 16 --rounds 4 > $O/swizzle_${sw}_p01.txt 2>&1)
  (cd /tmp && env $E PYTHONPATH=/tmp/site timeout 55 python3 $R/bench/dev/fused_ab.py --tag sw$sw --modes 0 --p 0 \
     --shapes $S --r 16 --rounds 4 > $O/swizzle_${sw}_p0.txt 2>&1)
  pack
done
mkdir -p $O/t
OUT=$O/t STEPS="tests" T_TESTS=95 TEST_FILES="$R/tests/test_sm90_gemm.py $R/tests/test_fused_fwd_sm90.py" \
  timeout 98 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
rm -rf $O
