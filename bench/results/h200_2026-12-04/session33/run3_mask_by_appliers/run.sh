#!/usr/bin/env bash
# Session 33, run 3: the stream bench alone (no wheel build): the mask made by the threads that apply it (the shrink's
# consumer warps, dA's masking warpgroup) against the keep-bits pass + the pass.
R=$PWD; O=$OUT/r; mkdir -p $O
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/versions.txt
OUT=$O SB_WIDTHS=4096,1024 timeout 150 bash bench/dev/stream_bench.sh > $O/sb.log 2>&1
cp /tmp/sb.log $O/nvcc.log 2>/dev/null
