#!/usr/bin/env bash
# Session 61 run 2 (carry .whl .ab_old .peers): the dA GEMM (csrc/dA_gemm_sm90.cu). Build; tests (the sm_90 GEMM's,
# the dy pass / dA pass's, DoRA's sm_90 ones: all take the dA GEMM where they run the backward at p = 0 with 16-bit
# adapters); A/Bs in alternating processes (targets fwd_bwd p = 0, bf16 adapters, M = 8192): dA GEMM (default) against
# LORA_KERNELS_DA_GEMM=0 on the four shapes x r 16/64; where dA runs beside the GEMM (r = 16), beside (default)
# against LORA_KERNELS_DA_BESIDE=0 (then the dA GEMM); bwd_gap; memcheck; the dx GEMM's 128x256 tile at ->1024.
LIMIT=${LIMIT:-575}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b $O/s; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt; cp $0 $O/run.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 280 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -80 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
PT="python3 -m pytest -q -rfE -p no:cacheprovider --tb=short -n 16"
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 150 $PT $R/tests/test_sm90_gemm.py \
  $R/tests/test_dy_pass_sm90.py $R/tests/test_dora_sm90.py -k "not triton" > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; grep -aE "^FAILED|^ERROR" $O/t/tests.log | head -30 >> $O/summary.txt; pack
T="python3 $R/bench/suite/targets.py --providers ours-cuda --adapter-dtype bfloat16 --M 8192 --p 0"
for c in d_1 0_1 d_2 0_2; do
  [ $(left $LIMIT) -gt 40 ] || break
  (cd /tmp && env LORA_KERNELS_DA_GEMM=${c%_*} PYTHONPATH=/tmp/site timeout 60 $T --r 16,64 \
    --out $O/b/g_$c.json > $O/b/g_$c.txt 2>&1)
  note "targets g_$c rc=$?"; grep -aE "^fwd_bwd" $O/b/g_$c.txt >> $O/summary.txt; pack
done
for c in d 0; do
  [ $(left $LIMIT) -gt 60 ] || break
  (cd /tmp && env LORA_KERNELS_DA_GEMM=$c PYTHONPATH=/tmp/site timeout 40 ${T/bfloat16/float32} --r 16 \
    --out $O/b/f_$c.json > $O/b/f_$c.txt 2>&1)
  note "targets f_$c (fp32 adapters) rc=$?"; grep -aE "^fwd_bwd" $O/b/f_$c.txt >> $O/summary.txt; pack
done
for c in d_1 0_1; do
  [ $(left $LIMIT) -gt 60 ] || break
  (cd /tmp && env LORA_KERNELS_DA_BESIDE=${c%_*} PYTHONPATH=/tmp/site timeout 40 $T --r 16 \
    --shapes 4096x1024,4096x14336,14336x4096 --out $O/b/b_$c.json > $O/b/b_$c.txt 2>&1)
  note "targets b_$c rc=$?"; grep -aE "^fwd_bwd" $O/b/b_$c.txt >> $O/summary.txt; pack
done
for c in d 0; do
  [ $(left $LIMIT) -gt 45 ] || break
  (cd /tmp && env LORA_KERNELS_DA_GEMM=$c PYTHONPATH=/tmp/site timeout 25 python3 $R/bench/dev/bwd_gap.py --tag "g$c" \
    --shapes 8192x4096x1024,8192x4096x4096,8192x14336x4096 --r 16,64 --p 0 --calls 10 >> $O/b/bwd_gap.txt 2>&1)
  note "bwd_gap $c rc=$?"; pack
done
cat $O/b/bwd_gap.txt >> $O/summary.txt
cat > /tmp/san.py <<'PY'
import torch, lora_kernels
from lora_kernels.backends import cuda_backend as cb
for M, K, N, r, dt in ((1000, 2056, 2048, 16, torch.bfloat16), (1028, 2048, 4096, 64, torch.float16),
                       (900, 520, 264, 8, torch.bfloat16), (8192, 4096, 1024, 64, torch.bfloat16)):
    x = torch.randn(M, K, device="cuda", dtype=dt); W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5; B = torch.randn(N, r, device="cuda", dtype=dt)
    print(cb.dA_gemm_splits(x, W, A, B, 0.0), flush=True)
    y, u = cb.forward(x, W, None, A, B, 0.5, 0.0, 1234, 5)
    cb.backward(torch.randn_like(y), x, W, A, B, u, 0.5, 0.0, 1234, 5, True, True, True)
torch.cuda.synchronize(); print("sanitize run done")
PY
[ $(left $LIMIT) -gt 40 ] && (cd /tmp && PYTHONPATH=/tmp/site timeout 35 compute-sanitizer --tool memcheck \
  python3 /tmp/san.py > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|run done" $O/s/memcheck.log >> $O/summary.txt; pack
for c in d 4; do
  [ $(left $LIMIT) -gt 30 ] || break
  (cd /tmp && env LORA_KERNELS_SM90_GEMM_CONFIG=$c PYTHONPATH=/tmp/site timeout 25 $T --r 16,64 \
    --shapes 4096x1024 --out $O/b/cfg_$c.json > $O/b/cfg_$c.txt 2>&1)
  note "targets cfg_$c rc=$?"; grep -aE "^fwd_bwd" $O/b/cfg_$c.txt >> $O/summary.txt; pack
done
note "total"; pack; rm -rf $O
