#!/usr/bin/env bash
# Single device script:  bash bench/gpu_check.sh [quick|full|targets]
#   quick:   build, GPU tests, --quick benchmark (all providers), table, e2e throughput
#   full:    the whole benchmark grid and the e2e step with the loss curve and torch.compile
#   targets: build, kernel profile (bench/tools/profile_layer.py), the issue-target grid for ours-* / cuBLAS / PEFT
# Knobs: SKIP="step ...", T_<STEP>=seconds, TEST_K / BENCH_K (pytest -k of the tests / benchmarks), TEST_ARGS,
#   BENCH_EXTRA (e.g. "--shard 0/2 --rep-ms 50 --compile-mode default": one part of the full grid per device
#   call; merge the parts with bench/tools/make_table.py a.json b.json), SANITIZE=1, HOST_PROFILE=1, PROFILE=1,
#   E2E_EXTRA, PROVIDERS (targets mode).
# Each step logs to $OUT/<step>.log, continues on failure and records its rc; a summary is printed at the end.
# Results in $OUT (<= 8 files): bench.json, bench_table.md, bench_ratio.png, e2e.json, summary.txt, logs.tar.gz
# Quick mode is budgeted under 9 minutes (per-step timeouts below; override with T_<STEP>=seconds).
set -u
set -o pipefail
MODE="${1:-quick}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
declare -a NAMES RCS SECS

step() {  # step <name> <timeout_s> <command...>
  local name="$1" t="$2"; shift 2
  case " ${SKIP:-} " in *" $name "*) echo "=== [$name] skipped (SKIP)"; return 0;; esac
  local s=$(date +%s)
  echo "=== [$name] (timeout ${t}s): $*" | tee "$LOGS/$name.log"
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$LOGS/$name.log"
  local rc=$?
  echo "=== [$name] rc=$rc in $(( $(date +%s) - s ))s" | tee -a "$LOGS/$name.log"
  NAMES+=("$name"); RCS+=("$rc"); SECS+=("$(( $(date +%s) - s ))")
}

T_PROFILE=${T_PROFILE:-150}
if [ "$MODE" = "full" ]; then
  BENCH_ARGS=(); E2E_ARGS=(--compile)
  T_BUILD=${T_BUILD:-600}; T_TESTS=${T_TESTS:-600}; T_BENCH=${T_BENCH:-3600}; T_TABLE=${T_TABLE:-120}; T_E2E=${T_E2E:-900}
elif [ "$MODE" = "targets" ]; then
  BENCH_ARGS=(--targets --providers "${PROVIDERS:-ours-triton,ours-cuda,peft-layer,cublas-base}"); E2E_ARGS=()
  SKIP="${SKIP-tests e2e}"; PROFILE=${PROFILE-1}
  T_BUILD=${T_BUILD:-120}; T_BENCH=${T_BENCH:-300}; T_TABLE=${T_TABLE:-30}; T_E2E=${T_E2E:-75}
else
  BENCH_ARGS=(--quick); E2E_ARGS=()
  T_BUILD=${T_BUILD:-120}; T_TESTS=${T_TESTS:-100}; T_BENCH=${T_BENCH:-210}; T_TABLE=${T_TABLE:-30}; T_E2E=${T_E2E:-75}
fi

