"""Tests of the Triton backend against float64 math (runs on the CPU with TRITON_INTERPRET=1).

Tolerance rule: error vs float64 <= 2 * (error of the same computation done by torch in the same precision)
+ a small absolute floor. The dropout mask must be bit-identical to ``lora_kernels.philox.dropout_mask``.
"""
import os

import pytest
import torch

from conftest import HAS_CUDA, triton_device_or_skip

DEV = triton_device_or_skip()

from lora_kernels.backends.triton import launch as tb  # noqa: E402
from lora_kernels.philox import dropout_mask  # noqa: E402

# Outputs start as NaN (conftest.poisoned_outputs): an unwritten element fails the finiteness checks.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")

DTYPES = [torch.float16, torch.float32, torch.bfloat16]
SEED, OFFSET = 0x1234_5678_9ABC, (1 << 32) - 7  # counters cross the 32-bit boundary inside a tile


def _eps(dtype):
    return torch.finfo(dtype).eps


def _check(name, got, ref64, same_prec, dtype):
    """max|got - ref64| <= 2 * max|same_prec - ref64| + floor, and no NaN/inf."""
    assert got.shape == ref64.shape, (name, got.shape, ref64.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.numel() == 0:
        return
    got, same_prec = got.double().cpu(), same_prec.double().cpu()
    ref64 = ref64.cpu()
    err = (got - ref64).abs().max().item()
    torch_err = (same_prec - ref64).abs().max().item()
    floor = _eps(dtype) * (ref64.abs().max().item() + 1.0)
    assert err <= 2 * torch_err + floor, f"{name}: err {err:.3g} > 2 * torch err {torch_err:.3g} + {floor:.3g}"


def _math(x, W, b, A, B, dy, s, p, keep, dtype):
    """The contract in float64 (dtype=None) or in torch at x's precision (adapters cast to x's dtype)."""
    cast = (lambda t: t.double()) if dtype is None else (lambda t: t.to(dtype))
    x, W, A, B, dy = cast(x), cast(W), cast(A), cast(B), cast(dy)
    keep = keep.to(x.dtype)
    q = 1.0 - p
    xd = x * keep / q
    u = s * (xd @ A.T)
    y = x @ W.T + u @ B.T
    if b is not None:
        y = y + cast(b)
    g = dy @ B
    dx = dy @ W + s * keep / q * (g @ A)
    dA = s * (g.T @ xd)
    dB = dy.T @ u
    return u, y, dx, dA, dB


def _inputs(M, K, N, R, dtype, bias, adapter_fp32, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen)
    ad = torch.float32 if adapter_fp32 else dtype
    x, W = rnd(M, K).to(dtype), (rnd(N, K) / K**0.5).to(dtype)
    b = rnd(N).to(dtype) if bias else None
    A, B = (rnd(R, K) / K**0.5).to(ad), (rnd(N, R) / R**0.5).to(ad)
    dy = rnd(M, N).to(dtype)
    return [t.to(DEV) if t is not None else None for t in (x, W, b, A, B, dy)]


# (M, K, N, R, p, bias, fp32 adapters)
CASES = [
    (1, 20, 24, 1, 0.0, True, False),
    (3, 64, 72, 8, 0.3, False, True),
    (37, 100, 24, 33, 0.3, True, True),
    (37, 20, 72, 8, 0.0, False, True),
    (3, 100, 72, 33, 0.0, True, False),
    (37, 64, 24, 1, 0.3, True, False),
    (70, 36, 40, 16, 0.3, True, True),  # M > SMALL_M: the tiled path without patching
]


@pytest.fixture(params=["small_m", "tiled"])
def fwd_path(request, monkeypatch):
    """Forward through the one-launch small-M kernel (M <= SMALL_M) or the shrink + tiled GEMM path."""
    monkeypatch.setattr(tb, "SMALL_M", 64 if request.param == "small_m" else 0)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}_K{}_N{}_r{}_p{}_b{}_a32{}".format(*c))
