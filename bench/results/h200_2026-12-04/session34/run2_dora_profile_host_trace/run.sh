#!/usr/bin/env bash
# Session 34, device run 2: build (saved as site.tgz for later calls); per-kernel GPU time of DoRA's and LoRA's
# fwd+bwd at p = 0 (bench/tools/profile_layer.py, fp32 adapters); host traces of the cuda backend at M = 16.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
OUT=$O STEPS="build save" T_BUILD=222 timeout 240 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 170 python3 $R/bench/tools/profile_layer.py --backends dora-cuda,cuda \
   --shapes 8192x4096x1024,8192x4096x4096,8192x14336x4096 --r 16 --p 0 > $O/profile_dora.txt 2>&1); pack
for p in 0 0.1; do
  (cd /tmp && PYTHONPATH=/tmp/site timeout 40 python3 $R/bench/dev/host_trace.py --backends cuda --M 16 --p $p \
    --calls 50 --row-limit 30 > $O/host_trace_m16_p$p.txt 2>&1); pack
done
rm -rf $O