step env 30 bash -c 'nvidia-smi; python3 -c "
import torch, sys
print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())
for m in (\"triton\", \"peft\", \"transformers\", \"pytest_benchmark\", \"matplotlib\"):
    try: print(m, __import__(m).__version__)
    except Exception as e: print(m, \"MISSING\", e)
"; nvcc --version 2>/dev/null | tail -2'

if [ -d /tmp/site/lora_kernels ] && [ -n "${REUSE_BUILD:-}" ]; then
  echo "=== [build] reusing /tmp/site (REUSE_BUILD)"
elif [ -f bench/tools/gpu_build.sh ]; then
  step build "$T_BUILD" bash bench/tools/gpu_build.sh
else
  step build "$T_BUILD" python3 -m pip install --no-build-isolation --no-deps -e .
fi
# From here on everything runs against the installed wheel (/tmp/site), never the source tree.
REPO="$PWD"; PY=python3
if [ -d /tmp/site/lora_kernels ]; then export PYTHONPATH=/tmp/site; else export PYTHONPATH="$REPO"; fi
mkdir -p /tmp/run && cd /tmp/run
step backends 60 $PY -c "import lora_kernels as L; print(L.__file__); print('backends', L.available_backends()); print(L.backend_status())"
if [ -n "${HOST_PROFILE:-}" ]; then
  step host_profile 120 $PY "$REPO/bench/tools/host_profile.py"
  cp "$LOGS/host_profile.log" "$OUT/host_profile.txt"
fi
if [ -n "${SANITIZE:-}" ]; then  # compute-sanitizer memcheck + racecheck on a small CUDA-backend fwd+bwd
  for tool in memcheck racecheck; do
    step "san_$tool" 240 compute-sanitizer --tool "$tool" $PY "$REPO/bench/tools/sanitize_cuda.py"
    grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize run done" "$LOGS/san_$tool.log" | sed "s/^/$tool: /" >> "$OUT/sanitizer.txt"
  done
fi
if [ -n "${PROFILE:-}" ]; then
  step profile "$T_PROFILE" $PY "$REPO/bench/tools/profile_layer.py" ${PROFILE_ARGS:-}
  cp "$LOGS/profile.log" "$OUT/profile.txt"
fi
step bench "$T_BENCH" $PY -m pytest "$REPO/bench/suite/test_bench_lora.py" -q -p no:cacheprovider --benchmark-json "$OUT/bench.json" --jsonl "$OUT/bench.jsonl" "${BENCH_ARGS[@]}" ${BENCH_K:+-k "$BENCH_K"} ${BENCH_EXTRA:-}
# The JSON is written when pytest ends; the JSON-lines file row by row, so a bench step cut by its limit still
# gives a table of what it measured.
if [ -s "$OUT/bench.json" ]; then TABLE_IN="$OUT/bench.json"; else TABLE_IN="$OUT/bench.jsonl"; fi
step table "$T_TABLE" $PY "$REPO/bench/tools/make_table.py" "$TABLE_IN" --out "$OUT/"
# at most 8 files come back from $OUT: the JSON-lines copy goes into the log archive when the JSON exists
if [ -s "$OUT/bench.json" ] && [ -f "$OUT/bench.jsonl" ]; then mv "$OUT/bench.jsonl" "$LOGS/"; fi
step e2e "$T_E2E" $PY "$REPO/bench/train/e2e_train.py" --out "$OUT/e2e.json" "${E2E_ARGS[@]}" ${E2E_EXTRA:-}
# The GPU tests run last, so that a call cut short still returns the benchmark numbers.
# pytest-xdist (in the device image) spreads the tests over CPU cores: most of their time is Triton compiling.
# -v prints each test's outcome as it finishes, so a step cut by its time limit still names its failures.
XDIST=(); if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "${TEST_WORKERS:-8}"); fi
step tests "${T_TESTS:-600}" env LORA_KERNELS_TRITON_AUTOTUNE=0 $PY -m pytest -v -rfE -p no:cacheprovider "${XDIST[@]}" ${TEST_K:+-k "$TEST_K"} "$REPO/tests" ${TEST_ARGS:-}
[ -f "$LOGS/tests.log" ] && cp "$LOGS/tests.log" "$OUT/tests.log"

{
  echo "gpu_check mode=$MODE total $(( $(date +%s) - T0 ))s"
  printf '%-10s %5s %6s\n' step rc secs
  for i in "${!NAMES[@]}"; do printf '%-10s %5s %6s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}"; done
  if [ -f "$OUT/bench_table.md" ]; then echo; sed -n '/## Summary/,/## Per group/p' "$OUT/bench_table.md" | head -40; fi
  if [ -f "$OUT/e2e.json" ]; then echo; python3 -c "
import json; d = json.load(open('$OUT/e2e.json'))
for r in d.get('throughput', []): print('e2e patched=%-5s p=%-4s %9.0f tok/s  peak %s GiB' % (r['patched'], r['dropout'], r['tokens_per_s'], r['peak_mem_gib'] and round(r['peak_mem_gib'], 2)))
print('speedup', d.get('speedup'), '| loss max|diff|', d.get('loss_max_abs_diff'), '| errors', len(d.get('errors', [])))
" 2>&1; fi
} | tee "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
exit 0