def test_forward_backward_vs_float64(case, dtype, fwd_path):
    M, K, N, R, p, bias, adapter_fp32 = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x, W, b, A, B, dy = _inputs(M, K, N, R, dtype, bias, adapter_fp32, gen)
    s = 0.75
    keep = dropout_mask(SEED, OFFSET, (M, K), p).to(DEV)
    y, u = tb.forward(x, W, b, A, B, s, p, SEED, OFFSET)
    assert u.dtype == torch.float32 and u.shape == (M, R)
    assert y.dtype == dtype and y.shape == (M, N)
    dx, dA, dB = tb.backward(dy, x, W, A, B, u, s, p, SEED, OFFSET, True, True, True)
    assert dx.dtype == dtype and dA.dtype == A.dtype and dB.dtype == B.dtype

    ref = _math(x.cpu(), W.cpu(), None if b is None else b.cpu(), A.cpu(), B.cpu(), dy.cpu(), s, p,
                keep.cpu(), None)
    same = _math(x, W, b, A, B, dy, s, p, keep, dtype)  # fp32: full-fp32 dots, as the kernels' default
    # dB uses the kernel's own u (as autograd would), so its reference is built from that u
    ref_dB = dy.cpu().double().T @ u.cpu().double()
    same_dB = (dy.T @ u.to(dtype))
    for name, got, r64, sp in [("u", u, ref[0], same[0]), ("y", y, ref[1], same[1]), ("dx", dx, ref[2], same[2]),
                               ("dA", dA, ref[3], same[3]), ("dB", dB, ref_dB, same_dB)]:
        _check(name, got, r64, sp, dtype)


def test_mask_bit_identical(fwd_path):
    """With A = I (r = K), W = 0: u and dx expose the keep mask element by element."""
    M, K, N = 37, 22, 24
    p, s = 0.4, 1.0
    gen = torch.Generator().manual_seed(1)
    x = (torch.randint(1, 8, (M, K), generator=gen).float()).to(DEV)  # exact in every precision, never 0
    A = torch.eye(K, device=DEV)
    W = torch.zeros(N, K, device=DEV)
    B = torch.zeros(N, K, device=DEV)
    B[0] = 1.0
    for seed, offset in [(SEED, OFFSET), (7, 0), (2**63 + 5, 3 * 2**32 + 11)]:
        keep = dropout_mask(seed, offset, (M, K), p).to(DEV)
        _, u = tb.forward(x, W, None, A, B, s, p, seed, offset)
        assert torch.equal(u != 0, keep), f"forward mask differs for seed={seed} offset={offset}"
        assert torch.allclose(u, x * keep / (1 - p))
        dy = torch.zeros(M, N, device=DEV)
        dy[:, 0] = 1.0  # g = dy @ B = ones (M, K); dx = keep / q
        dx, dA, _ = tb.backward(dy, x, W, A, B, u, s, p, seed, offset, True, True, False)
        assert torch.equal(dx != 0, keep), "backward (dx) mask differs"
        # dA = g^T @ (keep * x) / q with g = 1: column sums of the kept x
        ref_dA = (x * keep / (1 - p)).sum(0).expand(K, K)
        assert torch.allclose(dA, ref_dA, rtol=1e-5), "backward (dA) mask differs"


def test_need_flags_and_empty():
    gen = torch.Generator().manual_seed(2)
    x, W, b, A, B, dy = _inputs(5, 20, 24, 8, torch.float32, True, True, gen)
    y, u = tb.forward(x, W, b, A, B, 2.0, 0.3, SEED, OFFSET)
    full = tb.backward(dy, x, W, A, B, u, 2.0, 0.3, SEED, OFFSET, True, True, True)
    for flags in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        out = tb.backward(dy, x, W, A, B, u, 2.0, 0.3, SEED, OFFSET, *flags)
        for want, got, ref in zip(flags, out, full):
            assert (got is not None) == want
            if want:
                assert torch.equal(got, ref), "results must not depend on which grads are requested"
    # M == 0
    x0, dy0 = x[:0], dy[:0]
    y0, u0 = tb.forward(x0, W, b, A, B, 2.0, 0.3, SEED, OFFSET)
    assert y0.shape == (0, 24) and u0.shape == (0, 8) and u0.dtype == torch.float32
    dx0, dA0, dB0 = tb.backward(dy0, x0, W, A, B, u0, 2.0, 0.3, SEED, OFFSET, True, True, True)
    assert dx0.shape == (0, 20)
    assert dA0.shape == (8, 20) and not dA0.any() and dB0.shape == (24, 8) and not dB0.any()


