#!/usr/bin/env bash
# Session 49 run 1 (carry .whl .ab_old .site): session 48's carried build (csrc of 450f9b4, unchanged since) with this
# tree's Python: the DoRA tests on the GPU (ed858df's shared finish, 38c0008's row-split helper); the #17 DoRA grid
# with trained-size adapters (--b-scale 0.05), PEFT's DoRA and LoRA alongside, fwd and fwd+bwd, p = 0 and 0.1;
# kernel timelines of DoRA against LoRA and the floor at 4096->4096 / ->1024.
R=$PWD; O=$OUT/r; mkdir -p $O/t $O/b; S=$(date +%s)
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
git -C $R log --oneline -1 > $O/commit.txt 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" >> $O/gpu.txt
tar -xzf $R/.site/site.tgz -C /tmp && (cd $R && find lora_kernels -name '*.py' ! -name _build_info.py -exec cp --parents {} /tmp/site/ \;)
echo "unpacked at $(( $(date +%s) - S ))s" >> $O/summary.txt
(cd /tmp && PYTHONPATH=/tmp/site timeout 270 python3 -m pytest $R/bench/suite/test_bench_lora.py --dora -q \
  -p no:cacheprovider --rep-ms 30 --warmup-ms 10 --gpu-reps 15 --b-scale 0.05 \
  --providers ours-dora-cuda,ours-dora-triton,ours-cuda,peft-dora,cublas-base \
  --benchmark-json $O/b/dora.json --jsonl $O/b/dora.jsonl > $O/b/dora.log 2>&1)
echo "dora grid rc=$? at $(( $(date +%s) - S ))s" >> $O/summary.txt
IN=$O/b/dora.json; [ -s $IN ] || IN=$O/b/dora.jsonl
(cd /tmp && PYTHONPATH=/tmp/site python3 $R/bench/tools/make_table.py $IN --out /tmp/dt/ > /dev/null 2>&1; cp /tmp/dt/bench_table.md $O/b/dora_table.md); pack
(cd /tmp && PYTHONPATH=/tmp/site LORA_KERNELS_TRITON_AUTOTUNE=0 timeout 130 python3 -m pytest -v -rfE -p no:cacheprovider \
  --tb=short -n 16 $R/tests/test_dora.py $R/tests/test_dora_peft.py > $O/t/dora_tests.log 2>&1)
echo "tests rc=$? at $(( $(date +%s) - S ))s" >> $O/summary.txt
grep -aoE "(PASSED|FAILED|ERROR|SKIPPED) \S+::\S+" $O/t/dora_tests.log | sort > $O/t/outcomes.txt
grep -aE "^=+ .*[0-9]+ (passed|failed|error)" $O/t/dora_tests.log | tail -1 >> $O/summary.txt; pack
(cd /tmp && PYTHONPATH=/tmp/site timeout 60 python3 $R/bench/dev/timeline.py --shapes 8192x4096x4096,8192x4096x1024 \
  --r 16 --p 0 --b-scale 0.05 --providers cublas-base,ours-cuda,ours-dora-cuda > $O/b/timeline.txt 2>&1)
echo "timeline rc=$? at $(( $(date +%s) - S ))s" >> $O/summary.txt
echo "total $(( $(date +%s) - S ))s" >> $O/summary.txt; pack; rm -rf $O
