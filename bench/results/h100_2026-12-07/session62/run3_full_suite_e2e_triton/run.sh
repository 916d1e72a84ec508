#!/usr/bin/env bash
# Session 62 run 3 (carry .site .ab_old): run 2's wheel (this tree's csrc) installed; the whole GPU suite against it;
# e2e training on the Triton backend (dropout 0 / 0.05).
LIMIT=${LIMIT:-500}
R=$PWD; O=/tmp/r3; rm -rf $O; mkdir -p $O/t $O/b; S=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - S) )); echo $(( l < 5 ? 5 : l )); }
pack() { tar -czf $OUT/run.tgz.tmp -C /tmp r3 && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
note() { echo "$* at $(( $(date +%s) - S ))s" >> $O/summary.txt; }
echo "${COMMIT:-unknown}" > $O/commit.txt; cp $0 $O/run.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
N=$(cat $R/.site/name.txt); cat $R/.site/part.* > /tmp/$N; (cd /tmp && sha256sum -c $R/.site/sha.txt) >> $O/summary.txt 2>&1
rm -rf /tmp/site; python3 -m pip install -q --no-deps --no-compile --target /tmp/site /tmp/$N > $O/t/install.log 2>&1
note "install rc=$?"; pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout $(( $(left $LIMIT) - 75 )) python3 -m pytest -q -rfE \
  -p no:cacheprovider --tb=short -n 16 --durations=25 $R/tests > $O/t/tests.log 2>&1)
note "tests rc=$?"; grep -aE "passed|failed" $O/t/tests.log | tail -3 >> $O/summary.txt; grep -aE "^FAILED|^ERROR" $O/t/tests.log | head -20 >> $O/summary.txt; pack
if [ $(left $LIMIT) -gt 50 ]; then
  (cd /tmp && PYTHONPATH=/tmp/site timeout $(( $(left $LIMIT) - 5 )) python3 $R/bench/train/e2e_train.py \
    --layers 2 --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --batch 8 --seq 1024 --rank 16 \
    --steps 6 --warmup 3 --loss-steps 0 --backend triton --out $O/b/e2e_triton.json > $O/b/e2e_triton.log 2>&1)
  note "e2e triton rc=$?"; grep "^\[e2e\]" $O/b/e2e_triton.log >> $O/summary.txt
fi
note "total"; pack