def test_deterministic():
    gen = torch.Generator().manual_seed(3)
    x, W, b, A, B, dy = _inputs(37, 64, 72, 8, torch.float16, True, True, gen)
    outs = []
    for _ in range(2):
        y, u = tb.forward(x, W, b, A, B, 0.5, 0.3, SEED, OFFSET)
        outs.append((y, u) + tb.backward(dy, x, W, A, B, u, 0.5, 0.3, SEED, OFFSET, True, True, True))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


def test_is_available():
    ok, reason = tb.is_available()
    assert ok and isinstance(reason, str)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_db_fused_and_two_pass_agree(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(4)
    x, W, b, A, B, dy = _inputs(37, 20, 72, 8, dtype, False, True, gen)
    _, u = tb.forward(x, W, b, A, B, 1.0, 0.0, SEED, OFFSET)
    outs = []
    for ratio in (0.0, float("inf")):  # two-pass (dB by _shrink_kernel) and fused (_dy_pass_kernel partials)
        monkeypatch.setattr(tb, "_FUSE_DB_PARTIAL_RATIO", ratio)
        outs.append(tb.backward(dy, x, W, A, B, u, 1.0, 0.0, SEED, OFFSET, True, True, True))
    ref = dy.double().cpu().T @ u.double().cpu()
    for dx, dA, dB in outs:
        _check("dB", dB, ref, dy.T @ u.to(dtype), dtype)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_large_rank():
    """r = 130 pads to R_PAD = 256."""
    gen = torch.Generator().manual_seed(5)
    M, K, N, R, p, s = 3, 20, 24, 130, 0.3, 0.5
    x, W, b, A, B, dy = _inputs(M, K, N, R, torch.float16, True, True, gen)
    keep = dropout_mask(SEED, OFFSET, (M, K), p).to(DEV)
    y, u = tb.forward(x, W, b, A, B, s, p, SEED, OFFSET)
    dx, dA, dB = tb.backward(dy, x, W, A, B, u, s, p, SEED, OFFSET, True, True, True)
    ref = _math(x.cpu(), W.cpu(), b.cpu(), A.cpu(), B.cpu(), dy.cpu(), s, p, keep.cpu(), None)
    same = _math(x, W, b, A, B, dy, s, p, keep, torch.float16)
    for name, got, r64, sp in zip(["u", "y", "dx", "dA", "dB"], [u, y, dx, dA, dB], ref, same):
        _check(name, got, r64, sp, torch.float16)


def test_fp32_precision_env(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    x, W, b, A, B, dy = _inputs(3, 20, 24, 8, torch.float32, True, True, gen)
    monkeypatch.setenv("LORA_KERNELS_TRITON_FP32_PRECISION", "ieee")
    y, u = tb.forward(x, W, b, A, B, 1.0, 0.0, SEED, OFFSET)
    ref = x.double() @ W.double().T + b.double() + (x.double() @ A.double().T) @ B.double().T
    assert (y.double() - ref).abs().max().item() < 1e-4
    monkeypatch.setenv("LORA_KERNELS_TRITON_FP32_PRECISION", "fp64")
    with pytest.raises(ValueError):
        tb.forward(x, W, b, A, B, 1.0, 0.0, SEED, OFFSET)


@pytest.mark.skipif(not HAS_CUDA, reason="the autotuner runs on a GPU only")
@pytest.mark.parametrize("M,mainloop", [(5, "cublas"), (100, "triton")])
def test_autotuned_configs_are_reused(monkeypatch, M, mainloop):
    """With autotuning on (the default outside tests), the first call of a problem key tunes and records the
    config; the next call launches it directly. Both calls must match the float64 contract and each other.
    Tuned kernels: the small-M forward (M=5) and the all-Triton GEMM (M=100, LORA_KERNELS_TRITON_MAINLOOP=triton)."""
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("LORA_KERNELS_TRITON_MAINLOOP", mainloop)
    monkeypatch.setattr(tb, "_TUNED", {})
    gen = torch.Generator().manual_seed(9)
    K, N, R, p, s = 72, 40, 8, 0.2, 0.5
    x, W, b, A, B, dy = _inputs(M, K, N, R, torch.float16, True, False, gen)
    keep = dropout_mask(SEED, OFFSET, (M, K), p).to(DEV)
    ref = _math(x.cpu(), W.cpu(), b.cpu(), A.cpu(), B.cpu(), dy.cpu(), s, p, keep.cpu(), None)
    same = _math(x, W, b, A, B, dy, s, p, keep, torch.float16)
    runs = []
    for _ in range(2):
        y, u = tb.forward(x, W, b, A, B, s, p, SEED, OFFSET)
        dx, dA, dB = tb.backward(dy, x, W, A, B, u, s, p, SEED, OFFSET, True, True, True)
        for name, got, r64, sp in zip(["u", "y", "dx", "dA", "dB"], [u, y, dx, dA, dB], ref, same):
            _check(name, got, r64, sp, torch.float16)
        runs.append((y, dx))
    assert len(tb._TUNED) >= 1  # the tuned kernels recorded their configs
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_poison_exposes_unwritten_outputs(monkeypatch):
    """The harness check: with a kernel that writes nothing, the outputs stay NaN (so the checks above would fail)."""

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tb, "_small_m_kernel", _NoLaunch())
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "0")  # the autotuned path holds the real kernel
    gen = torch.Generator().manual_seed(8)
    x, W, b, A, B, _ = _inputs(3, 20, 24, 4, torch.float32, True, False, gen)
    y, u = tb.forward(x, W, b, A, B, 1.0, 0.0, SEED, OFFSET)
    assert torch.isnan(y).all() and torch.isnan(u).all()



