#!/usr/bin/env bash
# One device call of named steps against the installed wheel:  STEPS="build tests two_gpu" bash bench/tools/gpu_session.sh
#   build     wheel with the CUDA extension (bench/tools/gpu_build.sh, sm_90a, CUTLASS from LORA_KERNELS_CUTLASS_DIR or the
#             nvidia-cutlass wheel under .whl/) into /tmp/site; skipped when REUSE_BUILD=1 and /tmp/site exists, built
#             from this tree's sources
#   tests     the whole GPU suite (pytest-xdist), outcomes in tests.log
#   two_gpu   bench/train/two_gpu.sh (FSDP2 and DDP on 2 GPUs, patched vs PEFT), reusing the build
#   targets   bench/suite/targets.py: the GEMM issue's grid, round-robin with the floor (ours-cuda, LoRAFusion if .peers/)
#   env_ab    bench/dev/env_ab.py: the targets grid (ENV_AB_ARGS) in processes without and with one setting (ENV_AB,
#             NAME=VALUE, e.g. a development switch) in turn, ENV_AB_REPEATS per side: B / A per cell
#   host      bench/tools/host_time.py: host microseconds per call
#   dora      the DoRA grid of bench/suite/test_bench_lora.py (--dora), with its table
#   fused     tests/test_fused_fwd_sm90.py, then bench/dev/fused_ab.py: the fused forward's modes round-robin with the
#             floor on the four Llama-3-8B shapes at 8192 tokens (modes 0,1,2 at p = 0, r = 16,32,64; modes 0,1 at
#             p = 0.1, r = 16,64; FUSED_AB_ARGS adds arguments to both)
#   sanitize  compute-sanitizer memcheck on a small cuda-backend fwd+bwd (bench/tools/sanitize_cuda.py)
#   e2e       bench/train/e2e_train.py on a 2-layer Llama of Llama-3-8B layer shapes, 8192 tokens a step, per backend
#             (E2E_BACKENDS, default "cuda triton"), PEFT unpatched alongside, dropout 0 and 0.05
#   small_m   bench/suite/targets.py at M = 1, 16, 64 (4096->4096, 4096->14336; r = 16, p = 0), with linear-autograd
#             (SMALL_M_ARGS adds arguments, e.g. "--p 0,0.1")
#   profile   bench/tools/profile_layer.py: per-kernel GPU time and host time of one layer (PROFILE_ARGS)
#   timeline  bench/dev/timeline.py: the kernels of one call and the GPU's idle time between them, floor alongside
#             (TIMELINE_ARGS)
#   bwd_gap   bench/dev/bwd_gap.py: each kernel's device time in the backward op against dy @ W (BWD_GAP_ARGS), once
#             without and once with BWD_GAP_ENV (NAME=VALUE, a development switch read once) where it is set
#   host_trace bench/dev/host_trace.py: torch.profiler CPU events of small calls (ATen ops, CUDA runtime calls)
#   ncu       Nsight Compute on the lora_ kernels of one cuda fwd+bwd (bench/dev/ncu_passes.py, NCU_ARGS)
#   probe_bg  starts building the sm_90 GEMM's development library (bench/dev/build_gemm_capi.sh, PROBE_DTYPES default
#             "0" = bf16, PROBE_CONFIGS default the six production configs; 6 adds the probe's stream-K one) in the
#             background, into /tmp/probe_build, so that it compiles alongside the wheel's build
#   gemm_probe bench/dev/gemm_sm90_probe.py on that library (built here when probe_bg did not start it; PROBE_ARGS,
#             e.g. "--regime burst"): each GEMM config against cuBLAS
#   triton_gemm bench/dev/triton_gemm_probe.py: Triton main loops (plain, TMA persistent, warp-specialised) against
#             cuBLAS on y = x Wᵀ, the four Llama shapes at M = 2048 and 8192, bf16 and fp16 (TRITON_GEMM_ARGS)
#   stream    bench/dev/stream_bench.sh: the sm_90 streaming passes (dy pass, dA, shrink) timed without torch against a
#             plain read, with a side-operand plan beside the production one where they differ (no wheel needed)
#   save      /tmp/site as $OUT/site.tgz; a later call that carries it as .site/site.tgz reuses the build (build step
#             with REUSE_BUILD=1 unpacks it when it was built from this tree's sources, else builds; OVERLAY_PY=1
#             asks only the compiled sources (csrc/, setup.py) to match and copies this tree's Python files over it)
# Knobs: T_<STEP> (seconds), TEST_FILES (paths in place of tests/), TEST_ARGS, TARGETS_ARGS, DORA_ARGS, PROFILE_ARGS, NCU_ARGS. Files in $OUT (at most 8
# come back: past 7 they are packed into results.tgz at the end). The whole GPU suite needs about 280 s on 16 workers:
# give it a call of its own (T_TESTS=420) with a carried build.
set -u
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
REPO="$PWD"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
note() { echo "$*" | tee -a "$SUMMARY"; }
run_step() {  # run_step <name> <timeout> <command...>
  local name="$1" t="$2"; shift 2
  local s=$(date +%s)
  echo "=== [$name] (limit ${t}s) at $((s - T0))s"
  timeout --kill-after=10 "$t" "$@"
  local rc=$?
  note "step $name rc=$rc in $(( $(date +%s) - s ))s"
  return $rc
}

nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee -a "$SUMMARY"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$SUMMARY"
if [ -z "${LORA_KERNELS_CUTLASS_DIR:-}" ] && ls "$REPO"/.whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e "$(ls "$REPO"/.whl/nvidia_cutlass-*.whl | head -1)" .)
  export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
fi

# sha256 (16 hex digits) of the sources a build comes from: everything the wheel holds, or ("compiled") only what
# nvcc and the C++ compiler see
src_hash() {
  local dirs="csrc setup.py pyproject.toml build_backend"
  [ "${1:-}" = compiled ] || dirs="$dirs lora_kernels"
  (cd "$REPO" && find $dirs -type f ! -name _build_info.py ! -name '*.pyc' 2>/dev/null | LC_ALL=C sort |
    xargs sha256sum | sha256sum | cut -c1-16)
}

for step in ${STEPS:-build tests}; do
  case "$step" in
    build)
      # A build records the hashes of the sources it came from (src_hash), and only a build of this tree's sources is
      # reused (with OVERLAY_PY, of its compiled sources): a warm machine's /tmp/site, else the carried
      # .site/site.tgz; anything else is rebuilt (a stale carried archive once timed a discarded default).
      if [ -n "${REUSE_BUILD:-}" ]; then
        want=$(src_hash "${OVERLAY_PY:+compiled}"); tag=.lk_src_${OVERLAY_PY:+compiled}
        if [ "$(cat /tmp/site/$tag 2>/dev/null)" != "$want" ] && [ -f "$REPO/.site/site.tgz" ]; then
          rm -rf /tmp/site && tar -xzf "$REPO/.site/site.tgz" -C /tmp &&
            note "step build: unpacked the carried .site/site.tgz ($(sha256sum "$REPO/.site/site.tgz" | cut -c1-16))"
        fi
        have=$(cat /tmp/site/$tag 2>/dev/null)
        if [ -d /tmp/site/lora_kernels ] && [ "$have" = "$want" ]; then
          if [ -n "${OVERLAY_PY:-}" ]; then  # compiled sources unchanged: this tree's Python files over the build
            (cd "$REPO" && find lora_kernels -name '*.py' ! -name _build_info.py -exec cp --parents {} /tmp/site/ \;)
            note "step build: Python files of this tree copied over the build"
          fi
          note "step build: reusing /tmp/site (sources $want)"; continue
        fi
        note "step build: no build of this tree's sources to reuse (${have:-none} != $want): building"
      fi
      LORA_KERNELS_CUDA_ARCHS=90 run_step build "${T_BUILD:-300}" bash "$REPO/bench/tools/gpu_build.sh" > "$OUT/build.log" 2>&1
      if [ -d /tmp/site/lora_kernels ]; then src_hash > /tmp/site/.lk_src_; src_hash compiled > /tmp/site/.lk_src_compiled; fi
      tail -3 "$OUT/build.log";;
    tests)
      XDIST=(); python3 -c "import xdist" 2>/dev/null && XDIST=(-n "${TEST_WORKERS:-16}")
      (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 run_step tests "${T_TESTS:-420}" \
        python3 -m pytest -v -rfE -p no:cacheprovider "${XDIST[@]}" ${TEST_FILES:-"$REPO/tests"} ${TEST_ARGS:-} \
        > "$OUT/tests.log" 2>&1)
      # per-test outcomes, also when the limit cut pytest before its summary
      grep -aoE "(PASSED|FAILED|ERROR|SKIPPED) \S+::\S+" "$OUT/tests.log" | sort > "$OUT/tests_outcomes.txt"
      grep -aE "^(FAILED|ERROR) |\] (FAILED|ERROR) " "$OUT/tests.log" | head -30
      # pytest's closing line ("N passed, ..."; the log ends with run_step's own note, so not its last line)
      grep -aE "^=+ .*[0-9]+ (passed|failed|error)" "$OUT/tests.log" | tail -1 | tee -a "$SUMMARY";;
    two_gpu)
      # two_gpu.sh has a STEPS knob of its own (training steps): this script's list must not reach it
      REUSE_BUILD=1 run_step two_gpu "${T_TWO_GPU:-240}" env -u STEPS bash "$REPO/bench/train/two_gpu.sh" "$OUT" \
        > "$OUT/two_gpu.log" 2>&1
      tail -25 "$OUT/two_gpu.log";;
    targets)
      (cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR="$REPO/.peers/lorafusion" run_step targets "${T_TARGETS:-300}" \
        python3 "$REPO/bench/suite/targets.py" --out "$OUT/targets.json" ${TARGETS_ARGS:-} > "$OUT/targets.txt" 2>&1)
      sed -n '/^| mode/,$p' "$OUT/targets.txt";;
    env_ab)
      mkdir -p "$OUT/env_ab"
      (cd /tmp && PYTHONPATH=/tmp/site run_step env_ab "${T_ENV_AB:-300}" python3 "$REPO/bench/dev/env_ab.py" \
        --env "${ENV_AB:?ENV_AB=NAME=VALUE}" --repeats "${ENV_AB_REPEATS:-2}" --workdir "$OUT/env_ab" \
        --out "$OUT/env_ab.json" -- ${ENV_AB_ARGS:-} > "$OUT/env_ab.txt" 2>&1)
      grep -E "^geomean|failed" "$OUT/env_ab.txt";;
    host)
      (cd /tmp && PYTHONPATH=/tmp/site run_step host "${T_HOST:-120}" python3 "$REPO/bench/tools/host_time.py" \
        --out "$OUT/host_time.json" > "$OUT/host_time.txt" 2>&1)
      tail -30 "$OUT/host_time.txt";;
    dora)
      (cd /tmp && PYTHONPATH=/tmp/site run_step dora "${T_DORA:-240}" python3 -m pytest "$REPO/bench/suite/test_bench_lora.py" \
        --dora -q -p no:cacheprovider --rep-ms 30 --warmup-ms 10 --gpu-reps 15 ${DORA_ARGS:-} \
        --benchmark-json "$OUT/dora.json" --jsonl /tmp/dora.jsonl > /tmp/dora.log 2>&1)
      if [ -s "$OUT/dora.json" ]; then IN="$OUT/dora.json"; else IN=/tmp/dora.jsonl; fi
      (cd /tmp && PYTHONPATH=/tmp/site python3 "$REPO/bench/tools/make_table.py" "$IN" --out /tmp/dora_table/ >/dev/null 2>&1)
      cp /tmp/dora_table/bench_table.md "$OUT/dora_table.md" 2>/dev/null
      sed -n '/## Summary/,/## Per group/p' "$OUT/dora_table.md" 2>/dev/null | head -30;;
    fused)
      (cd /tmp && PYTHONPATH=/tmp/site run_step fused_tests "${T_FUSED_TESTS:-90}" python3 -m pytest -q -p no:cacheprovider \
        -n "${TEST_WORKERS:-16}" "$REPO/tests/test_fused_fwd_sm90.py" > "$OUT/tests_fused.log" 2>&1)
      tail -1 "$OUT/tests_fused.log" | tee -a "$SUMMARY"; grep -aE "^FAILED" "$OUT/tests_fused.log" | head -8
      S=8192x4096x4096,8192x4096x1024,8192x4096x14336,8192x14336x4096
      (cd /tmp && PYTHONPATH=/tmp/site run_step fused_ab "${T_FUSED_AB:-150}" bash -c "
        python3 '$REPO/bench/dev/fused_ab.py' --modes 0,1,2 --shapes $S --r 16,32,64 ${FUSED_AB_ARGS:-} &&
        python3 '$REPO/bench/dev/fused_ab.py' --modes 0,1 --p 0.1 --shapes $S --r 16,64 ${FUSED_AB_ARGS:-}" \
        > "$OUT/fused_ab.txt" 2>&1)
      cat "$OUT/fused_ab.txt";;
    sanitize)
      (cd /tmp && PYTHONPATH=/tmp/site run_step sanitize "${T_SANITIZE:-150}" compute-sanitizer --tool memcheck \
        python3 "$REPO/bench/tools/sanitize_cuda.py" > /tmp/sanitize.log 2>&1)
      grep -h -E "ERROR SUMMARY|sanitize run done" /tmp/sanitize.log | tee -a "$SUMMARY";;
    e2e)
      for b in ${E2E_BACKENDS:-cuda triton}; do
        (cd /tmp && PYTHONPATH=/tmp/site run_step "e2e_$b" "${T_E2E:-150}" python3 "$REPO/bench/train/e2e_train.py" \
          --layers 2 --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --batch 8 --seq 1024 --rank 16 \
          --steps 6 --warmup 3 --loss-steps 0 --backend "$b" --out "$OUT/e2e_$b.json" > "/tmp/e2e_$b.log" 2>&1)
        grep "^\[e2e\]" "/tmp/e2e_$b.log" | tee -a "$SUMMARY"
      done;;
    small_m)
      (cd /tmp && PYTHONPATH=/tmp/site run_step small_m "${T_SMALL_M:-120}" python3 "$REPO/bench/suite/targets.py" \
        --providers ours-cuda,ours-triton,linear-autograd --M 1,16,64 --shapes 4096x4096,4096x14336 --r 16 --p 0 --rounds 15 --gpu-batch 20 \
        --calls 20 ${SMALL_M_ARGS:-} --out "$OUT/small_m.json" > "$OUT/small_m.txt" 2>&1)
      sed -n '/^| mode/,$p' "$OUT/small_m.txt";;
    profile)
      (cd /tmp && PYTHONPATH=/tmp/site run_step profile "${T_PROFILE:-120}" python3 "$REPO/bench/tools/profile_layer.py" \
        ${PROFILE_ARGS:---backends cuda,triton --shapes 8192x4096x1024,8192x4096x14336 --r 16 --p 0.1} \
        > "$OUT/profile.txt" 2>&1)
      tail -40 "$OUT/profile.txt";;
    bwd_gap)
      for e in "" ${BWD_GAP_ENV:-}; do
        (cd /tmp && { [ -z "$e" ] || export "$e"; } && PYTHONPATH=/tmp/site run_step "bwd_gap${e:+ $e}" "${T_BWD_GAP:-120}" \
          python3 "$REPO/bench/dev/bwd_gap.py" --tag "${e:-default}" ${BWD_GAP_ARGS:-} >> "$OUT/bwd_gap.txt" 2>&1)
      done
      cat "$OUT/bwd_gap.txt";;
    timeline)
      (cd /tmp && PYTHONPATH=/tmp/site run_step timeline "${T_TIMELINE:-120}" python3 "$REPO/bench/dev/timeline.py" \
        ${TIMELINE_ARGS:-} > "$OUT/timeline.txt" 2>&1)
      grep -E "^===|span" "$OUT/timeline.txt" | head -60;;
    host_trace)
      (cd /tmp && PYTHONPATH=/tmp/site run_step host_trace "${T_HOST_TRACE:-90}" python3 "$REPO/bench/dev/host_trace.py" ${HOST_TRACE_ARGS:-} \
        > "$OUT/host_trace.txt" 2>&1)
      grep -E "^=====|Self CPU time total|whole call" "$OUT/host_trace.txt";;
    ncu)
      # Nsight Compute on one fwd+bwd (bench/dev/ncu_passes.py; NCU_ARGS passes its --shape/--r/--p): speed of light,
      # warp stall reasons, occupancy and memory of each lora_ kernel (clocks left alone: METHOD.md)
      (cd /tmp && PYTHONPATH=/tmp/site run_step ncu "${T_NCU:-150}" ncu --clock-control none --profile-from-start off \
        --kernel-name regex:lora_ --section SpeedOfLight --section WarpStateStats --section Occupancy \
        --section MemoryWorkloadAnalysis python3 "$REPO/bench/dev/ncu_passes.py" ${NCU_ARGS:-} > "$OUT/ncu.txt" 2>&1)
      grep -E "lora_|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Stall" "$OUT/ncu.txt" | head -60;;
    probe_bg)
      (CUTLASS_DIR="$LORA_KERNELS_CUTLASS_DIR" DTYPES="${PROBE_DTYPES:-0}" CONFIGS="${PROBE_CONFIGS:-0 1 2 3 4 5}" \
        timeout "${T_PROBE_BUILD:-400}" bash "$REPO/bench/dev/build_gemm_capi.sh" /tmp/probe_build \
        > "$OUT/probe_build.log" 2>&1; echo "probe build rc=$?" >> "$OUT/probe_build.log") &
      echo $! > /tmp/probe_build.pid; note "step probe_bg: started";;
    gemm_probe)
      if [ -f /tmp/probe_build.pid ]; then
        while kill -0 "$(cat /tmp/probe_build.pid)" 2>/dev/null; do sleep 2; done; rm -f /tmp/probe_build.pid
      else
        CUTLASS_DIR="$LORA_KERNELS_CUTLASS_DIR" DTYPES="${PROBE_DTYPES:-0}" CONFIGS="${PROBE_CONFIGS:-0 1 2 3 4 5}" \
          run_step probe_build "${T_PROBE_BUILD:-400}" bash "$REPO/bench/dev/build_gemm_capi.sh" /tmp/probe_build \
          > "$OUT/probe_build.log" 2>&1
      fi
      tail -2 "$OUT/probe_build.log" | tee -a "$SUMMARY"
      (cd /tmp && run_step gemm_probe "${T_PROBE:-240}" python3 "$REPO/bench/dev/gemm_sm90_probe.py" \
        --lib /tmp/probe_build/libloragemm_sm90.so --out "$OUT/gemm_probe.json" ${PROBE_ARGS:-} > "$OUT/gemm_probe.txt" 2>&1)
      grep -E "^burst|M=|^checks|FAIL|Error" "$OUT/gemm_probe.txt" | head -60;;
    triton_gemm)
      (cd /tmp && PYTHONPATH=/tmp/site run_step triton_gemm "${T_TRITON_GEMM:-240}" python3 \
        "$REPO/bench/dev/triton_gemm_probe.py" --out "$OUT/triton_gemm.json" ${TRITON_GEMM_ARGS:-} \
        > "$OUT/triton_gemm.txt" 2>&1)
      tail -40 "$OUT/triton_gemm.txt";;
    stream)
      (cd "$REPO" && OUT="$OUT" run_step stream "${T_STREAM:-240}" bash bench/dev/stream_bench.sh > "$OUT/stream_bench.log" 2>&1)
      grep -E "===|pass P|shrink P" "$OUT/stream_bench.txt" 2>/dev/null | grep -v ": plan" | head -80;;
    save)
      tar -czf "$OUT/site.tgz" -C /tmp site && note "saved /tmp/site as site.tgz ($(du -h "$OUT/site.tgz" | cut -f1))";;
    *) note "unknown step $step";;
  esac
done
note "total $(( $(date +%s) - T0 ))s"
# At most 8 files come back from a device call: past 7, everything but summary.txt goes into one archive.
if [ "$(ls -1 "$OUT" | wc -l)" -gt 7 ]; then
  (cd "$OUT" && tar -czf /tmp/results.tgz --exclude=summary.txt --exclude=site.tgz . && find . -type f \
     ! -name summary.txt ! -name site.tgz -delete && mv /tmp/results.tgz results.tgz)
  echo "files in $OUT packed into results.tgz (site.tgz and summary.txt apart)"
fi
