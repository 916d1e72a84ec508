#!/usr/bin/env bash
# Prints the include folder of the newest torch release the package index offers (whatever a local pip constraint
# caps installs at). Its wheel is downloaded once; only torch/include is kept, cached under
# ${LORA_KERNELS_CACHE:-~/.cache/lora_kernels}/torch-<version>. Progress goes to stderr.
set -euo pipefail
PY=${PYTHON:-python3}
CACHE=${LORA_KERNELS_CACHE:-$HOME/.cache/lora_kernels}
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
ver=$($PY -m pip index versions torch 2>/dev/null | sed -n 's/^torch (\([^)]*\))$/\1/p')
[ -n "$ver" ] || { echo "newest_torch_headers: the index lists no torch release" >&2; exit 1; }
dir="$CACHE/torch-$ver"
if [ ! -f "$dir/torch/include/ATen/ATen.h" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "newest_torch_headers: downloading the torch $ver wheel for its headers" >&2
  for try in 1 2 3; do
    if $PY -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "torch==$ver" >&2; then break; fi
    [ "$try" = 3 ] && { echo "newest_torch_headers: download of torch $ver failed" >&2; exit 1; }
    sleep 10
  done
  rm -rf "$dir.part" && mkdir -p "$dir.part"
  unzip -q "$tmp"/torch-*.whl 'torch/include/*' -d "$dir.part"
  rm -rf "$dir" && mv "$dir.part" "$dir"
fi
echo "newest_torch_headers: torch $ver headers in $dir/torch/include" >&2
echo "$dir/torch/include"
