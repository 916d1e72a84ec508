#!/usr/bin/env bash
# Session 55 run 1 (carry .whl .ab_old .peers): build; host_time.py (the #16 ratios); py-spy (native frames) records
# of bench/dev/host_spy.py loops: where the cuda and Triton backends' host time per call goes, against F.linear's.
LIMIT=${LIMIT:-540}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b $O/s; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
python3 -c "import peft, transformers; print('peft', peft.__version__, 'transformers', transformers.__version__)" >> $O/gpu.txt 2>&1
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
python3 -m pip install -q --no-deps --target /tmp/spy $R/.whl/py_spy-*.whl > $O/t/spy_install.log 2>&1
SPY=$(ls /tmp/spy/bin/py-spy 2>/dev/null || echo py-spy)
if [ "${REUSE:-0}" != 1 ]; then
  rm -rf /tmp/site
  LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
  note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
fi
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
(cd /tmp && PYTHONPATH=/tmp/site timeout 150 python3 $R/bench/tools/host_time.py --out $O/b/host_time.json > $O/b/host_time.txt 2>&1)
note "host_time rc=$?"; pack
spy() {  # name, then host_spy.py's arguments
  local n=$1; shift
  [ $(left $LIMIT) -gt 40 ] || { note "skip $n"; return; }
  (cd /tmp && PYTHONPATH=/tmp/site timeout $(left $((LIMIT - 5))) $SPY record --native --rate 250 --format raw \
    -o $O/s/$n.raw -- python3 $R/bench/dev/host_spy.py --seconds ${SECS:-10} --calls-file $O/s/$n.calls "$@" \
    > $O/s/$n.log 2>&1)
  note "spy $n rc=$?"
  python3 $R/bench/dev/spy_report.py $O/s/$n.raw --calls-file $O/s/$n.calls > $O/s/$n.txt 2>&1; pack
}
spy cuda_fb_m16_p0 --provider cuda --mode fwd_bwd --M 16 --p 0
spy linear_fb_m16 --provider linear --mode fwd_bwd --M 16 --p 0
spy cuda_fb_m16_p01 --provider cuda --mode fwd_bwd --M 16 --p 0.1
spy cuda_fb_m2048_p0 --provider cuda --mode fwd_bwd --M 2048 --p 0 --batch 20
spy cuda_f_m2048_p01 --provider cuda --mode fwd --M 2048 --p 0.1
spy triton_fb_m16_p0 --provider triton --mode fwd_bwd --M 16 --p 0
spy triton_fb_m2048_p01 --provider triton --mode fwd_bwd --M 2048 --p 0.1 --batch 20
note "total"; pack; rm -rf $O
