#!/usr/bin/env bash
# Session 51 run 2 (carry .whl .ab_old .peers): build this tree (the shrink with dropout that makes its own mask,
# csrc/shrink_drop.cu: mask pairs without multiplies, fp32 lora_A pre-split). Its tests, the path tests, the contract,
# device-seed and graph tests filtered to cuda; the forward A/B on/off at p = 0.1 (M = 8192, r = 16, 32, 64; M = 2048,
# r = 16); the GEMM issue's targets grid with LoRAFusion (bf16 adapters).
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
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 170 python3 -m pytest -q -rfE -p no:cacheprovider \
  --tb=short -n 16 $R/tests/test_shrink_drop.py $R/tests/test_dy_pass_sm90.py $R/tests/test_contract.py \
  $R/tests/test_device_seed.py $R/tests/test_gpu_graphs.py -k "cuda or drop or sm90 or graph or seed" > $O/t/drop_tests.log 2>&1)
note "drop tests rc=$?"; grep -aE "passed|failed" $O/t/drop_tests.log | tail -3 >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 100 python3 $R/bench/dev/shrink_drop_ab.py --M 8192 --out $O/b/ab_8192.json \
  > $O/b/ab_8192.txt 2>&1)
note "ab 8192 rc=$?"; grep geomean $O/b/ab_8192.txt >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 40 python3 $R/bench/dev/shrink_drop_ab.py --M 2048 --r 16 \
  --out $O/b/ab_2048.json > $O/b/ab_2048.txt 2>&1)
note "ab 2048 rc=$?"; grep geomean $O/b/ab_2048.txt >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left $((LIMIT - 8))) python3 \
  $R/bench/suite/targets.py --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --out $O/b/targets_bf16.json \
  > $O/b/targets_bf16.txt 2>&1)
note "targets bf16 rc=$?"; note "total"; pack; rm -rf $O
