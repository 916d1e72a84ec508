#!/usr/bin/env bash
# Session 53 run 2 (carry .whl .ab_old .peers): build this tree; why a forward costs more in the grid's burst regime
# than back to back (burst_gap.py, with and without programmatic dependent launch); the fused forward's per-tile
# trace at 2048 x 4096 -> 1024 (one wave); the u work's cost on the wide tile (debug 1: no waits, 65: no waits, no u).
LIMIT=${LIMIT:-560}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
if [ "${REUSE:-0}" != 1 ] || ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then
  rm -rf /tmp/site
  LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
  note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
fi
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
B="python3 $R/bench/dev/burst_gap.py --shapes 8192x4096x1024,2048x4096x1024,2048x4096x4096,8192x4096x4096 --r 16"
(cd /tmp && PYTHONPATH=/tmp/site timeout 90 $B --tag pdl1 >> $O/b/burst.txt 2>&1); note "burst pdl1 rc=$?"; pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_PDL=0 timeout 90 $B --tag pdl0 >> $O/b/burst.txt 2>&1); note "burst pdl0 rc=$?"; pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_DEBUG=16 timeout 60 python3 $R/bench/dev/fused_ab.py \
  --modes 2 --adapter-dtype bf16 --r 16 --rounds 2 --calls 5 --tag trace --trace --shapes 2048x4096x1024,8192x4096x1024 > $O/b/trace.txt 2>&1)
note "trace rc=$?"; pack
G="python3 $R/bench/dev/fused_gap.py --modes 2 --r 16,64 --shapes 8192x4096x1024,2048x4096x1024,2048x4096x4096"
for d in 0 1 65 0; do
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_DEBUG=$d timeout 45 $G --tag d$d >> $O/b/gap.txt 2>&1); note "gap d$d rc=$?"
done
note "total"; pack; rm -rf $O
