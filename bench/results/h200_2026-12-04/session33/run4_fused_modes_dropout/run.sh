#!/usr/bin/env bash
# Session 33, run 4: build; the fused forward's modes at p = 0.1 (0 keep bits + shrink + GEMM, the default; 1 u tiles;
# 2 lead tiles) across N and K, to find where the fused kernel beats the shrink pass with dropout.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build" T_BUILD=222 timeout 228 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
pack
S1=8192x4096x4096,8192x4096x8192,8192x4096x11008,8192x4096x14336,8192x2048x14336,8192x8192x14336,8192x14336x4096,2048x4096x14336,2048x4096x4096
(cd /tmp && PYTHONPATH=/tmp/site timeout 110 python3 $R/bench/dev/fused_ab.py --modes 0,1,2 --p 0.1 --shapes $S1 \
   --r 16,32 --rounds 4 > $O/fused_ab_fp32.txt 2>&1); pack
S2=8192x4096x4096,8192x4096x8192,8192x4096x14336,8192x14336x4096
(cd /tmp && PYTHONPATH=/tmp/site timeout 70 python3 $R/bench/dev/fused_ab.py --modes 0,1,2 --p 0.1 --shapes $S2 \
   --r 16,64 --rounds 4 --adapter-dtype bf16 > $O/fused_ab_bf16.txt 2>&1); pack
rm -rf $O