# ------------------------------------------------------------------ the rank-r term with fp32 adapters (PEFT's default)
def _rel(a, ref):
    return ((a.double().cpu() - ref).norm() / ref.norm()).item()


# bf16 on the GPU only: the interpreter truncates float32 -> bf16 casts (the GPU rounds to nearest), which alone
# doubles y's error
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("M", [9, 100], ids=lambda m: f"M{m}")  # the small-M one-launch forward; the tiled passes
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_adapters_rank_term_adds_no_rounding(dtype, M, p):
    """PyTorch (PEFT) keeps the LoRA term of fp32 adapters in fp32 and rounds y once, and dx's LoRA term too. So
    must the output passes: where the adapter's rows are large against W's (here 4x, as in tests/test_dora_peft.py's
    model), rounding u (g) and B (A) to x's dtype in the rank-r K-step gave 1.5-1.9x PyTorch's error in y, and a DoRA
    model's magnitude grads past the tolerance rule. Norm-wise error against float64, as a multiple of PyTorch's
    own: at most 1.25 where the pass rounds once (small-M, the TMA main loop, the Triton main loop); the tolerance
    rule's 2 where cuBLAS accumulates into the rank-r term already written in x's dtype (beta = 1: two roundings,
    and u and B rounded there, kernels._rank_expand)."""
    from conftest import formula

    K, N, R, s = 96, 72, 8, 2.0
    gen = torch.Generator().manual_seed(M * 7 + int(p * 10))
    x = torch.randn(M, K, generator=gen).to(dtype)
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    A = torch.randn(R, K, generator=gen) / K**0.5
    B = torch.randn(N, R, generator=gen) * (2.0 / R**0.5)  # ||s B_n A|| about 4 ||W_n||
    dy = torch.randn(M, N, generator=gen).to(dtype)
    keep = dropout_mask(SEED, OFFSET, (M, K), p)
    x, W, b, A, B, dy, keep_d = (t.to(DEV) for t in (x, W, b, A, B, dy, keep))
    tb._GEMM_PATHS.clear()
    y, u = tb.forward(x, W, b, A, B, s, p, SEED, OFFSET)
    dx, _, _ = tb.backward(dy, x, W, A, B, u, s, p, SEED, OFFSET, True, False, False)
    paths = {name: loop for name, _, loop, _ in tb._GEMM_PATHS}

    ins = [x, W, b, A, B]
    ref = [t.detach().cpu().double().requires_grad_() for t in ins]
    same = [t.detach().clone().requires_grad_() for t in ins]
    outs = {}
    for name, ts, kp in (("ref", ref, keep.double()), ("same", same, keep_d.to(dtype))):
        yy = formula(*ts, s, kp if p else None, p)
        yy.backward(dy.to(yy.device, yy.dtype))
        outs[name] = (yy.detach(), ts[0].grad)
    for name, got, i in (("y", y, 0), ("dx", dx, 1)):
        path = paths.get(name, "small_m")  # y with M <= SMALL_M: the one-launch forward (no record)
        bound = 2.0 if path == "cublas" else 1.25
        ratio = _rel(got, outs["ref"][i]) / _rel(outs["same"][i], outs["ref"][i])
        assert torch.isfinite(got).all(), name
        assert ratio <= bound, f"{name} ({path}): {ratio:.3f}x PyTorch's error, bound {bound}"



