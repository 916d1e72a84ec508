#!/usr/bin/env bash
# Session 50 run 2 (carry .whl .ab_old .peers .site): run 1's build of this tree's csrc, this tree's Python over it.
# The GPU tests touching the backward (sm90 GEMM, contract, DoRA ops, graphs, fused forward, dy pass, PEFT patch);
# memcheck with dA forced beside the dx GEMM; the GEMM issue's grid with LoRAFusion (bf16 adapters, M = 8192, 2048).
LIMIT=${LIMIT:-585}
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null; git -C $R status --short >> $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> $O/gpu.txt
rm -rf /tmp/site && tar -xzf $R/.site/site.tgz -C /tmp && (cd $R && find lora_kernels -name '*.py' ! -name _build_info.py \
  -exec cp --parents {} /tmp/site/ \;)
note "unpacked"
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 230 python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 $R/tests/test_sm90_gemm.py $R/tests/test_contract.py $R/tests/test_cuda_dora_ops.py \
  $R/tests/test_gpu_graphs.py $R/tests/test_fused_fwd_sm90.py $R/tests/test_dy_pass_sm90.py $R/tests/test_device_seed.py \
  $R/tests/test_dora.py $R/tests/test_peft_patch.py -k "cuda or gpu or sm90 or graph or beside" > $O/t/tests.log 2>&1)
note "tests rc=$?"; tail -25 $O/t/tests.log >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_DA_BESIDE=4 timeout 120 compute-sanitizer --tool memcheck \
  python3 $R/bench/tools/sanitize_cuda.py > $O/t/memcheck_beside.log 2>&1)
note "memcheck (dA beside on 4 SMs) rc=$?"; tail -4 $O/t/memcheck_beside.log >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site LORAFUSION_DIR=$R/.peers/lorafusion timeout $(left $((LIMIT - 5))) python3 \
  $R/bench/suite/targets.py --providers ours-cuda,lorafusion --adapter-dtype bfloat16 --out $O/b/targets_bf16.json \
  > $O/b/targets_bf16.txt 2>&1)
note "targets bf16 rc=$?"; note "total"; pack; rm -rf $O
