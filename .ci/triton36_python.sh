#!/usr/bin/env bash
# Prints the path of a Python interpreter with triton 3.6, the GPU machine's version, beside this machine's newer
# triton: a venv over the system site-packages (torch and the rest come from there) with triton==3.6.0 installed in
# it. The tests that compile and launch the Triton kernels in a subprocess (tests/conftest.py TRITON_PYTHONS) run
# under both when LORA_KERNELS_TRITON_ALT_PYTHON names it: the backend's fast launch path has code for 3.6's
# launcher that 3.9 never takes.
set -euo pipefail
venv=${TMPDIR:-/tmp}/lora_kernels_triton36
if ! "$venv/bin/python" -c "import triton; assert triton.__version__.startswith('3.6.')" 2>/dev/null; then
  rm -rf "$venv"
  ${PYTHON:-python3} -m venv --system-site-packages "$venv" >&2
  "$venv/bin/python" -m pip install -q --no-deps "triton==3.6.0" >&2
fi
echo "$venv/bin/python"
