#!/usr/bin/env bash
# Session 51 run 1 (carry .whl .ab_old .peers): build this tree (the shrink with dropout that makes its own mask,
# csrc/shrink_drop.cu). Its tests and the streaming-pass path tests; the forward A/B on/off at p = 0.1 (default rows,
# then 16-row blocks at r = 16); the GEMM issue's targets grid with LoRAFusion (bf16 adapters).
LIMIT=${LIMIT:-570}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
rm -rf /tmp/site
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 150 python3 -m pytest -q -rfE -p no:cacheprovider \
  --tb=short -n 16 $R/tests/test_shrink_drop.py $R/tests/test_dy_pass_sm90.py > $O/t/drop_tests.log 2>&1)
note "drop tests rc=$?"; grep -aE "passed|failed" $O/t/drop_tests.log | tail -3 >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 120 python3 $R/bench/dev/shrink_drop_ab.py --M 8192 --out $O/b/ab_default.json \
  > $O/b/ab_default.txt 2>&1)
note "ab default rc=$?"; grep geomean $O/b/ab_default.txt >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SHRINK_DROP_ROWS=16 timeout 60 python3 $R/bench/dev/shrink_drop_ab.py \
  --M 8192 --r 16 --out $O/b/ab_rows16.json > $O/b/ab_rows16.txt 2>&1)
note "ab rows16 rc=$?"; grep geomean $O/b/ab_rows16.txt >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left $((LIMIT - 8))) python3 \
  $R/bench/suite/targets.py --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --out $O/b/targets_bf16.json \
  > $O/b/targets_bf16.txt 2>&1)
note "targets bf16 rc=$?"; note "total"; pack; rm -rf $O
