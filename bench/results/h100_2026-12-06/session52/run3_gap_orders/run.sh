#!/usr/bin/env bash
# Session 52 run 2 (carry .whl .ab_old .peers): build this tree; per-kernel device times (bench/dev/fused_gap.py) of the
# fused forward against our K-extended GEMM (mode 0) and cuBLAS, p = 0, bf16 adapters, under tile-order and tile-shape
# variants (LORA_KERNELS_FUSED_AHEAD, _STRIP, _DEBUG bits 0/6/7, LORA_KERNELS_SM90_GEMM_CONFIG); the fused forward's
# tests under the lead-ahead order.
LIMIT=${LIMIT:-540}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
[ -n "$REUSE" ] && ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1 || { rm -rf /tmp/site
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack; }
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
G="python3 $R/bench/dev/fused_gap.py --r 16,64"
SH=8192x4096x1024,2048x4096x1024,8192x4096x4096,2048x4096x4096
run_gap() {  # tag, "ENV=.. ..." (or -), shapes
  local tag=$1 ev=$2 sh=$3; [ "$ev" = - ] && ev=
  (cd /tmp && env PYTHONPATH=/tmp/site $ev timeout $(left $((LIMIT - 60))) $G --tag $tag --shapes $sh >> $O/b/gap.txt 2>&1)
  note "gap $tag rc=$?"; pack
}
run_gap base - $SH,8192x4096x14336,8192x14336x4096
run_gap d65 LORA_KERNELS_FUSED_DEBUG=65 $SH
run_gap d193 LORA_KERNELS_FUSED_DEBUG=193 $SH
for a in 4 8 17 33; do run_gap ahead$a LORA_KERNELS_FUSED_AHEAD=$a $SH; done
run_gap strip1 LORA_KERNELS_FUSED_STRIP=1 $SH
run_gap strip2 LORA_KERNELS_FUSED_STRIP=2 $SH
run_gap cfg4 LORA_KERNELS_SM90_GEMM_CONFIG=4 8192x4096x1024,2048x4096x1024
run_gap cfg1 LORA_KERNELS_SM90_GEMM_CONFIG=1 8192x4096x4096,2048x4096x4096
[ -z "$REUSE" ] && (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_AHEAD=5 LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left $((LIMIT - 5))) \
  python3 -m pytest -q -rfE -p no:cacheprovider --tb=short -n 16 $R/tests/test_fused_fwd_sm90.py > $O/t/tests_ahead5.log 2>&1)
note "tests ahead5 rc=$?"; grep -aE "passed|failed" $O/t/tests_ahead5.log | tail -3 >> $O/summary.txt; pack
note "total"; pack; rm -rf $O
