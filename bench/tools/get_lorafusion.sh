#!/usr/bin/env bash
# Put the files of LoRAFusion (CentML/lorafusion, commit c48d7fd) that the "lorafusion" benchmark provider needs
# into a git-ignored folder (default <repo>/.peers/lorafusion). LoRAFusion's code is never committed here.
#
#   bench/tools/get_lorafusion.sh SRC [DEST]
#
# SRC: a LoRAFusion checkout (a folder with lorafusion/ops/lora_v1.py), or a tar(.gz) made by `git archive` of
#      commit c48d7fd (with or without a --prefix), e.g.
#        git -C lorafusion archive -o /tmp/lorafusion.tar c48d7fd lorafusion
# DEST: defaults to $LORAFUSION_DIR, else <repo>/.peers/lorafusion (what bench/suite/peer_lorafusion.py looks for).
#
# Only the lorafusion/ package files that lorafusion.ops.lora_v1 imports are copied (no tests, benchmarks,
# training, solver or pipeline code): about 180 KB.
set -euo pipefail
WANT_COMMIT=c48d7fd
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(git -C "$here" rev-parse --show-toplevel 2>/dev/null || (cd "$here/../.." && pwd))"
src="${1:?usage: $0 SRC [DEST]   (SRC: LoRAFusion checkout or git-archive tar of commit $WANT_COMMIT)}"
dest="${2:-${LORAFUSION_DIR:-$repo/.peers/lorafusion}}"

FILES="
lorafusion/__init__.py
lorafusion/ops/__init__.py
lorafusion/ops/lora_v1.py
lorafusion/ops/lora_torch_ref.py
lorafusion/ops/triton_ops/__init__.py
lorafusion/ops/triton_ops/config.py
lorafusion/ops/triton_ops/utils.py
lorafusion/ops/triton_ops/dropout.py
lorafusion/ops/triton_ops/fused_dropout_matmul.py
lorafusion/ops/triton_ops/fused_lora_xw_sb.py
lorafusion/ops/triton_ops/fused_lora_dys_dyb.py
lorafusion/ops/triton_ops/fused_lora_dyw_dsa.py
lorafusion/ops/triton_ops/tma_utils.py
lorafusion/ops/triton_ops/fused_lora_xw_sb_tma.py
lorafusion/ops/triton_ops/fused_lora_dyw_dsa_tma.py
lorafusion/utils/__init__.py
lorafusion/utils/common.py
lorafusion/utils/benchmark.py
lorafusion/utils/testing.py
lorafusion/utils/pytree.py
"

tmp=""
cleanup() { [ -n "$tmp" ] && rm -rf "$tmp"; return 0; }
trap cleanup EXIT

commit="unknown"
if [ -d "$src" ]; then
  root="$(cd "$src" && pwd)"
  commit=unknown
  if [ "$(git -C "$root" rev-parse --show-toplevel 2>/dev/null)" = "$root" ]; then
    commit="$(git -C "$root" rev-parse HEAD)"
  fi
elif [ -f "$src" ]; then
  tmp="$(mktemp -d)"
  tar -xf "$src" -C "$tmp"
  lv1="$(find "$tmp" -path '*/lorafusion/ops/lora_v1.py' | head -n 1)"
  [ -n "$lv1" ] || { echo "error: no lorafusion/ops/lora_v1.py in $src" >&2; exit 1; }
  root="${lv1%/lorafusion/ops/lora_v1.py}"
  # git archive stores the commit id in a pax header (plain or gzipped tar)
  commit="$(set +o pipefail; { gzip -dc "$src" 2>/dev/null || cat "$src"; } | git get-tar-commit-id 2>/dev/null)" || true
  commit="${commit:-unknown}"
else
  echo "error: $src is neither a folder nor a file" >&2; exit 1
fi
[ -f "$root/lorafusion/ops/lora_v1.py" ] || { echo "error: no lorafusion/ops/lora_v1.py under $root" >&2; exit 1; }
case "$commit" in
  "$WANT_COMMIT"*) ;;
  *) echo "warning: LoRAFusion commit is '$commit', the provider was written against $WANT_COMMIT" >&2 ;;
esac

rm -rf "$dest/lorafusion"
mkdir -p "$dest"
for f in $FILES; do
  [ -f "$root/$f" ] || { echo "error: $root/$f missing" >&2; exit 1; }
  mkdir -p "$dest/$(dirname "$f")"
  cp "$root/$f" "$dest/$f"
done
printf 'CentML/lorafusion commit %s, copied by bench/tools/get_lorafusion.sh from %s\n' "$commit" "$src" > "$dest/SOURCE.txt"
echo "LoRAFusion ($commit) -> $dest ($(du -sk --apparent-size "$dest" | cut -f1) KB)"
