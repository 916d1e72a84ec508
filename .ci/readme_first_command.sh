#!/usr/bin/env bash
# Runs the README's first command ("Fresh machine" section), exactly as written there, as a new user would: in a
# fresh venv (no torch: pip installs it), from a copy of the tracked files, with no lora_kernels variables set.
# Prints the whole output; fails when the command fails or its self-check does not report a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
line=$(awk '/^## Fresh machine/{s=1} s && /^```/{if (c) exit; c=1; next} s && c {print; exit}' README.md)
cmd=$(printf '%s' "${line%%#*}" | sed 's/[[:space:]]*$//')
[ -n "$cmd" ] || { echo "readme_first_command: no command found in README.md" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$work/src/"
${PYTHON:-python3} -m venv "$work/venv"
echo "readme_first_command: \$ $cmd   (fresh venv, $(${PYTHON:-python3} --version))"
start=$(date +%s)
set +e
(cd "$work/src" && env -u PYTHONPATH -u TRITON_INTERPRET -u LORA_KERNELS_BACKEND -u LORA_KERNELS_SKIP_CUDA_BUILD \
  bash -c ". '$work/venv/bin/activate' && $cmd") 2>&1 | tee "$work/out.log"
rc=${PIPESTATUS[0]}
set -e
echo "readme_first_command: rc=$rc after $(( $(date +%s) - start )) s"
[ "$rc" = 0 ] || exit "$rc"
if ! grep -q "^Self-check passed" "$work/out.log"; then
  echo "readme_first_command: no passing self-check in the output" >&2; exit 1
fi
