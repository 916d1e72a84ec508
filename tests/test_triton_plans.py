"""The Triton backend's plans (lora_kernels/backends/triton/launch.py): a call's steps, recorded once per plan key and
replayed by later calls with the same key.

A plan is reused by a call that differs only in its per-call values (the tensors' contents, the scale, p's value,
the seed and the offset), and a new one is made when anything that selects the launches changes: a stride, a dtype,
a pointer's 16-byte alignment, p > 0, the bias, the grads needed, the seed's kind. A replayed plan gives bit for bit
what a fresh plan gives for the same call. Runs on the CPU under TRITON_INTERPRET=1 (or on a GPU); the direct
relaunch of compiled kernels that replayed plans do on a GPU is checked against triton's JIT in
tests/test_triton_fast_launch.py.
"""
import pytest
import torch

from conftest import TRITON_PYTHONS, triton_device_or_skip
from triton_recorder import run_script

DEV = triton_device_or_skip()

from lora_kernels.backends.triton import launch as tb  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

M, K, N, R = 37, 40, 24, 8  # M > SMALL_M is not needed: both forward paths are planned the same way


@pytest.fixture
def planned(monkeypatch):
    """Counts the plans made (forward, backward) from here on, with an empty plan table."""
    monkeypatch.setattr(tb, "_PLANS", {})
    made = {"fwd": 0, "bwd": 0}
    real_fwd, real_bwd = tb._plan_forward, tb._plan_backward

    def plan_forward(*args, **kwargs):
        made["fwd"] += 1
        return real_fwd(*args, **kwargs)

    def plan_backward(*args, **kwargs):
        made["bwd"] += 1
        return real_bwd(*args, **kwargs)

    monkeypatch.setattr(tb, "_plan_forward", plan_forward)
    monkeypatch.setattr(tb, "_plan_backward", plan_backward)
    return made


