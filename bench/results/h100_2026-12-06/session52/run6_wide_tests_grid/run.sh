#!/usr/bin/env bash
# Session 52 run 4 (carry .whl .ab_old .peers): build this tree (the sm_90 GEMM's 128 x 256 tile below N = 2048 where
# its tiles fill 1.5 waves); the GPU tests of the fused forward, the sm_90 GEMM and the shrink with dropout; the A/B of
# the new tile at N = 1024 (default against LORA_KERNELS_SM90_GEMM_CONFIG=1, the old pick there); the GEMM issue's
# targets grid with LoRAFusion (bf16 adapters); a per-tile trace of the fused forward at 8192 x 4096 -> 1024.
LIMIT=${LIMIT:-470}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
rm -rf /tmp/site
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 60 python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 -k "wide or benchmarked" $R/tests/test_fused_fwd_sm90.py $R/tests/test_sm90_gemm.py \
  > $O/t/tests_quick.log 2>&1)
note "quick tests rc=$?"; grep -aE "passed|failed" $O/t/tests_quick.log | tail -3 >> $O/summary.txt; pack
G="python3 $R/bench/dev/fused_gap.py --r 16,64 --shapes 8192x4096x1024,2048x4096x1024"
for i in 1; do
  (cd /tmp && PYTHONPATH=/tmp/site timeout 40 $G --tag new$i >> $O/b/gap.txt 2>&1); note "gap new$i rc=$?"
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SM90_GEMM_CONFIG=1 timeout 40 $G --tag old$i >> $O/b/gap.txt 2>&1); note "gap old$i rc=$?"
  pack
done
(cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left $((LIMIT - 25))) python3 \
  $R/bench/suite/targets.py --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --out $O/b/targets_bf16.json \
  > $O/b/targets_bf16.txt 2>&1)
note "targets bf16 rc=$?"; pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left $((LIMIT - 20))) python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_fused_fwd_sm90.py $R/tests/test_sm90_gemm.py $R/tests/test_shrink_drop.py \
  > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_DEBUG=16 timeout $(left $((LIMIT - 3))) python3 $R/bench/dev/fused_ab.py \
  --modes 2 --adapter-dtype bf16 --r 16 --rounds 2 --calls 5 --tag trace --trace --shapes 8192x4096x1024 > $O/b/trace.txt 2>&1)
note "trace rc=$?"; note "total"; pack; rm -rf $O
