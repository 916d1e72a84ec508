"""FSDP2 (bench/train/fsdp_train.py) on CPU/gloo: 2 ranks vs 1 rank, tiny fp32 model, dropout 0 -> same losses."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "train", "fsdp_train.py")
BUDGET_S = 85  # whole test under 90 s

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _run(nproc, out, deadline):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT,
           "--tiny", "--dropout", "0", "--backend", "torch", "--cpu", "--out", str(out)]
    left = deadline - time.monotonic()
    if left < 5:
        pytest.fail("time budget exhausted")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
    assert p.returncode == 0, f"torchrun nproc={nproc} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    with open(out) as f:
        return json.load(f)


def test_fsdp2_cpu_matches_single_process(tmp_path):
    deadline = time.monotonic() + BUDGET_S
    two = _run(2, tmp_path / "two.json", deadline)
    one = _run(1, tmp_path / "one.json", deadline)
    assert two["mode"] == "fsdp2" and two["world_size"] == 2 and one["world_size"] == 1
    assert len(two["losses"]) == len(one["losses"]) == 20
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=0)