def _inputs(dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    A, B = torch.randn(R, K, generator=g) / K**0.5, torch.randn(N, R, generator=g) / R**0.5
    dy = torch.randn(M, N, generator=g).to(dtype)
    return [t.to(DEV) for t in (x, W, b, A, B, dy)]


def _step(x, W, b, A, B, dy, s=0.5, p=0.0, seed=1234, offset=0, need=(True, True, True)):
    y, u = tb.forward(x, W, b, A, B, s, p, seed, offset)
    return (y, u) + tuple(tb.backward(dy, x, W, A, B, u, s, p, seed, offset, *need))


def _misaligned(t):
    """t's values at a pointer 2 bytes past a 16-byte boundary (another specialization for the JIT)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def test_plan_is_reused(planned):
    x, W, b, A, B, dy = _inputs()
    _step(x, W, b, A, B, dy)
    assert planned == {"fwd": 1, "bwd": 1}
    plans = dict(tb._PLANS)
    # new tensors of the same kind, new scale, p, seed and offset: the same plans
    x2, W2, b2, A2, B2, dy2 = _inputs(seed=1)
    _step(x2, W2, b2, A2, B2, dy2, s=2.0, seed=2**63 + 5, offset=64)
    assert planned == {"fwd": 1, "bwd": 1}
    assert tb._PLANS == plans
    _step(x, W, b, A, B, dy, p=0.25)  # p > 0: new plans, reused for another p > 0
    _step(x, W, b, A, B, dy, p=0.5, seed=7)
    assert planned == {"fwd": 2, "bwd": 2}


def test_new_plan_for_each_specialization(planned):
    x, W, b, A, B, dy = _inputs()
    _step(x, W, b, A, B, dy)
    made = dict(planned)
    variants = {
        "x strides": lambda: _step(x.t().contiguous().t(), W, b, A, B, dy),
        "W misaligned": lambda: _step(x, _misaligned(W), b, A, B, dy),
        "x misaligned": lambda: _step(_misaligned(x), W, b, A, B, dy),
        "dtype": lambda: _step(*_inputs(torch.float32)),
        "p > 0": lambda: _step(x, W, b, A, B, dy, p=0.1),
        "no bias": lambda: _step(x, W, None, A, B, dy),
        "adapters in x's dtype": lambda: _step(x, W, b, A.half(), B.half(), dy),
        "seed in memory": lambda: _step(x, W, b, A, B, dy, p=0.1, seed=torch.tensor(1234, device=DEV)),
    }
    for name, call in variants.items():
        call()
        assert planned["fwd"] == made["fwd"] + 1, name
        made = dict(planned)
    for need in ((True, False, False), (False, True, True), (True, True, False)):  # the grads needed: backward only
        _step(x, W, b, A, B, dy, need=need)
        assert planned == {"fwd": made["fwd"], "bwd": made["bwd"] + 1}, need
        made = dict(planned)
    count = len(tb._PLANS)
    for call in variants.values():  # every one of them is kept: the repeats plan nothing
        call()
    assert planned == made and len(tb._PLANS) == count


@pytest.mark.parametrize("small_m", [True, False], ids=["small_m", "tiled"])
def test_replayed_plan_matches_fresh_plan(monkeypatch, small_m):
    """Per-call values (contents, scale, p, seed as an int or in memory, offset) reach a replayed plan's launches: each
    call gives bit for bit what a plan made for it alone gives."""
    monkeypatch.setattr(tb, "SMALL_M", 64 if small_m else 0)
    monkeypatch.setattr(tb, "_PLANS", {})
    calls = [dict(s=0.5, p=0.0, seed=0, offset=0), dict(s=2.0, p=0.3, seed=0x1234_5678_9ABC, offset=2**32 - 7),
             dict(s=0.75, p=0.1, seed=2**63 + 48, offset=5), dict(s=1.5, p=0.3, seed=16, offset=64)]
    replayed, fresh = [], []
    for i, kw in enumerate(calls):
        for seed_in_mem in (False, True):
            args = _inputs(seed=i)
            kw = dict(kw, seed=torch.tensor(kw["seed"] - 2**64 if kw["seed"] >= 2**63 else kw["seed"], device=DEV)
                      if seed_in_mem else kw["seed"])
            replayed.append(_step(*args, **kw))
            saved = tb._PLANS
            monkeypatch.setattr(tb, "_PLANS", {})  # a plan made for this call alone, run once
            fresh.append(_step(*args, **kw))
            monkeypatch.setattr(tb, "_PLANS", saved)
    assert len(tb._PLANS) == 2 * 2 * 2  # (p = 0, p > 0) x (int seed, seed in memory) x (forward, backward)
    for a, b in zip(replayed, fresh):
        for got, want in zip(a, b):
            assert torch.equal(got, want)


def test_degenerate_shapes_plan_nothing(planned):
    x, W, b, A, B, dy = _inputs()
    y, u = tb.forward(x[:0], W, b, A, B, 0.5, 0.0, 0, 0)
    assert y.shape == (0, N) and u.shape == (0, R)
    dx, dA, dB = tb.backward(dy[:, :0], x, W[:0], A, B[:0], u, 0.5, 0.0, 0, 0, True, True, True)
    assert (dx == 0).all() and (dA == 0).all() and dB.shape == (0, R)
    assert planned == {"fwd": 0, "bwd": 0}


def test_tuning_plan_is_not_kept():
    """A plan whose launch tunes runs once: the next call plans again, with the tuned config."""
    x, W, b, A, B, dy = _inputs()
    pl = tb._Planner(x, False, False)
    pl.launch_tuned(("no such key",), None, None, lambda cfg: (1,), (), {})
    assert not pl.finish(()).keep
    pl = tb._Planner(x, False, False)
    pl.launch(tb._shrink_kernel, (1,), (), {})
    assert pl.finish(()).keep


def _kahan_sum(p):
    """_sum_partials_kernel's fp32 sum over the split dim, op for op: compensated (Kahan), in split order, the
    compensation dropped where the sum is not finite."""
    acc, comp = torch.zeros_like(p[0]), torch.zeros_like(p[0])
    for s in range(p.shape[0]):
        y = p[s] - comp
        t = acc + y
        comp = torch.where(t - t == 0, (t - acc) - y, torch.zeros_like(t))
        acc = t
    return acc


def _running_sum(p):
    acc = torch.zeros_like(p[0])
    for s in range(p.shape[0]):
        acc += p[s]
    return acc


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_sum_partials_kernel(out_dtype):
    """Two sums of split partials in one launch: each output element is its partials added in the kernel's fixed
    order in fp32 (bit for bit: a compensated sum in split order), stored in its output's dtype; a single sum (no
    second job) too. Outputs start as NaN: every element must be written. An inf partial gives inf, not NaN."""
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(70, 7, 33, generator=g).to(DEV)  # 231 elements: 4 blocks of 64, the last one partial
    p1 = torch.randn(1, 9, 4, generator=g).to(DEV)  # one split: a conversion
    o0 = torch.full((7, 33), float("nan"), device=DEV)
    o1 = torch.full((9, 4), float("nan"), dtype=out_dtype, device=DEV)
    b0, b1 = 4, 1
    tb._sum_partials_kernel[(b0 + b1,)](p0, o0, 231, 70, p1, o1, 36, 1, b0, BLOCK=64)
    assert torch.equal(o0, _kahan_sum(p0))
    assert torch.equal(o1, p1[0].to(out_dtype))
    o0.fill_(float("nan"))
    p0[5, 0, 0], p0[9, 0, 1], p0[12, 0, 1] = float("inf"), float("inf"), float("-inf")
    tb._sum_partials_kernel[(b0,)](p0, o0, 231, 70, p0, o0, 0, 0, b0, BLOCK=64)  # one sum alone
    assert torch.equal(o0, _kahan_sum(p0)) or torch.equal(o0.isnan(), _kahan_sum(p0).isnan())
    assert o0[0, 0] == float("inf") and o0[0, 1].isnan()  # as torch's sum: inf, and inf − inf = NaN


def test_sum_partials_error_does_not_grow_with_the_split_count():
    """Many splits (M = 65600 gives the dy pass 1025 blocks): one running fp32 sum's error grows with their count
    (a GPU run found dB at 2.7x the chunked float32 GEMM's error there), and so, more slowly, did groups of 32 splits
    (a GPU run failed this test with them). The kernel's compensated sum stays within 2x the error of torch's own
    float32 sum (a cascade on the CPU, a tree on the GPU) against float64; the running sum does not, on the same
    data."""
    g = torch.Generator().manual_seed(5)
    S, n = 1025, 256
    p = (torch.randn(S, n, generator=g) + 3.0).to(DEV)  # a nonzero mean: the running sum grows, as dB's does
    o = torch.full((n,), float("nan"), device=DEV)
    tb._sum_partials_kernel[(1,)](p, o, n, S, p, o, 0, 0, 1, BLOCK=256)
    ref = p.double().sum(0)

    def err(t):
        return (t.double() - ref).abs().max().item()

    assert torch.equal(o, _kahan_sum(p))
    assert err(o) <= 2 * err(p.sum(0)), (err(o), err(p.sum(0)))  # the tolerance rule; here about 1x on the CPU
    assert err(_running_sum(p)) > 2 * err(p.sum(0))  # the running sum fails the tolerance rule


_SUMS_PTX = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.backends.triton.kernels.sums import _sum_partials_kernel as k

sig = {"p0_ptr": "*fp32", "o0_ptr": "*fp32", "n0": "i32", "S0": "i32", "p1_ptr": "*fp32", "o1_ptr": "*bf16",
       "n1": "i32", "S1": "i32", "blocks0": "i32", "BLOCK": "constexpr"}
key = "BLOCK" if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7) else (9,)  # name, or index
ptx = triton.compile(ASTSource(k, sig, {key: 1024}), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print(json.dumps({op: len(re.findall(op + r"(\.rn)?\.f32", ptx)) for op in ("add", "sub", "fma")}))
"""


@pytest.mark.parametrize("triton_python", TRITON_PYTHONS)
def test_sum_partials_compensation_survives_compilation(triton_python):
    """The compensated sum is algebraically a plain sum: a compiler that reassociated its float adds would fold the
    compensation away. Compiled for sm_90 (no GPU needed), each add of the running sum keeps its four subtractions
    (y = v − comp, t − t, t − acc, − y), and nothing is contracted."""
    ops = run_script(triton_python, _SUMS_PTX, timeout=600)
    assert ops["add"] > 0 and ops["sub"] == 4 * ops["add"] and ops["fma"] == 0, ops


@pytest.mark.parametrize("adapters", [torch.float32, torch.float16], ids=["fp32_adapters", "fp16_adapters"])
@pytest.mark.parametrize("fuse_db", [True, False], ids=["db_in_dy_pass", "db_pass"])
def test_backward_sums_in_one_launch(monkeypatch, planned, adapters, fuse_db):
    """The backward's reductions (dA's and dB's split partials, and their conversion to 16-bit adapters) are one
    launch of _sum_partials_kernel, its last step; no torch op runs between the launches. The grads it gives match
    float64."""
    monkeypatch.setattr(tb, "_FUSE_DB_PARTIAL_RATIO", float("inf") if fuse_db else 0.0)
    steps = []
    real_finish = tb._Planner.finish

    def finish(self, outputs):
        plan = real_finish(self, outputs)
        steps.append(list(self.steps))
        return plan

    monkeypatch.setattr(tb._Planner, "finish", finish)
    x, W, b, A, B, dy = _inputs()
    A, B = A.to(adapters), B.to(adapters)
    s = 0.5
    y, u, dx, dA, dB = _step(x, W, b, A, B, dy, s=s)
    bwd = steps[1]
    kinds = [st[0] for st in bwd]
    assert set(kinds) <= {"empty", "launch", "addmm"}, kinds  # addmm: dx's main loop on cuBLAS (GPU, M > 64)
    sums = [i for i, st in enumerate(bwd) if st[0] == "launch" and st[1] is tb._sum_partials_kernel]
    # one sums launch, the last step, wherever there is something to sum (split partials: 3-D buffers) or to convert
    # (16-bit adapters); with fp32 adapters and one split each (the GPU's plan at this M) each partial is the grad
    split = any(st[0] == "empty" and len(st[2]) == 3 for st in bwd)
    assert sums == ([len(bwd) - 1] if split or adapters != torch.float32 else []), kinds
    x64, W64, A64, B64, dy64 = (t.double() for t in (x, W, A, B, dy))
    g64 = dy64 @ B64
    for got, want in ((dA, s * g64.t() @ x64), (dB, s * dy64.t() @ (x64 @ A64.t()))):
        assert got.dtype == adapters
        err = (got.double() - want).abs().max().item()
        assert err <= 2e-2 * want.abs().max().item(), err  # fp16 x and dy; the fp32 grads round once to fp16
