#!/usr/bin/env bash
# Session 57 run 2 (carry .whl .ab_old): build; the small-M tests (the Hopper backward, fp32 adapters opt-in) and the
# graph / sync tests; A/B of the small-M backward (new / passes) and of fp32 adapters on the Hopper kernels (opt-in /
# mma.sync and passes); host time at M = 16; Nsight Compute of the small-M kernels at M = 64; memcheck, racecheck.
LIMIT=${LIMIT:-560}
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
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout ${T_TESTS:-200} python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_small_m.py $R/tests/test_cuda_dora_ops.py $R/tests/test_device_seed.py \
  "$R/tests/test_sm90_gemm.py::test_benchmarked_shapes_take_the_sm90_dx_path" $R/tests/test_gpu_graphs.py \
  $R/tests/test_peft_patch.py $R/tests/test_contract.py $R/tests/test_module.py -k "not triton" > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack
SM="--providers ours-cuda,linear-autograd --M 1,16,64 --shapes 4096x4096,4096x14336 --r 16 --p 0 --rounds 11 --gpu-batch 20 --calls 20"
for c in d o f32 f0; do
  [ $(left $LIMIT) -gt 120 ] || break
  case $c in
    d) E="LORA_KERNELS_SMALL_M_SM90_DX=1"; A="--adapter-dtype bfloat16 --modes fwd_bwd";;
    o) E="LORA_KERNELS_SMALL_M_SM90_DX=0"; A="--adapter-dtype bfloat16 --modes fwd_bwd";;
    f32) E="LORA_KERNELS_SMALL_M_SM90_FP32=1"; A="--adapter-dtype float32 --modes fwd,fwd_bwd";;
    f0) E="LORA_KERNELS_SMALL_M_SM90_FP32=0"; A="--adapter-dtype float32 --modes fwd,fwd_bwd";;
  esac
  (cd /tmp && env $E PYTHONPATH=/tmp/site timeout 70 python3 $R/bench/suite/targets.py $SM $A --out $O/b/sm_$c.json \
    >> $O/b/sm_$c.txt 2>&1)
  note "small_m $c rc=$?"; pack
done
for c in h1 h0; do  # host time at M = 16 (fp32 adapters, the benchmark's): the opt-in kernels / the passes
  [ $(left $LIMIT) -gt 110 ] || break
  [ $c = h1 ] && E="LORA_KERNELS_SMALL_M_SM90_FP32=1" || E="LORA_KERNELS_SMALL_M_SM90_FP32=0"
  (cd /tmp && env $E PYTHONPATH=/tmp/site timeout 50 python3 $R/bench/tools/host_time.py --ms 16 --ps 0 --backends cuda \
    --out $O/b/host_$c.json > $O/b/host_$c.txt 2>&1); note "host $c rc=$?"; pack
done
[ $(left $LIMIT) -gt 90 ] && (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SMALL_M_SM90_FP32=1 timeout 60 compute-sanitizer --tool memcheck python3 $R/bench/tools/sanitize_cuda.py \
  > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|sanitize run done" $O/s/memcheck.log >> $O/summary.txt; pack
cat > /tmp/rc.py <<'PY'
import torch, lora_kernels
from lora_kernels.backends import cuda_backend as cb
for M, K, N, r, dt, at in ((16, 4096, 4096, 16, torch.bfloat16, torch.bfloat16), (33, 1000, 296, 8, torch.float16, torch.float16),
                           (48, 136, 200, 24, torch.bfloat16, torch.bfloat16), (64, 1024, 4096, 64, torch.bfloat16, torch.bfloat16),
                           (16, 4096, 4096, 16, torch.bfloat16, torch.float32), (64, 520, 304, 16, torch.bfloat16, torch.float32)):
    x = torch.randn(M, K, device="cuda", dtype=dt); W = torch.randn(N, K, device="cuda", dtype=dt)
    A = torch.randn(r, K, device="cuda", dtype=at); B = torch.randn(N, r, device="cuda", dtype=at)
    print(cb.forward_path(x, W, None, A, B, 0.0), cb.dx_path(x, W, A, B, 0.0))
    y, u = cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0)
    cb.backward(torch.randn_like(y), x, W, A, B, u, 0.5, 0.0, 0, 0, True, True, True)
torch.cuda.synchronize(); print("racecheck run done")
PY
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SMALL_M_SM90_FP32=1 timeout $(left $((LIMIT - 5))) compute-sanitizer --tool racecheck python3 /tmp/rc.py \
  > $O/s/racecheck.log 2>&1); note "racecheck rc=$?"; grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|run done|small_m" $O/s/racecheck.log >> $O/summary.txt
cat > /tmp/ncu_sm.py <<'PY'
import torch, lora_kernels
from lora_kernels.backends import cuda_backend as cb
cases = []
for at in (torch.bfloat16, torch.float32):
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16); W = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    A = torch.randn(16, 4096, device="cuda", dtype=at) * 0.02; B = torch.randn(4096, 16, device="cuda", dtype=at)
    dy = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    cases.append((x, W, A, B, dy))
def run(c):
    x, W, A, B, dy = c
    y, u = cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0)
    cb.backward(dy, x, W, A, B, u, 0.5, 0.0, 0, 0, True, True, True)
for c in cases:
    for _ in range(3): run(c)
torch.cuda.synchronize(); torch.cuda.profiler.start()
for c in cases: run(c)
torch.cuda.synchronize(); torch.cuda.profiler.stop(); print("ncu run done")
PY
[ $(left $LIMIT) -gt 60 ] && (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_SMALL_M_SM90_FP32=1 timeout $(left $((LIMIT - 5))) ncu --clock-control none \
  --profile-from-start off --kernel-name regex:'small_m' --section SpeedOfLight --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section LaunchStats python3 /tmp/ncu_sm.py > $O/s/ncu_m64.txt 2>&1); note "ncu rc=$?"
note "total"; pack; rm -rf $O
