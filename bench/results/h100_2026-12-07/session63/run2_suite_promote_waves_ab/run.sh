#!/usr/bin/env bash
# Next session, run 2 (carry .site .ab_old; .site holds run 1's w/* parts): run 1's wheel installed; the whole GPU
# suite but test_large_index (run 1 ran it alone) against it; then the dA GEMM's promotion A/B and its waves A/B (fwd+bwd, M = 8192, p = 0).
LIMIT=${LIMIT:-560}
R=$PWD; O=/tmp/r2; rm -rf $O; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C /tmp r2 && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt; cp $0 $O/run.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
N=$(cat $R/.site/name.txt); cat $R/.site/part.* > /tmp/$N; (cd /tmp && sha256sum -c $R/.site/sha.txt) >> $O/summary.txt 2>&1
rm -rf /tmp/site; python3 -m pip install -q --no-deps --no-compile --target /tmp/site /tmp/$N > $O/t/install.log 2>&1
note "install rc=$?"; pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(( $(left $LIMIT) - 60 )) python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 --durations=15 --ignore=$R/tests/test_large_index.py $R/tests > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -1 >> $O/summary.txt; grep -aE "^FAILED|^ERROR" $O/t/tests.log | head -20 >> $O/summary.txt; pack
# the dA GEMM's promotion every K-tile (default, d) against none (0), fwd+bwd at p = 0, alternating processes
for c in d 0 d 0; do
  [ $(left $LIMIT) -gt 30 ] || break
  (cd /tmp && env LORA_KERNELS_DA_GEMM_PROMOTE=${c/d/1} PYTHONPATH=/tmp/site timeout 25 python3 $R/bench/suite/targets.py \
    --providers ours-cuda --adapter-dtype bfloat16 --M 8192 --p 0 --modes fwd_bwd --out $O/b/promote_$c.json \
    > $O/b/promote_$c.txt 2>&1); note "promote $c rc=$?"; grep -aE "^fwd_bwd" $O/b/promote_$c.txt >> $O/summary.txt; pack
done
# the dA GEMM's token ranges in 1 / 2 / 4 waves (LORA_KERNELS_DA_GEMM_WAVES), fwd+bwd at p = 0, r = 64
for w in 1 2 4 1 2 4; do
  [ $(left $LIMIT) -gt 25 ] || break
  (cd /tmp && env LORA_KERNELS_DA_GEMM_WAVES=$w PYTHONPATH=/tmp/site timeout 20 python3 $R/bench/suite/targets.py \
    --providers ours-cuda --adapter-dtype bfloat16 --M 8192 --p 0 --r 64 --modes fwd_bwd --out $O/b/waves_$w.json \
    > $O/b/waves_$w.txt 2>&1); note "waves $w rc=$?"; grep -aE "^fwd_bwd" $O/b/waves_$w.txt >> $O/summary.txt; pack
done
note "total"; pack
