"""Dropout RNG across ranks (issue 18), on CPU with 2 gloo processes.

lora_kernels draws one Philox seed per dropout call from torch's default CPU generator. So, like PEFT's nn.Dropout
(which draws from the generator of x's device), the same torch seed on every rank gives the same masks on every
rank and per-rank seeds (accelerate's set_seed(s, device_specific=True): s + process index) give per-rank masks.
Checked for a patched PEFT model under DDP and FSDP2: the (seed, offset) of the first dropout call of a training
step (lora_kernels.record_dropout) on each rank, next to plain torch dropout after the same seeding. Also: the
same check as bench/train/fsdp_train.py --checks runs it on the GPUs (bench/train/two_gpu.sh), and that its verdicts fail
when they should.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import import_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 110  # both torchrun tests together (each ~20 s on a 2-core CPU)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

WORKER = r'''
import json, os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
import lora_kernels
from peft import LoraConfig, get_peft_model

SEED = 7


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 48)
        self.b = nn.Linear(48, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build():
    torch.manual_seed(1234)  # the weights: the same on every rank
    m = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["a", "b"]))
    assert lora_kernels.patch_peft(m, backend="torch").num_patched == 2
    return m


def seed_rng(how, rank):
    if how == "same":
        torch.manual_seed(SEED)
    elif how == "per_rank":
        torch.manual_seed(SEED + rank)
    else:  # accelerate's own helper
        from accelerate.utils import set_seed
        set_seed(SEED, device_specific=True)


def first_call(wrap, how, rank):
    m = build()
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        w = DDP(m)
    else:
        from torch.distributed.fsdp import fully_shard
        fully_shard(m)
        w = m
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(100 + rank))  # per-rank data
    seed_rng(how, rank)
    with lora_kernels.record_dropout() as calls:
        w(x).square().mean().backward()
    seed_rng(how, rank)
    ref = (F.dropout(torch.ones(256), 0.5, training=True) != 0).int().tolist()  # plain torch after the same seeding
    return {"first": [int(v) for v in calls[0]], "calls": len(calls), "torch_mask": "".join(map(str, ref))}


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
hows = ["same", "per_rank"]
try:
    from accelerate import Accelerator
except ImportError:
    Accelerator = None
if Accelerator is not None:
    acc = Accelerator(cpu=True)  # set_seed(device_specific=True) reads the process index from its state
    assert acc.process_index == rank
    hows.append("accelerate_device_specific")
out = {}
for wrap in ("ddp", "fsdp2"):
    for how in hows:
        got = [None] * world
        dist.all_gather_object(got, first_call(wrap, how, rank))
        out[f"{wrap}/{how}"] = got
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip gloo's C++ static teardown (see bench/train/fsdp_train.py)
'''


def _torchrun(args, deadline, cwd):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    left = deadline - time.monotonic()
    if left < 5:
        pytest.fail("time budget exhausted")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=left)
    assert p.returncode == 0, f"torchrun failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"


_DEADLINE = []


def _deadline():
    if not _DEADLINE:
        _DEADLINE.append(time.monotonic() + BUDGET_S)
    return _DEADLINE[0]


def test_dropout_seeds_follow_each_ranks_torch_rng(tmp_path):
    pytest.importorskip("peft")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out.json"
    _torchrun([str(worker), str(out)], _deadline(), str(tmp_path))
    res = json.loads(out.read_text())
    assert {"ddp/same", "ddp/per_rank", "fsdp2/same", "fsdp2/per_rank"} <= set(res)
    for key, (r0, r1) in res.items():
        assert r0["calls"] == r1["calls"] == 2, key  # one per patched layer (backward regenerates the mask)
        if key.endswith("/same"):
            # the same seed on every rank: the same (seed, offset), so the same mask, as plain torch dropout
            assert r0["first"] == r1["first"], key
            assert r0["torch_mask"] == r1["torch_mask"], key
        else:
            # per-rank seeding: per-rank masks, as plain torch dropout
            assert r0["first"] != r1["first"], key
            assert r0["torch_mask"] != r1["torch_mask"], key
    # per-rank seeding by hand and accelerate's set_seed(device_specific=True) are the same thing
    if "ddp/accelerate_device_specific" in res:
        assert res["ddp/accelerate_device_specific"] == res["ddp/per_rank"]
        assert res["fsdp2/accelerate_device_specific"] == res["fsdp2/per_rank"]
    # the same seeding gives the same seeds whatever the wrapper (DDP or FSDP2)
    assert res["ddp/same"] == res["fsdp2/same"] and res["ddp/per_rank"] == res["fsdp2/per_rank"]


def _fsdp_train():
    for rel in ("bench/train/fsdp_train.py",):
        if os.path.exists(os.path.join(ROOT, rel)):
            return os.path.join(ROOT, rel)
    pytest.skip("bench/train/fsdp_train.py not found")


def test_fsdp_train_checks_on_cpu(tmp_path):
    """The checks bench/train/two_gpu.sh runs on the GPUs, here on CPU/gloo: FSDP2, 2 ranks, dropout 0.05."""
    pytest.importorskip("peft")
    script = _fsdp_train()
    out = tmp_path / "fsdp.json"
    _torchrun([script, "--tiny", "--cpu", "--backend", "torch", "--dropout", "0.05", "--steps", "2", "--warmup", "1",
               "--variants", "unpatched,patched", "--checks", "--expect-backend", "torch", "--out", str(out)],
              _deadline(), str(tmp_path))
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["runs"]] == ["unpatched", "patched"]
    for r in res["runs"]:
        assert "error" not in r, r.get("traceback")
        v = r["verdicts"]
        expected = {"no_nan", "lora_outputs_on_own_device", "step0_masks_equal_across_ranks", "same_seed_same_masks",
                    "per_rank_seed_per_rank_masks", "torch_reference_agrees"}
        if r["patched"]:
            expected |= {"ops_on_own_device", "backend_expected", "step0_ours_not_peft_dropout"}
        assert expected <= set(v), (r["variant"], v)
        assert all(v[k] for k in expected), (r["variant"], v)
        probes = [c["dropout_probe"] for c in r["checks_per_rank"]]
        assert probes[0]["per_rank"]["seed_set"] == probes[1]["per_rank"]["seed_set"] - 1


def test_verdicts_fail_when_they_should():
    """bench/train/dist_checks.verdicts on hand-made per-rank dicts: each check can fail."""
    bench = os.path.dirname(_fsdp_train())
    dist_checks = import_from(bench, "dist_checks")

    def rank(i, seed_same=5, seed_per=None, backend="cuda", diff=0.0, stream_ok=True, dev=None):
        dev = dev or f"cuda:{i}"
        first = lambda s: {"seed": s, "offset": 0, "mask_crc": s * 3, "ops_calls": 14,  # noqa: E731
                           "peft_dropout_called": False}
        return {"nan": {"losses_finite": True, "params_finite": True},
                "device_stream": {"device": f"cuda:{i}", "lora_layer_calls": 14, "lora_out_devices": [dev],
                                  "op_calls": 14, "op_backends": [backend], "op_devices": [dev],
                                  "op_current_devices": [torch.device(dev).index], "ref_finite": True,
                                  "side_op_calls": 14, "side_calls_saw_side_stream": stream_ok,
                                  "side_stream_is_default": False, "side_finite": diff == diff,
                                  "side_max_abs_diff": diff, "side_exact": diff == 0, "ref_max_abs": 10.0},
                "step0_dropout": first(seed_same),
                "dropout_probe": {"same": {"first": first(seed_same), "torch_dropout_crc": 1},
                                  "per_rank": {"first": first(seed_per if seed_per is not None else 10 + i),
                                               "torch_dropout_crc": 2 + i}}}

    good = dist_checks.verdicts([rank(0), rank(1)], True, 0.05, "cuda", 2)
    assert good and all(good.values()), good
    cases = {
        "backend_expected": [rank(0, backend="triton"), rank(1)],
        "ops_on_own_device": [rank(0), rank(1, dev="cuda:0")],
        "lora_outputs_on_own_device": [rank(0), rank(1, dev="cuda:0")],
        "side_stream_matches_default": [rank(0), rank(1, diff=float("nan"))],
        "ops_saw_side_stream": [rank(0), rank(1, stream_ok=False)],
        "step0_masks_equal_across_ranks": [rank(0), rank(1, seed_same=6)],
        "same_seed_same_masks": [rank(0), rank(1, seed_same=6)],
        "per_rank_seed_per_rank_masks": [rank(0, seed_per=9), rank(1, seed_per=9)],
    }
    for key, ranks in cases.items():
        v = dist_checks.verdicts(ranks, True, 0.05, "cuda", 2)
        assert v[key] is False, (key, v)
    bad_nan = [rank(0), rank(1)]
    bad_nan[1]["nan"]["params_finite"] = False
    assert dist_checks.verdicts(bad_nan, True, 0.05, "cuda", 2)["no_nan"] is False


def test_loss_rule_of_the_two_gpu_report():
    """bench/train/two_gpu_report.loss_checks: ours may differ from 1 rank by 2x PEFT's own 2-vs-1-rank difference + floor."""
    bench = os.path.dirname(_fsdp_train())
    if not os.path.exists(os.path.join(bench, "two_gpu_report.py")):
        pytest.skip("bench/train/two_gpu_report.py not found")
    two_gpu_report = import_from(bench, "two_gpu_report")

    def launches(ours_2rank):
        one = [{"variant": "unpatched", "losses": [10.0, 9.0]}, {"variant": "patched", "losses": [10.0, 9.0]}]
        two = [{"variant": "unpatched", "losses": [10.0, 9.002]}, {"variant": "patched", "losses": ours_2rank}]
        return [{"name": "one_ddp_p0", "result": {"runs": one}}, {"name": "fsdp2_p0", "result": {"runs": two}},
                {"name": "ddp_p0", "result": {"runs": two}}]

    ok = two_gpu_report.loss_checks(launches([10.0, 9.004]), "bf16")  # 0.004 <= 2 * 0.002 + 1e-3
    assert [c["status"] for c in ok] == ["PASS", "PASS"], ok
    bad = two_gpu_report.loss_checks(launches([10.0, 9.0051]), "bf16")  # 0.0051 > 0.005
    assert [c["status"] for c in bad] == ["FAIL", "FAIL"], bad
    nan = two_gpu_report.loss_checks(launches([10.0, float("nan")]), "bf16")
    assert [c["status"] for c in nan] == ["FAIL", "FAIL"], nan
    missing = two_gpu_report.loss_checks(launches([10.0, 9.0])[:2], "bf16")
    assert [c["status"] for c in missing] == ["PASS", "FAIL"], missing
