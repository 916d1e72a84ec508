#!/usr/bin/env bash
# Session 33, run 1: the standalone small-M bench (rd at every MF, the shared-x "sx" main loop), no wheel build.
R=$PWD; O=$OUT/r; mkdir -p $O
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" > $O/versions.txt 2>&1
OUT=$O timeout 280 bash bench/dev/small_m_bench.sh > $O/smb.log 2>&1; pack
rm -rf $O
