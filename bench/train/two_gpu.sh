#!/usr/bin/env bash
# Issue 18 in one command: PEFT LoRA training of the small Llama under FSDP2 and DDP on 2 GPUs (NCCL), plain PEFT
# and lora_kernels.patch_peft side by side in each launch, with the checks. README: "Distributed training".
#
#   bash bench/train/two_gpu.sh OUT_DIR            # on a 2-GPU machine (nvidia-h200-x2)
#   bash bench/train/two_gpu.sh OUT_DIR --cpu      # the same plumbing on CPU/gloo with the tiny fp32 model
#
# Launches (bench/train/fsdp_train.py --variants unpatched,patched --checks, each under its own timeout; a launch that
# fails or times out is recorded and the script goes on):
#   one_ddp_p0   1 rank (DDP on one GPU), dropout 0: the 1-GPU reference for the loss comparison
#   fsdp2_p0, fsdp2_p0.05   2 ranks, FSDP2 (fully_shard per decoder layer + root), dropout 0 and 0.05
#   ddp_p0, ddp_p0.05       2 ranks, DDP, dropout 0 and 0.05
# Writes OUT_DIR/two_gpu.json, OUT_DIR/two_gpu.md, OUT_DIR/logs.tar.gz (3 files; launch logs and JSONs in the
# archive). Prints the environment first, PASS/FAIL lines and the table last. Exit 0 iff every check passes.
#
# Knobs (environment):
#   BUILD=1 (default on GPU): build the wheel with the CUDA extension into /tmp/site (bench/tools/gpu_build.sh,
#     LORA_KERNELS_CUDA_ARCHS=90; 1.5-2 min) unless /tmp/site holds a build of these sources (or REUSE_BUILD=1);
#     the runs then use it and expect the cuda backend. BUILD=0: run the source tree (Triton backend expected).
#   EXPECT_BACKEND   the backend the patched layers must run (default: cuda with the build, triton without it,
#                    torch with --cpu)
#   BUDGET (s, whole script; default 230 GPU, 1800 CPU), T_RUN (s per launch; 90 GPU, 300 CPU), T_BUILD (150),
#   STEPS (9), WARMUP (3), MODEL_ARGS (extra fsdp_train.py args; GPU default: its defaults = 4 layers, hidden
#   2048, intermediate 5632, batch 4 x seq 1024 = 4096 tokens per step, bf16, r=16 on every linear)
set -u
set -o pipefail
OUT="${1:-${OUT:-$PWD/two_gpu_out}}"
MODE=gpu
[ "${2:-}" = "--cpu" ] && MODE=cpu
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
# NVLink multicast / NVLS off for NCCL and symmetric memory; exported, so torchrun and its ranks inherit them
# (bench/train/fsdp_train.py also sets them itself).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
STEPS=${STEPS:-9}
WARMUP=${WARMUP:-3}
if [ "$MODE" = cpu ]; then
  BUDGET=${BUDGET:-1800}; T_RUN=${T_RUN:-300}
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  COMMON=(--cpu --tiny --backend torch ${MODEL_ARGS:-})
else
  BUDGET=${BUDGET:-230}; T_RUN=${T_RUN:-90}
  COMMON=(${MODEL_ARGS:-})
fi
PY=python3
REPORT="$REPO/bench/train/two_gpu_report.py"
elapsed() { echo $(( $(date +%s) - T0 )); }

echo "=== two_gpu.sh mode=$MODE out=$OUT budget=${BUDGET}s per-launch ${T_RUN}s steps=$STEPS warmup=$WARMUP"
echo "=== repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) uncommitted path(s)"
if [ "$MODE" = gpu ]; then
  timeout 30 nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>&1 | tee "$WORK/nvidia_smi.txt"
  timeout 20 nvidia-smi topo -m >> "$WORK/nvidia_smi.txt" 2>&1
fi
timeout 60 $PY "$REPORT" env "$WORK" 2>&1 | tail -5

# ------------------------------------------------------------------------------------------- lora_kernels
# A build is reused when it was made from these sources (its marker holds their hash) or with REUSE_BUILD=1.
SRC_HASH="$(cd "$REPO" && find lora_kernels csrc -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \
  -o -name '*.cpp' \) | sort | xargs md5sum setup.py pyproject.toml 2>/dev/null | md5sum | cut -c1-16)"
