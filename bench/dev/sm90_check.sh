#!/usr/bin/env bash
# One device call for the sm_90 GEMM work: probe the GEMM through its C entry point (prebuilt library if it loads,
# else built here), then build the wheel with it, run the cuda-backend tests and a short benchmark.
# Needs the CUTLASS headers: LORA_KERNELS_CUTLASS_DIR, or the nvidia-cutlass wheel under .whl/.
# Knobs: SKIP="probe wheel tests profile bench", PROBE_ARGS, TEST_K, BENCH_K, T_<STEP>.
set -u
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
REPO="$PWD"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
skip() { case " ${SKIP:-} " in *" $1 "*) return 0;; esac; return 1; }
t0=$(date +%s)
stamp() { echo "=== [$1] at $(( $(date +%s) - t0 ))s"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ -z "${LORA_KERNELS_CUTLASS_DIR:-}" ]; then
  whl=$(ls "$REPO"/.whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e "$whl" . >/dev/null)
    export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
  fi
fi
echo "CUTLASS: ${LORA_KERNELS_CUTLASS_DIR:-none}"

if ! skip probe; then
  stamp probe
  LIB="$REPO/bench/dev/build/libloragemm_sm90.so"
  if ! python3 -c "import ctypes,sys; ctypes.CDLL(sys.argv[1])" "$LIB" 2>"$OUT/probe_load.txt"; then
    echo "prebuilt library does not load ($(cat "$OUT/probe_load.txt")); building it here"
    CUTLASS_DIR="$LORA_KERNELS_CUTLASS_DIR" bash "$REPO/bench/dev/build_gemm_capi.sh" /tmp/gemmlib && LIB=/tmp/gemmlib/libloragemm_sm90.so
  fi
  timeout "${T_PROBE:-240}" python3 "$REPO/bench/dev/gemm_sm90_probe.py" --lib "$LIB" --out "$OUT/probe.json" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/probe.txt"
fi
if ! skip wheel; then
  stamp wheel
  LORA_KERNELS_CUDA_ARCHS=90 timeout "${T_WHEEL:-420}" bash "$REPO/bench/tools/gpu_build.sh" > "$OUT/wheel.txt" 2>&1; echo "wheel rc=$?"
  tail -5 "$OUT/wheel.txt"
fi
if [ -d /tmp/site/lora_kernels ]; then
  export PYTHONPATH=/tmp/site
  cd /tmp
  python3 -c "
import torch, lora_kernels as L
print(L.backend_status())
x = torch.randn(64, 4096, device='cuda', dtype=torch.bfloat16); w = torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16)
print('gemm_path:', torch.ops.lora_kernels_cuda.gemm_path(x, w, None))"
  if ! skip tests; then
    stamp tests
    XDIST=(); python3 -c "import xdist" 2>/dev/null && XDIST=(-n 8)
    timeout "${T_TESTS:-300}" env LORA_KERNELS_TRITON_AUTOTUNE=0 python3 -m pytest -q -rfE -p no:cacheprovider "${XDIST[@]}" \
      -k "${TEST_K:-cuda}" "$REPO/tests" 2>&1 | tail -40 | tee "$OUT/tests.txt"
  fi
  if ! skip profile; then
    stamp profile
    timeout "${T_PROFILE:-120}" python3 "$REPO/bench/tools/profile_layer.py" --backends cuda \
      --shapes "${PROFILE_SHAPES:-8192x4096x4096,8192x4096x1024}" --r 16 --p "${PROFILE_P:-0}" > "$OUT/profile.txt" 2>&1
    grep -E "us/call|lora|gemm|sm90|cutlass|Kernel|device_kernel|pack|shrink" "$OUT/profile.txt" | head -40
  fi
  if ! skip bench; then
    stamp bench
    timeout "${T_BENCH:-200}" python3 -m pytest "$REPO/bench/suite/test_bench_lora.py" -q -p no:cacheprovider --targets \
      --providers "${PROVIDERS:-ours-cuda,cublas-base}" --benchmark-json "$OUT/bench.json" --rep-ms 40 --warmup-ms 10 \
      --gpu-reps 20 ${BENCH_K:+-k "$BENCH_K"} > "$OUT/bench_log.txt" 2>&1
    python3 "$REPO/bench/tools/make_table.py" "$OUT/bench.json" --out "$OUT/" > /dev/null 2>&1
    sed -n '/## Summary/,/## Per group/p' "$OUT/bench_table.md" 2>/dev/null | head -30
  fi
fi
stamp done
