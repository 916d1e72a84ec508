#!/usr/bin/env bash
# Session 58 run 1 (carry .whl .ab_old): build; the split variant's tests, then the fused forward's file and the
# small-M test expectations fixed after session 57; fused_gap.py A/B of the split variant (LORA_KERNELS_FUSED_SPLIT
# 1 / 0, twice, 8192x4096->1024 and ->4096, r = 16, 32, 64); the targets grid at M = 8192, p = 0 (bf16 adapters)
# default / split off; memcheck and racecheck of split cases.
LIMIT=${LIMIT:-565}
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
  LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
  note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
else
  note "build reused"
fi
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -80 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
PT="python3 -m pytest -q -rfE -p no:cacheprovider --tb=short -n 16"
(cd /tmp && PYTHONPATH=/tmp/site timeout 100 $PT $R/tests/test_fused_fwd_sm90.py -k split_variant > $O/t/tests_split.log 2>&1)
note "split tests rc=$?"; grep -aE "passed|failed" $O/t/tests_split.log | tail -3 >> $O/summary.txt; pack
G="python3 $R/bench/dev/fused_gap.py --modes 2 --r 16,32,64 --shapes 8192x4096x1024,8192x4096x4096"
for c in 1 0 1 0; do
  [ $(left $LIMIT) -gt 260 ] || break
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_SPLIT=$c timeout 60 $G --tag split$c >> $O/b/gap.txt 2>&1); note "gap split$c rc=$?"; pack
done
for d in 64 2048; do  # the split variant without u's products / without the exchange (timing only)
  [ $(left $LIMIT) -gt 240 ] || break
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_SPLIT=1 LORA_KERNELS_FUSED_DEBUG=$d timeout 60 $G --tag split1d$d >> $O/b/gap.txt 2>&1)
  note "gap split1 debug $d rc=$?"; pack
done
for c in d 0; do
  [ $(left $LIMIT) -gt 130 ] || break
  [ $c = d ] && E="LORA_KERNELS_FUSED_SPLIT=" || E="LORA_KERNELS_FUSED_SPLIT=0"
  (cd /tmp && env $E PYTHONPATH=/tmp/site timeout 90 python3 $R/bench/suite/targets.py --providers ours-cuda \
    --adapter-dtype bfloat16 --M 8192 --p 0 --r 16,64 --out $O/b/targets_split_$c.json > $O/b/targets_split_$c.txt 2>&1)
  note "targets split_$c rc=$?"; pack
done
[ $(left $LIMIT) -gt 100 ] && (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left $((LIMIT - 60))) $PT $R/tests/test_fused_fwd_sm90.py \
  $R/tests/test_small_m.py $R/tests/test_cuda_dora_ops.py "$R/tests/test_sm90_gemm.py::test_benchmarked_shapes_take_the_sm90_dx_path" \
  -k "not split_variant" > $O/t/tests.log 2>&1)
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
[ $(left $LIMIT) -gt 50 ] && (cd /tmp && PYTHONPATH=/tmp/site timeout 60 compute-sanitizer --tool memcheck python3 /tmp/san.py \
  > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|run done" $O/s/memcheck.log >> $O/summary.txt; pack
[ $(left $LIMIT) -gt 40 ] && (cd /tmp && PYTHONPATH=/tmp/site timeout $(left $((LIMIT - 5))) compute-sanitizer --tool racecheck python3 /tmp/san.py \
  > $O/s/racecheck.log 2>&1); note "racecheck rc=$?"; grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|run done" $O/s/racecheck.log >> $O/summary.txt
note "total"; pack; rm -rf $O