# ------------------------------------------------------------------ forward_scaled: DoRA's column scale in the epilogue
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,R", [(9, 40, 24, 4), (100, 72, 88, 16), (100, 72, 88, 33), (70, 0, 40, 8)],
                         ids=["small_m", "tiled", "tiled_r33", "K0"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_scaled(dtype, M, K, N, R, bias):
    """forward_scaled: y = c ⊙ (x Wᵀ + s·u Bᵀ) + b with c (N,) fp32 (zeros and negatives among it), against
    float64 and PEFT's computation in x's precision (base rounded, the rest in fp32, one final rounding); u the same
    as forward's, bit for bit. Paths: the one-launch small-M forward; the tiled passes (the Triton main loop under the
    interpreter; on a GPU the TMA kernel at r = 16 and cuBLAS plus one scale pass at r = 33); K = 0."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(M + K + N + R)
    x, W, b, A, B, _ = _inputs(M, K, N, R, dtype, bias, True, gen)
    c = (torch.rand(N, generator=gen) * 3 - 1).to(DEV)
    c[::5] = 0.0
    s = 0.75
    y, u = tb.forward_scaled(x, W, b, A, B, c, s, 0.0, 0, 0)
    y0, u0 = tb.forward(x, W, b, A, B, s, 0.0, 0, 0)
    assert y.dtype == dtype and y.shape == (M, N) and torch.equal(u, u0)
    x64, W64, A64, B64 = (t.double().cpu() for t in (x, W, A, B))
    ref = c.double().cpu() * (x64 @ W64.T + (s * (x64 @ A64.T)) @ B64.T)
    base = F.linear(x, W).float()
    same = c * (base + (s * (x.float() @ A.float().T)) @ B.float().T)
    if bias:
        ref, same = ref + b.double().cpu(), same + b.float()
    _check("y", y, ref, same.to(dtype), dtype)
    assert torch.equal(y[:, ::5].cpu(), (b[::5] if bias else torch.zeros_like(y[0, ::5])).expand(M, -1).cpu())


_TTIR_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.backends.triton import kernels

kernel, constexprs = getattr(kernels, sys.argv[1]), json.loads(sys.argv[2])
names = kernel.arg_names
sig = {n: "constexpr" if n in constexprs else "*fp32" if n.endswith("_ptr")
       else "fp32" if n in ("scale", "lora_scale") else "i32" for n in names}
src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
ir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2)).asm["ttir"]
zeros = set(re.findall(r"(%[\w.#]+) = arith.constant dense<0\.0+e\+00>", ir))
print(json.dumps([m.group(1) in zeros for m in re.finditer(r"= tt\.dot %[\w.#]+, %[\w.#]+, (%[\w.#]+)", ir)]))
"""


@pytest.mark.parametrize("kernel,extra,expected", [("_small_m_kernel", {"U_GIVEN": False}, [False, False, True]),
                                                   ("_small_m_kernel", {"U_GIVEN": True}, [False, True]),
                                                   ("_output_gemm_kernel", {"GROUP_M": 4, "RANK_SPLIT": True},
                                                    [False, True])])
def test_fp32_rank_term_keeps_own_accumulator(kernel, extra, expected):
    """fp32: the rank-r dot must start from zero, not from the x W^T accumulator. Triton's combine pass rewrites
    `acc + dot(a, b, 0)` into `dot(a, b, acc)`, which rounds each of the r terms against the large partial (4.6x
    torch's error at r=256 on an H200); the kernels scale the dot's result so that the rewrite does not apply.
    The kernel is compiled to Triton IR for sm_90 in a subprocess without the interpreter (no GPU needed).
    Expected per tt.dot, in order: does its accumulator start at zero (x W^T and x A^T accumulate over K)."""
    import json
    import subprocess
    import sys

    constexprs = dict(HAS_BIAS=True, HAS_DROPOUT=False, R_PAD=256, DOT_PREC="ieee", BM=16, BN=16, BK=32,
                      COL_SCALE=False, **extra)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _TTIR_SCRIPT, kernel, json.dumps(constexprs)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


_SMEM_SCRIPT = r"""
import itertools, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.backends.triton import configs as tc
from lora_kernels.backends.triton import kernels

ELT = {"fp16": 2, "bf16": 2, "fp32": 4}
kernel = kernels._small_m_kernel
names = kernel.arg_names


def compile_cfg(bm, bn, bk, stages, warps, xdt, adt, r, u_given, N, K=4096):
    # the specialization a real launch gets: contiguous rows (unit inner strides), 16-byte aligned pointers and
    # multiples of 16 marked divisible (what decides vectorized, pipelined loads)
    const = dict(HAS_BIAS=True, HAS_DROPOUT=False, R_PAD=tc._r_pad(r), DOT_PREC="ieee" if xdt == "fp32" else "tf32",
                 U_GIVEN=u_given, BM=bm, BN=bn, BK=bk, COL_SCALE=True, s_xk=1, s_wk=1, s_ak=1, s_br=1, s_ur=1,
                 s_yn=1)
    ptr = {"x_ptr": xdt, "w_ptr": xdt, "a_ptr": adt, "b_ptr": adt, "bias_ptr": xdt, "cs_ptr": "fp32", "u_ptr": "fp32",
           "up_ptr": "fp32", "y_ptr": xdt}
    ints = dict(M=bm, N=N, K=K, R=r, U_SPLITS=32, s_xm=K, s_wn=K, s_ar=K, s_bn=r, s_um=r, s_up=bm * r, s_ym=N,
                K8=K // 8)
    sig = {n: "constexpr" if n in const else "*" + ptr[n] if n in ptr else "fp32" if n in ("scale",)
           else "i64" if n in ("seed", "offset") else "i32" for n in names}
    div = list(ptr) + [n for n, v in ints.items() if v % 16 == 0]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    return c.metadata.shared, c.asm["ttgir"].count("async_copy_global_to_local")


rows = []
for bm, (xdt, adt), r, u_given in itertools.product([16, 64], [("bf16", "fp32"), ("fp32", "fp32")], [16, 256],
                                                    [False, True]):
    elt, a_elt, r_pad = ELT[xdt], ELT[adt], tc._r_pad(r)
    N = 14336  # BN = 64 on a 132-SM GPU: the largest tiles the heuristic picks
    h = tc._small_m_heuristic(N, bm, elt, a_elt, r_pad, u_given, 132)
    cands = [(h["BN"], h["BK"], h["num_stages"], h["num_warps"])]
    if (bm, xdt, r) in ((16, "bf16", 16), (64, "fp32", 256)):  # the largest autotune candidate, at both extremes
        tuned = tc._small_m_configs(bm, elt, a_elt, r_pad, u_given)
        big = max(tuned, key=lambda c: tc._small_m_smem(bm, c.kwargs["BN"], c.kwargs["BK"], c.num_stages, elt,
                                                        a_elt, r_pad, u_given))
        cands.append((big.kwargs["BN"], big.kwargs["BK"], big.num_stages, big.num_warps))
    for bn, bk, stages, warps in cands:
        shared, copies = compile_cfg(bm, bn, bk, stages, warps, xdt, adt, r, u_given, N)
        est = tc._small_m_smem(bm, bn, bk, stages, elt, a_elt, r_pad, u_given)
        rows.append(dict(cfg=[bm, xdt, adt, r, u_given, bn, bk, stages, warps], shared=shared, estimate=est,
                         pipelined=copies > 0))
print(json.dumps(rows))
"""


def test_small_m_configs_fit():
    """Every small-M config the heuristic picks (and the largest autotune candidate) compiles for sm_90 within its
    shared-memory estimate and the 227 KB limit, with pipelined (cp.async) loads. Compiled by Triton on the host,
    with the specialization a real launch gets (no GPU needed)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SMEM_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 20
    for row in rows:
        assert row["shared"] <= row["estimate"] and row["shared"] <= 227 * 1024, row
        assert row["pipelined"] or row["cfg"][7] == 1, row


# A kernel's Triton IR for sm_90 (argv: kernel name, constexprs and pointer types as JSON), compiled without the
# interpreter; the scripts below read its dots.
_TTIR_OF_KERNEL = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.backends.triton import kernels

kernel, constexprs, ptr_types = getattr(kernels, sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
names = kernel.arg_names
sig = {n: "constexpr" if n in constexprs else ptr_types.get(n, "*fp32") if n.endswith("_ptr")
       else "fp32" if n in ("scale", "lora_scale") else "i64" if n in ("seed", "offset") else "i32" for n in names}
src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
ir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2)).asm["ttir"]
"""

_RANK_DOT_SCRIPT = _TTIR_OF_KERNEL + r"""
dots = [l for l in ir.splitlines() if "tt.dot" in l]
# per dot: (no reduced-precision input mode, both operands fp32); TTIR prints inputPrecision only when not ieee
print(json.dumps({"dots": [("inputPrecision" not in l,
                             bool(re.search(r"tensor<[0-9x]+xf32> \* tensor<[0-9x]+xf32>", l))) for l in dots],
                  "opaque": sum("elementwise_inline_asm" in l for l in ir.splitlines())}))
"""


@pytest.mark.parametrize("kernel,ptrs,extra", [
    ("_shrink_kernel", {"w_ptr": "*bf16", "rk_ptr": "*fp32"}, {"HAS_DROPOUT": True, "W_T": False, "BI": 16, "BJ": 32}),
    ("_dy_pass_kernel", {"dy_ptr": "*bf16", "b_ptr": "*fp32"}, {"NEED_DB": True, "BM": 16, "BN": 32}),
    ("_shrink_kernel", {"w_ptr": "*bf16"}, {"HAS_DROPOUT": False, "W_T": True, "BI": 32, "BJ": 16}),  # dB
    ("_shrink_kernel", {"w_ptr": "*bf16"}, {"HAS_DROPOUT": True, "W_T": True, "BI": 32, "BJ": 16})],  # dA
    ids=["shrink", "dy_pass", "dB", "dA"])
@pytest.mark.parametrize("rank_f32", [True, False])
@pytest.mark.parametrize("split", [False, True], ids=["ieee", "bf16x3"])
def test_fp32_adapter_products_are_fp32(kernel, ptrs, extra, rank_f32, split):
    """fp32 adapters on a bf16 x: every adapter product (u, g, dB, dA) is an fp32 "ieee" dot on fp32 operands,
    as PyTorch computes it; with 16-bit adapters they stay 16-bit tensor-core dots. With
    LORA_KERNELS_TRITON_FP32_SPLIT=1 (the default; 0 gives the "ieee" dots) an fp32 product is three bf16 dots (the
    bf16x3 split), each pair of chains kept out of the running sum by an opaque move (no fold into one tensor-core
    accumulation). Compiled for sm_90 in a subprocess without the interpreter (no GPU needed)."""
    import json
    import subprocess
    import sys

    constexprs = dict(R_PAD=16, DOT_PREC="tf32", RANK_F32=rank_f32, **extra)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORA_KERNELS_TRITON_FP32_SPLIT"] = "1" if split else "0"
    out = subprocess.run([sys.executable, "-c", _RANK_DOT_SCRIPT, kernel, json.dumps(constexprs), json.dumps(ptrs)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    dots = res["dots"]
    assert dots, res
    if split and rank_f32:  # 3 bf16 dots per product, 2 opaque moves (piece 0's chain, pieces 1-2's) per product
        assert len(dots) % 3 == 0 and not any(d[1] for d in dots), dots
        assert res["opaque"] == 2 * len(dots) // 3, res
        return
    assert all(d[1] == rank_f32 for d in dots), dots  # operand types
    assert not rank_f32 or all(d[0] for d in dots), dots  # fp32 operands multiply in full precision
    assert res["opaque"] == 0, res


_DOT_SHAPES_SCRIPT = _TTIR_OF_KERNEL + r"""
pat = r"tensor<(\d+)x(\d+)x(\w+)> \* tensor<(\d+)x(\d+)x(\w+)>"
print(json.dumps([[int(m[1]), m[2], m[5]] for m in re.findall(pat, ir)]))  # per dot: K, operand types
"""


_GEMM_BF16 = {"a_ptr": "*bf16", "b_ptr": "*bf16", "bias_ptr": "*bf16", "c_ptr": "*bf16"}
_GEMM_META = {"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 4}


@pytest.mark.parametrize("kernel,ptrs,extra,fp32_dot", [
    ("_small_m_kernel", {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16"},
     {"HAS_BIAS": True, "HAS_DROPOUT": False, "U_GIVEN": True, "BM": 16, "BN": 32, "BK": 32}, (16, "f32", "f32")),
    ("_output_gemm_kernel", _GEMM_BF16, {"HAS_BIAS": True, "HAS_DROPOUT": False, "RANK_SPLIT": True, **_GEMM_META},
     (64, "bf16", "bf16")),
    ("_output_gemm_kernel", _GEMM_BF16,  # dx with dropout
     {"HAS_BIAS": False, "HAS_DROPOUT": True, "RANK_SPLIT": True, **_GEMM_META}, (64, "bf16", "bf16")),
    ("_output_gemm_kernel", _GEMM_BF16, {"HAS_BIAS": True, "HAS_DROPOUT": False, "RANK_SPLIT": False, **_GEMM_META},
     (16, "bf16", "bf16"))],
    ids=["small_m", "output_gemm", "output_gemm_dropout", "cublas_prefill"])
@pytest.mark.parametrize("adapters", ["fp32", "bf16"])
def test_rank_term_dots_of_fp32_adapters(kernel, ptrs, extra, fp32_dot, adapters):
    """The compiled rank-r K-step on a bf16 output (test_fp32_adapters_rank_term_adds_no_rounding's precision). With
    bf16 adapters one bf16 dot of K = R_PAD. With fp32 adapters: in the small-M forward one fp32 "ieee" dot (FFMA, in
    a memory-bound pass); in the output GEMM one bf16 dot of K = 4 R_PAD (the four products of _split2's pieces: one
    dot, not a chain, since three chained dots made ptxas serialise the TMA kernel's wgmmas,
    tests/test_triton_tma_mainloop.py), except in the cuBLAS main loop's prefill (RANK_SPLIT off: u and B rounded,
    K = R_PAD). The main loop is the kernels' other dot (K = BK; U_GIVEN: the small-M kernel takes u from the
    shrink). Compiled for sm_90 in a subprocess without the interpreter (no GPU needed)."""
    import json
    import subprocess
    import sys

    lb = "b_ptr" if kernel == "_small_m_kernel" else "lb_ptr"
    ptrs = dict(ptrs, **{lb: "*" + adapters})
    constexprs = dict(R_PAD=16, DOT_PREC="tf32", COL_SCALE=False, **extra)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _DOT_SHAPES_SCRIPT, kernel, json.dumps(constexprs),
                          json.dumps(ptrs)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dots = sorted(tuple(d) for d in json.loads(out.stdout.strip().splitlines()[-1]))
    rank = fp32_dot if adapters == "fp32" else (16, "bf16", "bf16")
    assert dots == sorted([(32, "bf16", "bf16"), rank]), dots
