#!/usr/bin/env bash
# Session 32, run 1: build; small-M tests (the Hopper cluster kernel); small-M grid A/B (cluster kernel vs the
# register-direct kernel, LORA_KERNELS_SMALL_M_SM90=0); sanitizer; the standalone small-M bench.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build tests" T_BUILD=222 T_TESTS=110 TEST_FILES="$R/tests/test_small_m.py $R/tests/test_cuda_dora_ops.py" \
  timeout 340 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
for v in 1 0; do mkdir -p $O/sm90_$v
  LORA_KERNELS_SMALL_M_SM90=$v OUT=$O/sm90_$v STEPS="small_m" T_SMALL_M=62 SMALL_M_ARGS="--providers ours-cuda,linear-autograd --p 0,0.1 --rounds 10" \
    timeout 64 bash bench/tools/gpu_session.sh > $O/session_sm90_$v.log 2>&1
  pack
done
OUT=$O STEPS="sanitize" T_SANITIZE=30 timeout 32 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
OUT=$O timeout 88 bash bench/dev/small_m_bench.sh > $O/smb.log 2>&1; pack
rm -rf $O
