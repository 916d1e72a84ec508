#!/usr/bin/env bash
# Session 58 run 3 (carry .whl .ab_old .peers): build; the split variant's tests (clusters of 2), the fused forward's
# file and the DoRA sm_90 tests; the targets grid at M = 8192, p = 0 (bf16 adapters, LoRAFusion beside) default / split
# off; memcheck of split cases.
LIMIT=${LIMIT:-430}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b $O/s; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
if [ ! -d /tmp/site/lora_kernels ]; then
  LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 260 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
  note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
else
  note "build reused"
fi
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -80 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
PT="python3 -m pytest -q -rfE -p no:cacheprovider --tb=short -n 16"
(cd /tmp && PYTHONPATH=/tmp/site timeout 70 $PT $R/tests/test_fused_fwd_sm90.py -k split_variant > $O/t/tests_split.log 2>&1)
note "split tests rc=$?"; grep -aE "passed|failed" $O/t/tests_split.log | tail -3 >> $O/summary.txt; pack
for c in d 0; do
  [ $(left $LIMIT) -gt 90 ] || break
  [ $c = d ] && E="LORA_KERNELS_FUSED_SPLIT=" || E="LORA_KERNELS_FUSED_SPLIT=0"
  (cd /tmp && env $E PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout 75 python3 $R/bench/suite/targets.py \
    --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --M 8192 --p 0 --r 16,64 --out $O/b/targets_split_$c.json \
    > $O/b/targets_split_$c.txt 2>&1)
  note "targets split_$c rc=$?"; pack
done
[ $(left $LIMIT) -gt 60 ] && (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left $((LIMIT - 25))) $PT \
  $R/tests/test_fused_fwd_sm90.py $R/tests/test_dora_sm90.py -k "not split_variant" > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
cat > /tmp/san.py <<'PY'
import torch, lora_kernels
from lora_kernels.backends import cuda_backend as cb
cb.set_fused_split(1); cb.set_small_m(False)
for M, K, N, r, dt in ((300, 2048, 2056, 16, torch.bfloat16), (129, 2056, 2048, 64, torch.float16),
                       (700, 2048, 3000, 40, torch.bfloat16), (1, 2048, 2048, 8, torch.bfloat16)):
    x = torch.randn(M, K, device="cuda", dtype=dt); W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5; B = torch.randn(N, r, device="cuda", dtype=dt)
    print(cb.forward_path(x, W, None, A, B, 0.0), flush=True)
    y, u = cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0)
torch.cuda.synchronize(); print("sanitize run done")
PY
[ $(left $LIMIT) -gt 20 ] && (cd /tmp && PYTHONPATH=/tmp/site timeout $(left $((LIMIT - 3))) compute-sanitizer --tool memcheck python3 /tmp/san.py \
  > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|run done" $O/s/memcheck.log >> $O/summary.txt
note "total"; pack; rm -rf $O
