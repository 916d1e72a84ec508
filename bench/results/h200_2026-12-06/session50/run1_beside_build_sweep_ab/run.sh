#!/usr/bin/env bash
# Session 50 run 1 (carry .whl .ab_old .peers): build this tree (dA beside the dx GEMM); the sm_90 GEMM tests with the
# new beside tests; the beside sweep (backward op GPU time per mode, M = 8192); the targets grid fwd_bwd A/B in
# alternating processes, default (A) against LORA_KERNELS_DA_BESIDE=0 (B); the build saved.
LIMIT=${LIMIT:-580}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
rm -rf /tmp/site
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -3 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 120 python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_sm90_gemm.py > $O/t/sm90_tests.log 2>&1)
note "sm90 tests rc=$?"; tail -15 $O/t/sm90_tests.log >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout $(left 330) python3 $R/bench/dev/beside_sweep.py --M 8192 \
  --modes 0,-1,4,8,12,16,24 --rep-ms 40 --out $O/b/sweep.json > $O/b/sweep.txt 2>&1)
note "sweep rc=$?"; pack
(cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left 540) python3 $R/bench/dev/env_ab.py \
  --env LORA_KERNELS_DA_BESIDE=0 --repeats 1 --timeout 100 --workdir $O/b --out $O/b/env_ab.json -- \
  --providers ours-cuda --modes fwd_bwd --M 8192,2048 --adapter-dtype bfloat16 > $O/b/env_ab.txt 2>&1)
note "env_ab rc=$?"; pack
[ $(left $((LIMIT - 10))) -gt 10 ] && tar -czf $OUT/site.tgz -C /tmp site
note "total"; pack; rm -rf $O
