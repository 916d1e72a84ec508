#!/usr/bin/env bash
# Next session, run 1 (carry .whl .ab_old): build the final tree and send the wheel back in two parts (run 2 installs
# it instead of building: copy w/* into .site and carry .site); test_large_index alone (its cases take 10-25 GB
# each; its cuda MxK cases check session 62's fix, the dA GEMM's fp32 promotion per K-tile); memcheck. Run 2
# (s63_gpu2.sh) runs the rest of the suite against the same wheel.
LIMIT=${LIMIT:-560}
R=$PWD; O=/tmp/r; rm -rf $O; mkdir -p $O/t $O/s $OUT/w; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C /tmp r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt; cp $0 $O/run.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" >> $O/gpu.txt
mkdir -p /tmp/cutlass && (cd /tmp/cutlass && python3 -m zipfile -e $(ls $R/.whl/nvidia_cutlass-*.whl | head -1) .)
export LORA_KERNELS_CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
LORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 timeout 280 bash bench/tools/gpu_build.sh > $O/t/build.log 2>&1
note "build rc=$?"; tail -1 $O/t/build.log >> $O/summary.txt; pack
if ! ls /tmp/site/lora_kernels/_C*.so >/dev/null 2>&1; then note "no build"; grep -a -B2 -A8 "error" $O/t/build.log | head -60 >> $O/summary.txt; pack; exit 0; fi
(cd /tmp/whl && split -b 15M lora_kernels-*.whl $OUT/w/part. && ls lora_kernels-*.whl > $OUT/w/name.txt && sha256sum lora_kernels-*.whl > $OUT/w/sha.txt)
PT="python3 -m pytest -q -rfE -p no:cacheprovider --tb=short"
(cd /tmp && PYTHONPATH=/tmp/site timeout 90 $PT -n 8 $R/tests/test_sm90_gemm.py -k dA_gemm > $O/t/dA_gemm.log 2>&1)
note "dA GEMM tests (the promoting main loop; one 32768-token range) rc=$?"; grep -aE "passed|failed" $O/t/dA_gemm.log | tail -1 >> $O/summary.txt; grep -aE "^FAILED" $O/t/dA_gemm.log >> $O/summary.txt; pack
(cd /tmp && LORA_KERNELS_DA_GEMM_PROMOTE=0 PYTHONPATH=/tmp/site timeout 40 $PT $R/tests/test_sm90_gemm.py -k long_token > $O/t/no_promote.log 2>&1)
note "long-range test without the promotion (expected to fail) rc=$?"; grep -aE "AssertionError|passed|failed" $O/t/no_promote.log | tail -2 >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout $(( $(left $LIMIT) - 45 )) $PT $R/tests/test_large_index.py > $O/t/large.log 2>&1)
note "large-index rc=$?"; grep -aE "passed|failed" $O/t/large.log | tail -1 >> $O/summary.txt; grep -aE "^FAILED" $O/t/large.log >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 40 compute-sanitizer --tool memcheck python3 $R/bench/tools/sanitize_cuda.py \
  > $O/s/memcheck.log 2>&1); note "memcheck rc=$?"; grep -hE "ERROR SUMMARY|sanitize run done" $O/s/memcheck.log >> $O/summary.txt
note "total"; pack
