#!/usr/bin/env bash
# Session 56 run 3 (carry .whl .ab_old .peers): build; the small-M tests and the DoRA / device-seed suites; the small-M
# cells (16-bit adapters): the default (BN = 64 or 128), BN = 128 forced (run 2), the mma.sync kernel; memcheck, racecheck; fwd+bwd.
LIMIT=${LIMIT:-320}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b $O/s; S=$(date +%s)
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
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 100 python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_small_m.py $R/tests/test_cuda_dora_ops.py $R/tests/test_device_seed.py > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
SM="--providers ours-cuda,linear-autograd --M 1,16,64 --shapes 4096x4096,4096x14336 --r 16 --p 0 --rounds 11 --gpu-batch 20 --calls 20 --adapter-dtype bfloat16 --modes fwd"
for c in d 0 b d; do
  [ $(left $LIMIT) -gt 60 ] || break
  if [ $c = d ]; then E=""; elif [ $c = 0 ]; then E="LORA_KERNELS_SMALL_M_SM90=0"; else E="LORA_KERNELS_SMALL_M_SM90_BN=128"; fi
  (cd /tmp && env $E PYTHONPATH=/tmp/site timeout 50 python3 $R/bench/suite/targets.py $SM --out $O/b/sm_$c.json \
    >> $O/b/sm_$c.txt 2>&1)
  note "small_m $c rc=$?"; pack
done
[ $(left $LIMIT) -gt 400 ] && (cd /tmp && PYTHONPATH=/tmp/site timeout 40 python3 $R/bench/suite/targets.py --providers ours-cuda,linear-autograd \
  --M 1,16,64 --shapes 4096x4096,4096x14336 --r 16 --p 0 --rounds 11 --gpu-batch 20 --calls 20 --adapter-dtype bfloat16 \
  --modes fwd_bwd --out $O/b/sm_fwd_bwd.json > $O/b/sm_fwd_bwd.txt 2>&1); note "fwd_bwd rc=$?"; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 40 compute-sanitizer --tool memcheck python3 $R/bench/tools/sanitize_cuda.py \
  > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|sanitize run done" $O/s/memcheck.log >> $O/summary.txt; pack
cat > /tmp/rc.py <<'PY'
import torch, lora_kernels
from lora_kernels.backends import cuda_backend as cb
for M, K, N, r, dt in ((16, 4096, 4096, 16, torch.bfloat16), (33, 1000, 300, 8, torch.float16), (48, 136, 200, 24, torch.bfloat16), (64, 4096, 1024, 64, torch.bfloat16)):
    x = torch.randn(M, K, device="cuda", dtype=dt); W = torch.randn(N, K, device="cuda", dtype=dt)
    A = torch.randn(r, K, device="cuda", dtype=dt); B = torch.randn(N, r, device="cuda", dtype=dt)
    print(cb.forward_path(x, W, None, A, B, 0.0)); cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0)
torch.cuda.synchronize(); print("racecheck run done")
PY
(cd /tmp && PYTHONPATH=/tmp/site timeout $(left $((LIMIT - 5))) compute-sanitizer --tool racecheck python3 /tmp/rc.py \
  > $O/s/racecheck.log 2>&1); note "racecheck rc=$?"; grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|run done" $O/s/racecheck.log >> $O/summary.txt
note "total"; pack; rm -rf $O
