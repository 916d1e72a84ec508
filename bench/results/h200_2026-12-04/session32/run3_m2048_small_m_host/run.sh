#!/usr/bin/env bash
# Session 32, run 3: build; the M = 2048 grid with LoRAFusion (bf16 adapters); small M (item-block cap, p = 0 and
# 0.1); host time; the standalone small-M bench.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build" T_BUILD=222 timeout 225 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1; pack
OUT=$O STEPS="targets" TARGETS_ARGS="--M 2048 --adapter-dtype bfloat16 --rounds 5" T_TARGETS=50 \
  timeout 52 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1; pack
OUT=$O STEPS="small_m" T_SMALL_M=70 SMALL_M_ARGS="--p 0,0.1" timeout 72 bash bench/tools/gpu_session.sh > $O/session3.log 2>&1; pack
OUT=$O STEPS="host" T_HOST=80 timeout 82 bash bench/tools/gpu_session.sh > $O/session4.log 2>&1; pack
OUT=$O timeout 88 bash bench/dev/small_m_bench.sh > $O/smb.log 2>&1; pack
rm -rf $O
