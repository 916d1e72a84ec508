#!/usr/bin/env bash
# On the GPU machine: build the lora_kernels wheel (with the CUDA extension) from a clean copy of the tracked
# files, install it into /tmp/site, print the wheel name.
# Usage: bash bench/tools/gpu_build.sh   then run with PYTHONPATH=/tmp/site from outside the source tree.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
SRC=/tmp/src; WHL=/tmp/whl; SITE=/tmp/site
rm -rf "$SRC" "$WHL"; mkdir -p "$SRC" "$WHL"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 && git -C "$REPO" ls-files --error-unmatch setup.py >/dev/null 2>&1; then
  # tracked and untracked-but-not-ignored files that exist (an index may still list a file deleted since)
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | python3 -c '
import os, shutil, sys
for f in sys.stdin.read().split("\0"):
    if f and os.path.isfile(f):
        os.makedirs(os.path.join(sys.argv[1], os.path.dirname(f)), exist_ok=True)
        shutil.copy2(f, os.path.join(sys.argv[1], f))' "$SRC")
else
  (cd "$REPO" && tar --exclude=.git --exclude='*.egg-info' --exclude=build --exclude=dist -cf - .) | tar -xf - -C "$SRC"
fi
export MAX_JOBS="${MAX_JOBS:-16}"
(cd "$SRC" && python3 -m pip wheel --no-build-isolation --no-deps -v -w "$WHL" . 2>&1 | tail -40)
WHEEL="$(ls "$WHL"/lora_kernels-*.whl)"
# Install the wheel into its own folder (not a venv: the image's python3 is itself a venv, and a nested venv
# would not see its torch); callers put /tmp/site first on PYTHONPATH and run outside the source tree.
rm -rf "$SITE"; python3 -m pip install -q --no-deps --no-compile --target "$SITE" "$WHEEL"
(cd /tmp && PYTHONPATH="$SITE" python3 -c "import lora_kernels._C, torch; print('ops:', torch.ops.lora_kernels_cuda.forward)")
echo "WHEEL=$(basename "$WHEEL")"
