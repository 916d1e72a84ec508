#!/usr/bin/env bash
# Session 60 run 3 (carry .whl .ab_old .peers): dA's K-tiles after D's, the padding-tile guard, the unrolled reduce.
# Build; the sm_90 GEMM tests (dA's included) and the split variant's path and graph tests; A/Bs in alternating
# processes: targets at p = 0 (4096->1024, 4096->4096, r 16 / 64) with dA in the GEMM by default / off, twice;
# bwd_gap by default, dA off, trim off; p = 0.1 with dA in the masked GEMM (=1) / default; memcheck; the grid.
LIMIT=${LIMIT:-500}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b $O/s; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt; cp $0 $O/run.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 280 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -80 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
PT="python3 -m pytest -q -rfE -p no:cacheprovider --tb=short -n 16"
F=$R/tests/test_fused_fwd_sm90.py
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 90 $PT $R/tests/test_sm90_gemm.py \
  "$F::test_split_variant_where_it_runs" "$F::test_split_variant_on_two_streams_and_in_a_graph" \
  "$F::test_split_variant_dropout_device_seed_grads_and_determinism" "$F::test_benchmarked_shapes_take_the_default_path" \
  "$F::test_fused_forward_dropout_paths" > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; grep -aE "^FAILED|^ERROR" $O/t/tests.log | head -20 >> $O/summary.txt; pack
T="python3 $R/bench/suite/targets.py --providers ours-cuda --adapter-dtype bfloat16 --M 8192"
for i in 1 2; do for c in d 0; do
  [ $(left $LIMIT) -gt 60 ] || break 2
  (cd /tmp && env LORA_KERNELS_DA_IN_GEMM=${c/d/} PYTHONPATH=/tmp/site timeout 40 $T --p 0 --r 16,64 \
    --shapes 4096x1024,4096x4096 --out $O/b/dA_${c}_$i.json > $O/b/dA_${c}_$i.txt 2>&1)
  note "targets dA_${c}_$i rc=$?"; grep -aE "^fwd_bwd" $O/b/dA_${c}_$i.txt >> $O/summary.txt; pack
done; done
for c in d dA0 trim0; do
  [ $(left $LIMIT) -gt 45 ] || break
  E=; [ $c = dA0 ] && E=LORA_KERNELS_DA_IN_GEMM=0; [ $c = trim0 ] && E=LORA_KERNELS_SM90_GEMM_TRIM=0
  (cd /tmp && env $E PYTHONPATH=/tmp/site timeout 25 python3 $R/bench/dev/bwd_gap.py --tag "$c" \
    --shapes 8192x4096x1024,8192x4096x4096 --r 16,64 --p 0 --calls 10 2>/dev/null >> $O/b/bwd_gap.txt)
  note "bwd_gap $c rc=$?"; pack
done
for c in d 1; do
  [ $(left $LIMIT) -gt 45 ] || break
  (cd /tmp && env LORA_KERNELS_DA_IN_GEMM=${c/d/} PYTHONPATH=/tmp/site timeout 40 $T --p 0.1 --r 16 \
    --shapes 4096x1024,4096x4096 --out $O/b/pdA_$c.json > $O/b/pdA_$c.txt 2>&1)
  note "targets pdA_$c rc=$?"; grep -aE "^fwd_bwd" $O/b/pdA_$c.txt >> $O/summary.txt; pack
done
cat > /tmp/san.py <<'PY'
import torch, lora_kernels
from lora_kernels.backends import cuda_backend as cb
cb.set_small_m(False); cb.set_dA_in_gemm(1)
for M, K, N, r, p in ((1400, 520, 2104, 1, 0.0), (300, 200, 136, 7, 0.0), (1000, 2056, 2048, 40, 0.0),
                      (129, 1032, 4096, 24, 0.0), (300, 384, 136, 7, 0.1), (1000, 2048, 2056, 16, 0.05)):
    dt = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt); W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    A = torch.randn(r, K, device="cuda", dtype=dt) * K ** -0.5; B = torch.randn(N, r, device="cuda", dtype=dt)
    print(cb.forward_path(x, W, None, A, B, p), cb.dx_path(x, W, A, B, p), flush=True)
    y, u = cb.forward(x, W, None, A, B, 0.5, p, 1234, 5)
    cb.backward(torch.randn_like(y), x, W, A, B, u, 0.5, p, 1234, 5, True, True, True)
torch.cuda.synchronize(); print("sanitize run done")
PY
[ $(left $LIMIT) -gt 30 ] && (cd /tmp && PYTHONPATH=/tmp/site timeout 25 compute-sanitizer --tool memcheck \
  python3 /tmp/san.py > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|run done" $O/s/memcheck.log >> $O/summary.txt; pack
[ $(left $LIMIT) -gt 90 ] && (cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left $((LIMIT - 5))) \
  python3 $R/bench/suite/targets.py --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --M 8192 --p 0,0.1 --r 16,64 \
  --out $O/b/targets.json > $O/b/targets.txt 2>&1); note "targets rc=$?"; sed -n '/^| mode/,$p' $O/b/targets.txt >> $O/summary.txt
note "total"; pack; rm -rf $O
