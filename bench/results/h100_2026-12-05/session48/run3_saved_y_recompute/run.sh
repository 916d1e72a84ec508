#!/usr/bin/env bash
# Session 48 run 3 (carry .whl .ab_old .site): the saved-y recompute of z as a GEMM tile loop (Triton and cuda).
# The wheel of this tree builds in the background; meanwhile the carried build (session 46's csrc) with this tree's
# Python runs the Triton side (its DoRA kernels are Python): tests, then the DoRA bench at b-scale 1 (every column
# recomputed) and 0.05 (none); after the build the cuda side the same way; the new build saved last.
LIMIT=${LIMIT:-400}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
(LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=12 timeout 280 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
 echo "build rc=$? at $(( $(date +%s) - S ))s" >> $O/t/build.log) &
BPID=$!
rm -rf /tmp/old && mkdir -p /tmp/old && tar -xzf $R/.site/site.tgz -C /tmp/old && (cd $R && find lora_kernels \
  -name '*.py' ! -name _build_info.py -exec cp --parents {} /tmp/old/site/ \;)
T() {  # T <site> <name> <limit> <pytest args...>
  local site=$1 name=$2 lim=$3; shift 3
  (cd /tmp && PYTHONPATH=$site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $lim python3 -m pytest -v -rfE -p no:cacheprovider \
    --tb=short "$@" > $O/t/$name.log 2>&1); echo "$name rc=$? at $(( $(date +%s) - S ))s" >> $O/summary.txt
  grep -aoE "(PASSED|FAILED|ERROR|SKIPPED) \S+::\S+" $O/t/$name.log | sort > $O/t/${name}_outcomes.txt; pack
}
BENCH() {  # BENCH <site> <provider> <b-scale> <limit>
  (cd /tmp && PYTHONPATH=$1 timeout $4 python3 -m pytest $R/bench/suite/test_bench_lora.py --dora -q \
    -p no:cacheprovider --rep-ms 30 --warmup-ms 10 --gpu-reps 15 --providers $2,cublas-base --b-scale $3 \
    -k "M8192-r16-p0.0-fwd_bwd and (4096x4096 or 4096x1024)" --jsonl $O/b/${2}_b$3.jsonl > $O/b/${2}_b$3.log 2>&1)
  echo "bench $2 b$3 rc=$? at $(( $(date +%s) - S ))s" >> $O/summary.txt; pack
}
T /tmp/old/site triton 110 -n 8 $R/tests/test_dora.py -k "zero_g or (triton and (saved_y or every_column))"
BENCH /tmp/old/site ours-dora-triton 1.0 60
BENCH /tmp/old/site ours-dora-triton 0.05 45
wait $BPID; tail -3 $O/t/build.log >> $O/summary.txt; pack
if [ -d /tmp/site/lora_kernels ] && ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then
  T /tmp/site cuda $(left $((LIMIT - 90))) -n 16 $R/tests/test_dora.py \
    $R/tests/test_dora_peft.py::test_gpu_model_matches_peft_bf16_fp32_adapters -k "cuda-cuda or bf16_fp32_adapters"
  BENCH /tmp/site ours-dora-cuda 1.0 $(left $((LIMIT - 40)))
  BENCH /tmp/site ours-dora-cuda 0.05 $(left $((LIMIT - 12)))
  [ $(left $((LIMIT - 5))) -gt 8 ] && tar -czf $OUT/site.tgz -C /tmp site
fi
echo "total $(( $(date +%s) - S ))s" >> $O/summary.txt; pack
rm -rf $O
