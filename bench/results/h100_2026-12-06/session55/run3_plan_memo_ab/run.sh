#!/usr/bin/env bash
# Session 55 run 3 (carry .whl .ab_old .peers): build; host_time.py for the cuda backend with the plan memo on and off
# (LORA_KERNELS_PLAN_MEMO), alternating; the GPU tests of the streaming passes and the C++ autograd node.
LIMIT=${LIMIT:-420}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
rm -rf /tmp/site
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
i=0
for m in 1 0 1 0; do
  i=$((i+1)); [ $(left $LIMIT) -gt 45 ] || break
  (cd /tmp && LORA_KERNELS_PLAN_MEMO=$m PYTHONPATH=/tmp/site timeout $(left $((LIMIT - 5))) python3 $R/bench/tools/host_time.py \
    --backends cuda --out $O/b/host_time_memo${m}_$i.json > $O/b/host_time_memo${m}_$i.txt 2>&1)
  note "host_time memo=$m ($i) rc=$?"; pack
  [ $i = 2 ] && { (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(left $((LIMIT - 5))) python3 -m pytest -q -rfE \
    -p no:cacheprovider --tb=short -n 16 $R/tests/test_dy_pass_sm90.py $R/tests/test_autograd_cpp.py > $O/t/tests.log 2>&1)
    note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; pack; }
done
note "total"; pack; rm -rf $O
