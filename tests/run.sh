#!/usr/bin/env bash
# The test command (README): installs what the tests need and runs them. On a machine without a GPU the
# Triton kernels run under TRITON_INTERPRET=1 and GPU-only tests skip; with a GPU everything runs for real.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0   # the local CPU build on machines without a GPU
fi
$PY -m pip install -q "triton>=3.6" "peft==0.21.*" "transformers>=5.17" pytest pytest-benchmark pytest-xdist
LORA_KERNELS_SKIP_CUDA_BUILD=${LORA_KERNELS_SKIP_CUDA_BUILD:-$($PY -c "import torch;print(0 if torch.cuda.is_available() else 1)")} \
  $PY -m pip install -q --no-build-isolation --no-deps -e .
if ! $PY -c "import torch,sys;sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
# one worker per core (LORA_KERNELS_TEST_WORKERS to override; 0 runs in this process)
exec $PY -m pytest -q -p no:cacheprovider -n "${LORA_KERNELS_TEST_WORKERS:-auto}" tests "$@"
