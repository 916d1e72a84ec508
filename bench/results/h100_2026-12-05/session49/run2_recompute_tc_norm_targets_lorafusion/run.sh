#!/usr/bin/env bash
# Session 49 run 2 (carry .whl .ab_old .site .peers): this tree's wheel builds in the background (the cuda DoRA
# recompute on tensor cores, the norm's combine summing the W Aᵀ partials); meanwhile the GEMM issue's targets grid
# with LoRAFusion (bf16 adapters, M = 2048 and 8192) on the carried build (session 48's csrc: the LoRA kernels are
# unchanged). Then, on the new build: the cuda DoRA tests, the DoRA forward and fwd+bwd at p = 0 (--b-scale 0.05)
# old build against new in alternating processes, the all-flagged case (--b-scale 1), a timeline, and the build saved.
LIMIT=${LIMIT:-570}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
rm -rf /tmp/site /tmp/old && mkdir -p /tmp/old && tar -xzf $R/.site/site.tgz -C /tmp/old && (cd $R && find lora_kernels \
  -name '*.py' ! -name _build_info.py -exec cp --parents {} /tmp/old/site/ \;)
(LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=12 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
 echo "build rc=$? at $(( $(date +%s) - S ))s" >> $O/t/build.log) &
BPID=$!
(cd /tmp && PYTHONPATH=/tmp/old/site LORAFUSION_DIR=$R/.peers/lorafusion timeout 200 python3 $R/bench/suite/targets.py \
  --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --out $O/b/targets_bf16.json > $O/b/targets_bf16.txt 2>&1)
note "targets bf16 rc=$?"; pack
wait $BPID; tail -3 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left 360) python3 -m pytest -v -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_dora.py $R/tests/test_cuda_dora_ops.py $R/tests/test_dora_peft.py \
  -k "cuda or gpu" > $O/t/dora_tests.log 2>&1)
note "tests rc=$?"
grep -aoE "(PASSED|FAILED|ERROR|SKIPPED) \S+::\S+" $O/t/dora_tests.log | sort > $O/t/outcomes.txt
grep -aE "^=+ .*[0-9]+ (passed|failed|error)" $O/t/dora_tests.log | tail -1 >> $O/summary.txt; pack
BENCH() {  # BENCH <site> <name> <limit> <args...>
  local site=$1 name=$2 lim=$3; shift 3
  (cd /tmp && PYTHONPATH=$site timeout $lim python3 -m pytest $R/bench/suite/test_bench_lora.py --dora -q \
    -p no:cacheprovider --rep-ms 30 --warmup-ms 10 --gpu-reps 15 "$@" --jsonl $O/b/$name.jsonl > $O/b/$name.log 2>&1)
  note "bench $name rc=$?"; pack
}
for i in 1 2; do
  BENCH /tmp/old/site old$i $(left 470) --b-scale 0.05 --providers ours-dora-cuda,cublas-base -k "p0.0"
  BENCH /tmp/site new$i $(left 490) --b-scale 0.05 --providers ours-dora-cuda,cublas-base -k "p0.0"
done
BENCH /tmp/site flagged $(left 520) --b-scale 1 --providers ours-dora-cuda,cublas-base \
  -k "p0.0-fwd_bwd and r16 and (4096x4096 or 4096x1024 or 4096x14336)"
(cd /tmp && PYTHONPATH=/tmp/site timeout $(left 540) python3 $R/bench/dev/timeline.py --shapes 8192x4096x4096,8192x4096x1024 \
  --r 16 --p 0 --b-scale 1 --providers cublas-base,ours-dora-cuda > $O/b/timeline_flagged.txt 2>&1)
note "timeline rc=$?"
[ $(left $((LIMIT - 8))) -gt 8 ] && tar -czf $OUT/site.tgz -C /tmp site
note "total"; pack; rm -rf $O