USE_SITE=0
if [ "$MODE" = gpu ] && [ "${BUILD:-1}" != 0 ]; then
  if ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1 && { [ -n "${REUSE_BUILD:-}" ] || \
       [ "$(cat /tmp/site/.two_gpu_src_hash 2>/dev/null)" = "$SRC_HASH" ]; }; then
    echo "=== build: reusing /tmp/site (sources $SRC_HASH)"; USE_SITE=1
    echo "reused /tmp/site (sources $SRC_HASH)" > "$WORK/build.txt"
  else
    s=$(date +%s)
    echo "=== build (timeout ${T_BUILD:-150}s): bench/tools/gpu_build.sh"
    LORA_KERNELS_CUDA_ARCHS=${LORA_KERNELS_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      timeout --kill-after=10 "${T_BUILD:-150}" bash "$REPO/bench/tools/gpu_build.sh" > "$WORK/build.log" 2>&1
    rc=$?
    echo "=== build rc=$rc in $(( $(date +%s) - s ))s"; tail -3 "$WORK/build.log"
    echo "bench/tools/gpu_build.sh rc=$rc in $(( $(date +%s) - s )) s $(grep -a '^WHEEL=' "$WORK/build.log" | cut -c7-)" \
      > "$WORK/build.txt"
    if [ "$rc" = 0 ] && ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then
      echo "$SRC_HASH" > /tmp/site/.two_gpu_src_hash; USE_SITE=1
    else
      echo "=== build failed: running the source tree (Triton backend)"
    fi
  fi
fi
[ "$MODE" = gpu ] && [ "${BUILD:-1}" = 0 ] && echo "not built (BUILD=0): source tree" > "$WORK/build.txt"
if [ "$USE_SITE" = 1 ]; then
  export PYTHONPATH=/tmp/site; DEFAULT_EXPECT=cuda
elif [ "$MODE" = gpu ]; then
  export PYTHONPATH="$REPO"; DEFAULT_EXPECT=triton
else
  export PYTHONPATH="$REPO"; DEFAULT_EXPECT=torch
fi
EXPECT_BACKEND=${EXPECT_BACKEND:-$DEFAULT_EXPECT}
RUNDIR="$(mktemp -d)"   # run outside the source tree, so that PYTHONPATH decides which lora_kernels is imported
cd "$RUNDIR"
timeout 60 $PY "$REPORT" backends "$WORK" 2>&1 | tail -3
echo "=== expecting backend $EXPECT_BACKEND (PYTHONPATH=$PYTHONPATH)"

# ------------------------------------------------------------------------------------------------ launches
: > "$WORK/launches.tsv"
with_timeout() {  # with_timeout <seconds> <command...>: its rc, or 124 when it ran out of time
  # torchrun starts its ranks in their own sessions, so a signal to torchrun's process group misses them: on a
  # timeout, TERM torchrun (it stops its ranks), then KILL it and the ranks it had, by process id.
  local t="$1"; shift
  "$@" &
  local pid=$! end=$(( SECONDS + t ))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$end" ]; then
      local kids; kids="$(pgrep -P "$pid" 2>/dev/null || ps -o pid= --ppid "$pid" 2>/dev/null)"
      kill -TERM "$pid" 2>/dev/null
      for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL "$pid" 2>/dev/null
      for k in $kids; do kill -KILL -- "-$k" "$k" 2>/dev/null; done   # each rank leads its own process group
      wait "$pid" 2>/dev/null
      return 124
    fi
    sleep 0.5
  done
  wait "$pid"
}
launch() {  # launch <name> <nproc> <fsdp_train.py args...>
  local name="$1" nproc="$2"; shift 2
  local left=$(( BUDGET - $(elapsed) - 15 ))   # 15 s kept for the report
  local t=$(( left < T_RUN ? left : T_RUN ))
  if [ "$left" -lt 20 ]; then
    echo "=== [$name] skipped: ${left}s left of the ${BUDGET}s budget"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$nproc" -1 0 "skipped (budget)" >> "$WORK/launches.tsv"
    return
  fi
  local s=$(date +%s)
  echo "=== [$name] $nproc rank(s), timeout ${t}s: fsdp_train.py $*"
  with_timeout "$t" $PY -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
    "$REPO/bench/train/fsdp_train.py" --variants unpatched,patched --checks --expect-backend "$EXPECT_BACKEND" \
    --steps "$STEPS" --warmup "$WARMUP" ${COMMON[@]+"${COMMON[@]}"} "$@" --out "$WORK/$name.json" \
    > "$WORK/$name.log" 2>&1
  local rc=$? secs=$(( $(date +%s) - s ))
  grep -a "^\[fsdp\]" "$WORK/$name.log" | sed 's/; checks {.*//' | cut -c1-220   # verdicts: in the report
  if [ "$rc" != 0 ]; then echo "--- [$name] last lines of its log:"; tail -15 "$WORK/$name.log" | cut -c1-300; fi
  echo "=== [$name] rc=$rc in ${secs}s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$nproc" "$rc" "$secs" ran >> "$WORK/launches.tsv"
}
# In order of importance: if the budget runs out, the last ones are skipped (and recorded as such).
launch one_ddp_p0 1 --ddp --dropout 0
launch fsdp2_p0 2 --dropout 0
launch fsdp2_p0.05 2 --dropout 0.05
launch ddp_p0 2 --ddp --dropout 0
launch ddp_p0.05 2 --ddp --dropout 0.05

# ------------------------------------------------------------------------------------------------- report
$PY "$REPORT" report "$WORK" "$OUT" --expect-backend "$EXPECT_BACKEND" --mode "$MODE" --total-s "$(elapsed)"
RC=$?
tar -czf "$OUT/logs.tar.gz" -C "$WORK" . && rm -rf "$WORK" "$RUNDIR"
echo "=== two_gpu.sh done in $(elapsed)s, rc=$RC; files: $(ls "$OUT" | tr '\n' ' ')"
exit $RC
