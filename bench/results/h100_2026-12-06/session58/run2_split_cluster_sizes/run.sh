#!/usr/bin/env bash
# Session 58 run 2 (carry .whl .ab_old): build; the split variant on clusters of 2 (LORA_KERNELS_FUSED_SPLIT=2)
# checked against clusters of 4 and the lead tiles; fused_gap.py A/B of both cluster sizes with and without u's
# products and the exchange (debug 64 | 2048) and of the lead tiles without u (debug 65); Nsight Compute at
# 8192x4096->1024, r = 16, of the bare split main loops (debug 2112) and the lead kernel.
LIMIT=${LIMIT:-560}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b $O/s; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
if [ ! -d /tmp/site/lora_kernels ]; then
  LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
  note "build rc=$?"; tail -2 $O/t/build.log >> $O/summary.txt; pack
else
  note "build reused"
fi
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -80 >> $O/summary.txt; pack; rm -rf $O; exit 0; fi
cat > /tmp/chk.py <<'PY'
import torch
from lora_kernels.backends import cuda_backend as cb
torch.manual_seed(0)
for M, K, N, r in ((8192, 4096, 1024, 16), (700, 2056, 3000, 64), (6437, 2048, 1000, 40)):
    x = torch.randn(M, K, device="cuda").bfloat16(); W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
    A = (torch.randn(r, K, device="cuda") * K ** -0.5).bfloat16(); B = (torch.randn(N, r, device="cuda") * r ** -0.5).bfloat16()
    ref_y = (x.double() @ W.double().T + 0.5 * (x.double() @ A.double().T) @ B.double().T)
    out = {}
    for m in (2, 1, 0):
        cb.set_fused_split(m)
        y, u = cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0)
        out[m] = (y.double() - ref_y).abs().max().item()
        print(m, cb.forward_path(x, W, None, A, B, 0.0)[-40:], "max |y - ref|", out[m], flush=True)
    assert out[2] < 2 * max(out[1], out[0]) + 1e-3, out
print("split2 check done")
PY
(cd /tmp && PYTHONPATH=/tmp/site timeout 60 python3 /tmp/chk.py > $O/t/chk.log 2>&1); note "split2 check rc=$?"; tail -1 $O/t/chk.log >> $O/summary.txt; pack
G="python3 $R/bench/dev/fused_gap.py --modes 2 --r 16,64 --shapes 8192x4096x1024,8192x4096x4096"
for c in "2 0" "1 0" "0 0" "2 2112" "1 2112" "0 65" "2 64" "2 2048" "2 0" "0 0"; do
  set -- $c
  [ $(left $LIMIT) -gt 120 ] || break
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_SPLIT=$1 LORA_KERNELS_FUSED_DEBUG=$2 timeout 45 $G --tag s$1d$2 >> $O/b/gap.txt 2>&1)
  note "gap split $1 debug $2 rc=$?"; pack
done
NCU="ncu --clock-control none --profile-from-start off --kernel-name device_kernel --section SpeedOfLight --section WarpStateStats --section SchedulerStats --metrics dram__bytes_read.sum,lts__t_sector_hit_rate.pct"
for c in "1 2112" "2 2112" "0 0" "2 0"; do
  set -- $c
  [ $(left $LIMIT) -gt 30 ] || break
  (cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_FUSED_SPLIT=$1 LORA_KERNELS_FUSED_DEBUG=$2 timeout $(left $((LIMIT - 5))) $NCU python3 $R/bench/dev/ncu_fused.py --shape 8192x4096x1024 > $O/b/ncu_s$1d$2.txt 2>&1)
  note "ncu split $1 debug $2 rc=$?"; pack
done
note "total"; pack; rm -rf $O
