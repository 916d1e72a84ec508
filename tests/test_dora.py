"""DoRA (lora_kernels.dora_linear): every backend against float64 math, the op's registration (opcheck, gradcheck,
compile), the norm cache, errors, and GPU-only checks. Memory (no N×K temporary, per-chunk backward, the GPU peak):
tests/test_dora_memory.py. PEFT itself: tests/test_dora_peft.py."""
import pytest
import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import dora, ops
from lora_kernels.ops import record_dropout

from conftest import HAS_CUDA, abs_reference, assert_tolerance, backend_cases, dtypes_for

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

CASES = [(b, d, dt) for b, d in backend_cases() for dt in dtypes_for(b, d)]
IDS = [f"{b}-{d}-{str(dt).split('.')[-1]}" for b, d, dt in CASES]

# (lead shape, K, N, r): M = 0, 1, 3, 10, 37, 16; K, N not multiples of 16; r from 1 to 256.
SHAPES = [((0,), 32, 16, 4), ((1,), 48, 40, 1), ((3,), 20, 24, 8), ((2, 5), 72, 36, 16), ((37,), 100, 50, 33),
          ((4, 4), 64, 96, 256)]


def peft_formula(x, W, b, A, B, s, m, keep=None, p=0.0, gemm_in_x_dtype=False):
    """PEFT 0.21's DoRA forward (lora.Linear.forward -> DoraLinearVariant.forward -> DoraLinearLayer.forward)
    written out: float64 inputs give the reference, the inputs' own dtypes the same-precision baseline.

    With dropout PEFT runs a second GEMM, x_d Wᵀ, in the adapters' dtype (float32 for float32 adapters on a 16-bit
    base: the up-cast GEMM that makes it slow). ``gemm_in_x_dtype`` runs that GEMM in x's dtype instead, like the
    base GEMM: the same-precision baseline of the op, which computes both GEMMs over W in x's dtype."""
    base = F.linear(x, W, b)  # base_layer(x)
    xa = x.to(A.dtype)  # _cast_input_dtype to the adapters' dtype
    norm = torch.linalg.norm(W.to(A.dtype) + s * (B @ A).detach(), dim=1).detach()
    g = (m / norm).view(1, -1)
    if keep is None:  # nn.Identity dropout or eval: base_result = base output minus bias
        base_result = base - b if b is not None else base
        lora = F.linear(F.linear(xa, A), B)
    else:  # a second GEMM on the dropped x, in the adapters' dtype
        xd = xa * keep.to(xa.dtype) / (1.0 - p)
        if gemm_in_x_dtype:
            base_result = F.linear(xd.to(x.dtype), W).to(A.dtype)
        else:
            base_result = F.linear(xd, W.to(A.dtype))
        lora = F.linear(F.linear(xd, A), B)
    return (base + ((g - 1) * base_result + g * lora * s)).to(x.dtype)


def make(lead, K, N, r, dtype, device, bias=True, adapter_dtype=None, s=0.75):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, K, device=device).to(dtype)
    W = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    A = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, device=device) / r**0.5).to(adapter_dtype)
    # magnitude: the init value (the row norm) times a random factor, so that g = m / norm is not 1
    norm = torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)
    m = (norm * (0.5 + torch.rand(N, device=device, dtype=torch.float64))).to(adapter_dtype)
    return x, W, b, A, B, m


def next_dropout_seed() -> int:
    """The seed that the next dropout call draws from torch's generator as it stands (the generator left as it was):
    the seed of the contract's mask for a call that is not recorded."""
    state = torch.get_rng_state()
    seed = int(ops._draw_seed())
    torch.set_rng_state(state)
    return seed


def run_and_check(backend, device, dtype, lead, K, N, r, bias, p, adapter_dtype=None, zero_cols=None,
                  scale_cols=None):
    s = 0.75
    x, W, b, A, B, m = make(lead, K, N, r, dtype, device, bias, adapter_dtype, s)
    if zero_cols is not None:  # magnitude 0 there: g = 0, y = b, and z cannot come from y
        m[zero_cols] = 0
    for col, f in (scale_cols or {}).items():  # g scaled by f there (make's g is in [0.5, 1.5))
        m[col] *= f
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    keep = None
    # Not through record_dropout, which keeps the cuda backend's C++ entry out of the way: with dropout the entry
    # runs here, where it takes the call.
    seed = next_dropout_seed() if p > 0 else None
    y = lora_kernels.dora_linear(leaves[0], W, b, *leaves[1:3], s, leaves[3], dropout_p=p, backend=backend)
    if p > 0 and x.numel():
        keep = lora_kernels.dropout_mask(seed, 0, x.shape, p, device=device)
        assert 0 < (~keep).sum() < keep.numel()
    dy = torch.randn_like(y)
    y.backward(dy)

    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
    for name, leaf in zip(("dx", "dA", "dB", "dmagnitude"), leaves):
        assert leaf.grad.dtype == leaf.dtype, name
    check_against_peft(backend, y, [t.grad for t in leaves], x, W, b, A, B, s, m, keep, p, dy)
    return y


def check_against_peft(backend, y, grads, x, W, b, A, B, s, m, keep, p, dy):
    """y and its grads (dx, dA, dB, dmagnitude) for cotangent dy, of a DoRA call on (x, W, b, A, B, s, m) with mask
    keep (None at p = 0), against PEFT's formula in float64 with the tolerance rule: the baseline is the same formula
    in the inputs' precision, with _abs_terms' floor."""
    def formula(cast):
        ts = [cast(t).detach().clone().requires_grad_() for t in (x, A, B, m)]
        out = peft_formula(ts[0], cast(W), None if b is None else cast(b), ts[1], ts[2], s, ts[3], keep, p,
                           gemm_in_x_dtype=True)
        out.backward(dy.to(out.dtype))
        return out, [t.grad for t in ts]

    ref, ref_g = formula(lambda t: t.double())
    base, base_g = formula(lambda t: t)
    ref_abs, abs_g = abs_reference(_abs_terms(W, b, A, B, s, keep, p), (x, A, B, m), dy)
    assert_tolerance(y, ref, base, "y", abs_ref=ref_abs)
    # The fast backends cast adapter tiles to x's dtype for their rank-r GEMMs (their precision policy, as for
    # lora_linear): with float32 adapters on a 16-bit x, the adapter grads carry x-dtype rounding, while PEFT's
    # LoRA path is float32. There the result-rounding floor is x's dtype's (as test_peft_patch.py's 1e-3 floor).
    mixed = backend != "torch" and A.dtype != x.dtype
    for name, got, r64, b0, a64 in zip(("dx", "dA", "dB", "dmagnitude"), grads, ref_g, base_g, abs_g):
        eps_dtype = x.dtype if (mixed and name != "dx") else None
        assert_tolerance(got, r64, b0, name, abs_ref=a64, eps_dtype=eps_dtype)


@pytest.mark.parametrize("s", [2.0, 250.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_dmagnitude_of_recomputed_z_with_float32_adapters(backend, device, dtype, s):
    """Where the backward recomputes z (p > 0), the magnitude's grad Σ_m dy ⊙ z / q / norm meets the tolerance rule
    with its own floor (not x's dtype's, as the other grads of mixed precision): z's base comes from the frozen GEMM
    in x's dtype, as PEFT's base layer, and its LoRA part from dB's product dyᵀ u in float32. Taken whole from the
    backend's forward, z was rounded to x's dtype with its LoRA part (10× PEFT's error on the Triton backend in a
    CPU fuzz, at s = 2 too)."""
    g = torch.Generator().manual_seed(5)
    M, K, N, r, p = 130, 17, 33, 16, 0.1
    x = torch.randn(M, K, generator=g).to(device, dtype)
    W, b = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype), torch.randn(N, generator=g).to(device, dtype)
    A, B = (torch.randn(r, K, generator=g) / K**0.5).to(device), (torch.randn(N, r, generator=g) / r**0.5).to(device)
    m = (torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1) *
         (0.5 + torch.rand(N, generator=g).to(device))).float()
    mg = m.clone().requires_grad_()
    seed = next_dropout_seed()
    y = lora_kernels.dora_linear(x, W, b, A, B, s, mg, dropout_p=p, backend=backend)
    keep = lora_kernels.dropout_mask(seed, 0, x.shape, p, device=device)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    y.backward(dy)

    def dmag(cast):
        mm = cast(m).detach().clone().requires_grad_()
        out = peft_formula(cast(x), cast(W), cast(b), cast(A), cast(B), s, mm, keep, p, gemm_in_x_dtype=True)
        out.backward(dy.to(out.dtype))
        return mm.grad

    assert_tolerance(mg.grad, dmag(lambda t: t.double()), dmag(lambda t: t), "dmagnitude")


def _abs_terms(W, b, A, B, s, keep, p):
    """The float64 formula of abs_reference (tests/conftest.py) for DoRA, as a function of (x, A, B, magnitude).

    DoRA is not multilinear: g = m / ‖W + s·B A‖_row. But PEFT detaches the norm, so every grad treats it as a
    constant positive per-column factor, and with it fixed, y = x Wᵀ + b + (g−1)⊙(x_d Wᵀ) + g⊙(s·x_d Aᵀ Bᵀ) is
    multilinear in (x, W, b, A, B, m) up to the sign of g−1. So: the norm (from the real operands, a constant),
    g−1 replaced by |g−1| as a constant, and the magnitude's grad routed through both GEMM terms (the zero-valued
    (g − g.detach())·(R + L): dm = Σ_m dy ⊙ (R + L) / norm, R and L the two sums). With |operands| and cotangent
    |dy| each result is then the sum of |terms| of PEFT's formula as written (the baseline's: base and the
    (g−1)-scaled x_d Wᵀ are separate sums, whose roundings both count). The norm's own rounding is not in it: a
    relative error of g, which the baseline computes too."""
    norm = torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)
    Wa, ba = W.double().abs(), None if b is None else b.double().abs()

    def f(x, A, B, m):
        g = m / norm
        gc = g.detach()
        xd = x if keep is None else x * keep / (1.0 - p)
        R = F.linear(xd, Wa)
        L = F.linear(F.linear(xd, A), B) * s
        return F.linear(x, Wa, ba) + (gc - 1).abs() * R + gc * L + (g - gc) * (R + L)

    return f


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
def test_against_float64(backend, device, dtype, lead, K, N, r, p):
    run_and_check(backend, device, dtype, lead, K, N, r, bias=True, p=p)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_bias(backend, device, dtype, p):
    run_and_check(backend, device, dtype, (3, 7), 36, 44, 8, bias=False, p=p)


# ------------------------------------------------------------------- the saved output (p = 0, fast backends)
@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
def test_saved_y_with_zero_magnitudes(backend, device, dtype):
    # columns with g = 0 (one alone, two in a row, the last one) take the saved-y recompute; the rest z = (y-b)/g
    run_and_check(backend, device, dtype, (37,), 100, 50, 8, bias=True, p=0.0, zero_cols=[0, 17, 18, 49])


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
def test_saved_y_with_small_magnitudes_and_a_bias(backend, device, dtype):
    # z = (y − b)/g from y amplifies y's rounding (at the bias's scale) by 1/|g|: columns with a bias and |g| < 1/2
    # take the saved-y recompute (g near 1e-3, 0.1, 0.3 and -0.2 here); near 0.7 and 2 from y or recomputed,
    # within the rule either way
    run_and_check(backend, device, dtype, (37,), 100, 50, 8, bias=True, p=0.0,
                  scale_cols={3: 1e-3, 10: 0.1, 11: 0.3, 20: -0.2, 30: 0.7, 49: 2.0})


FAST_16 = [(b, d, dt) for b, d, dt in CASES if b != "torch" and dt != torch.float32]  # the saved-y path, 16-bit x


@pytest.mark.parametrize("K", [1, 3, 64])
@pytest.mark.parametrize("backend,device,dtype", FAST_16, ids=[i for i, c in zip(IDS, CASES) if c in FAST_16])
def test_saved_y_where_the_adapter_dominates_or_cancels(backend, device, dtype, K):
    """y's LoRA part comes from 16-bit operands (s·u and B rounded to x's dtype); PEFT keeps that part in float32.
    Where the adapter's row s·(B A)_n is large against W_n, z = (y − b)/g carries that rounding at the LoRA part's
    scale: columns where it dominates W_n (B scaled 10×) and where it cancels W_n to a tenth. They take
    the saved-y recompute (‖s·(B A)_n‖ > ‖W_n‖ / 2); before it, the interpreted Triton backend failed the rule
    here at K = 1 in both dtypes."""
    s = 0.75
    g = torch.Generator().manual_seed(K)
    x, W, b, A, B, m = make((130,), K, 40, 16, dtype, device, True, torch.float32, s)
    B[0:5] *= 10.0
    lora = s * (B.double() @ A.double())
    W[10:15] = (-0.9 * lora[10:15]).to(dtype)
    norm = torch.linalg.norm(W.double() + lora, dim=1)
    m = (norm * (0.5 + torch.rand(40, generator=g, dtype=torch.float64).to(device))).float()
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    y = lora_kernels.dora_linear(leaves[0], W, b, *leaves[1:3], s, leaves[3], backend=backend)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    y.backward(dy)
    check_against_peft(backend, y, [t.grad for t in leaves], x, W, b, A, B, s, m, None, 0.0, dy)


@pytest.mark.parametrize("r", [16, 40])
@pytest.mark.parametrize("backend,device,dtype", FAST_16, ids=[i for i, c in zip(IDS, CASES) if c in FAST_16])
def test_saved_y_with_every_column_recomputed(backend, device, dtype, r):
    """Every adapter row large against W's (B 10×, as a random init gives): every column takes the saved-y backward's
    recompute of z, over several 64- and 128-column blocks (the last one partial) and row splits (the last one short),
    K a multiple of 8 but not of the K tile (the cuda tensor-core recompute) or not (the CPU case), r in one or two
    32-column chunks of the cuda epilogue's u Bᵀ; all grads against float64 and PEFT's formula."""
    s = 0.75
    M, K, N = (300, 136, 200) if device == "cuda" else (70, 36, 40)
    x, W, b, A, B, m = make((M,), K, N, r, dtype, device, True, torch.float32, s)
    B *= 10.0
    norm = torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)
    g = torch.Generator().manual_seed(M)
    m = (norm * (0.5 + torch.rand(N, generator=g, dtype=torch.float64).to(device))).float()
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    y = lora_kernels.dora_linear(leaves[0], W, b, *leaves[1:3], s, leaves[3], backend=backend)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    y.backward(dy)
    check_against_peft(backend, y, [t.grad for t in leaves], x, W, b, A, B, s, m, None, 0.0, dy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r", [4, 20])
def test_saved_y_colsum_recomputes_the_flagged_columns_only(dtype, r):
    """The saved-y backward's column pass with its recompute (dora_kernels.scale_colsum(from_y=True, recompute=...),
    fast path) against float64, over several column blocks and row splits, K not a multiple of the K tile, r over
    one BR piece: flagged columns (g = 0, a bias and a small g, an adapter row large against W's) get
    Σ_m dy ⊙ (x Wᵀ + u Bᵀ) recomputed, every other column Σ_m dy ⊙ (y − b)/g from the rounded y; g ⊙ dy is written
    over every element of a poisoned buffer. The float32 PyTorch path (fast=False) sets the error scale."""
    from lora_kernels import dora_kernels as dk

    device = "cuda" if HAS_CUDA else "cpu"
    if not dk.triton_usable(torch.device(device)):
        pytest.skip("needs Triton (a GPU, or TRITON_INTERPRET=1)")
    M, K, N = (700, 200, 300) if HAS_CUDA else (75, 40, 40)  # column blocks with a tail; K 8 past a K tile
    gen = torch.Generator().manual_seed(r)
    rn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x, W = rn(M, K).to(device, dtype), (rn(N, K) / K**0.5).to(device, dtype)
    A, B = (rn(r, K) / K**0.5).to(device), (rn(N, r) / r**0.5 / 20).to(device)  # adapters small against W ...
    flagged = torch.zeros(N, dtype=torch.bool)
    big = torch.arange(3, N, 7)
    B[big] *= 40.0  # ... but in these rows
    flagged[big] = True
    g = (torch.rand(N, generator=gen) + 0.75).to(device)
    bias = rn(N).to(device, dtype)
    g[[0, N - 1]] = 0.0  # y = b there: z is lost
    g[[5, 11]] = torch.tensor([1e-3, -0.2], device=device)  # a bias and a small g
    flagged[[0, N - 1, 5, 11]] = True
    s = 0.75
    u = s * (x.float() @ A.t())
    dy = rn(M, N).to(device, dtype)
    wsq = W.float().square().sum(1)
    assert torch.equal(dk.z_lost_from_y(g, bias, B, dk.adapter_gram(A), s, wsq).cpu(), flagged)
    z64 = x.double() @ W.double().t() + u.double() @ B.double().t()
    y = (g.double() * z64 + bias.double()).to(dtype)  # the forward's output, rounded once
    recompute = (x, W, u, A, B, s, wsq)
    poison = torch.full((M, N), 12345.0, device=device).to(dtype)
    dyc, got = dk.scale_colsum(dy, y, g, True, True, True, out=poison, from_y=True, bias=bias, recompute=recompute)
    ref_dyc, torch_got = dk.scale_colsum(dy, y, g, True, True, False, from_y=True, bias=bias, recompute=recompute)
    assert dyc is poison
    torch.testing.assert_close(dyc, ref_dyc, rtol=0, atol=0)  # g ⊙ dy in float32, rounded once: every element
    z_from_y = (y.double() - bias.double()) / torch.where(g == 0, 1.0, g).double()
    want = torch.where(flagged, (dy.double() * z64).sum(0).cpu(), (dy.double() * z_from_y).sum(0).cpu())
    scale = torch.where(flagged, (dy.double().abs() * z64.abs()).sum(0).cpu(),
                        (dy.double().abs() * z_from_y.abs()).sum(0).cpu())
    err = (got.double().cpu() - want).abs()
    torch_err = (torch_got.double().cpu() - want).abs()
    assert torch.isfinite(got).all()
    assert (err <= 2 * torch_err + 4 * torch.finfo(torch.float32).eps * scale).all(), (err / scale).max()


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("save_y", [True, False])
def test_saved_y_or_recompute_same_grads(monkeypatch, backend, device, dtype, save_y):
    # both backward modes against float64 (3-D x, no bias)
    monkeypatch.setattr(dora, "SAVE_Y", save_y)
    run_and_check(backend, device, dtype, (2, 9), 72, 40, 16, bias=False, p=0.0)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
def test_saved_y_modified_in_place_raises(backend, device, dtype):
    # the backward reads the output it returned: changing it in place is autograd's clear error, not wrong grads
    x, W, b, A, B, m = make((6,), 32, 24, 4, dtype, device)
    x.requires_grad_(), m.requires_grad_()
    y = lora_kernels.dora_linear(x, W, b, A, B, 0.75, m, backend=backend)
    keeps_y = backend != "torch"
    y.add_(1.0)
    if keeps_y:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    else:  # the torch backend recomputes z
        y.sum().backward()
        assert torch.isfinite(m.grad).all()


@pytest.mark.parametrize("backend,device", backend_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fp32_adapters_on_half_base(backend, device, p):
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    run_and_check(backend, device, dtype, (5, 3), 56, 40, 16, bias=True, p=p, adapter_dtype=torch.float32)


@pytest.mark.parametrize("backend,device", backend_cases(), ids=lambda v: str(v))
def test_eval_has_no_dropout(backend, device):
    x, W, b, A, B, m = make((6,), 24, 20, 4, torch.float32, device)
    with record_dropout() as calls:
        y_eval = lora_kernels.dora_linear(x, W, b, A, B, 2.0, m, dropout_p=0.5, training=False, backend=backend)
    assert calls == []
    y0 = lora_kernels.dora_linear(x, W, b, A, B, 2.0, m, backend=backend)
    torch.testing.assert_close(y_eval, y0, rtol=0, atol=0)


def test_dropout_is_seeded_by_torch_rng():
    x, W, b, A, B, m = make((9,), 32, 16, 4, torch.float32, "cpu")
    torch.manual_seed(5)
    y1 = lora_kernels.dora_linear(x, W, b, A, B, 1.0, m, dropout_p=0.2)
    torch.manual_seed(5)
    y2 = lora_kernels.dora_linear(x, W, b, A, B, 1.0, m, dropout_p=0.2)
    y3 = lora_kernels.dora_linear(x, W, b, A, B, 1.0, m, dropout_p=0.2)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_backends_agree_on_dropout_mask():
    if "triton" not in [b for b, _ in backend_cases()]:
        pytest.skip("no Triton backend here (needs a GPU or TRITON_INTERPRET=1)")
    device = "cuda" if HAS_CUDA else "cpu"
    x, W, b, A, B, m = make((11,), 40, 24, 8, torch.float32, device)
    ys = []
    for backend in ("torch", "triton"):
        torch.manual_seed(9)
        ys.append(lora_kernels.dora_linear(x, W, b, A, B, 1.5, m, dropout_p=0.4, backend=backend))
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- the registered op and autograd
@pytest.mark.parametrize("save_z", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64_registered_op(p, save_z):
    # g enters the op as an input (the norm is computed outside it and detached), so every input can be checked
    x, W, b, A, B, m = make((2, 3), 20, 12, 4, torch.float64, "cpu")
    g = torch.rand(12, dtype=torch.float64) + 0.5
    seed = torch.tensor(4321, dtype=torch.int64)
    ins = [t.reshape(-1, 20) if i == 0 else t for i, t in enumerate((x, W, b, A, B, g))]
    for t in ins:
        t.requires_grad_()

    def f(x, W, b, A, B, g):
        return torch.ops.lora_kernels.dora_fwd(x, W, b, A, B, g, 1.5, p, seed, 0, "torch", save_z, False)[0]

    assert torch.autograd.gradcheck(f, tuple(ins))


def test_gradcheck_public_op_with_norm_held_fixed():
    # through dora_linear: x, magnitude (the norm does not depend on them) are checked by gradcheck; A and B
    # against float64 autograd of PEFT's formula (their grads exclude the detached norm) in test_against_float64
    x, W, b, A, B, m = make((5,), 16, 10, 3, torch.float64, "cpu")
    x.requires_grad_(), m.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, m: lora_kernels.dora_linear(x, W, b, A, B, 1.25, m), (x, m))


def test_trainable_base_weight_and_bias():
    for p in (0.0, 0.3):
        x, W, b, A, B, m = make((7,), 24, 12, 4, torch.float64, "cpu")
        leaves = [t.clone().requires_grad_() for t in (x, W, b, A, B, m)]
        with record_dropout() as calls:
            y = lora_kernels.dora_linear(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], 1.5, leaves[5],
                                         dropout_p=p)
        keep = lora_kernels.dropout_mask(*calls[0], x.shape, p) if p else None
        dy = torch.randn_like(y)
        y.backward(dy)
        refs = [t.clone().requires_grad_() for t in (x, W, b, A, B, m)]
        peft_formula(refs[0], refs[1], refs[2], refs[3], refs[4], 1.5, refs[5], keep, p).backward(dy)
        for got, want in zip(leaves, refs):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)


def test_opcheck():
    x, W, b, A, B, m = make((9,), 24, 16, 4, torch.float32, "cpu")
    g = torch.rand(16) + 0.5
    seed = torch.tensor(1234, dtype=torch.int64)
    A.requires_grad_(), B.requires_grad_(), g.requires_grad_()
    for p in (0.0, 0.2):
        for save_z in (False, True):
            for save_y in ((False, True) if p == 0.0 and not save_z else (False,)):
                torch.library.opcheck(torch.ops.lora_kernels.dora_fwd.default,
                                      (x, W, b, A, B, g, 0.5, p, seed, 0, "torch", save_z, save_y))
    z, u, dy = torch.randn(9, 16), torch.randn(9, 4), torch.randn(9, 16)
    for p in (0.0, 0.2):
        # a saved z, none (recomputed), or (p = 0) the saved output y
        for zz, is_y in ((z, False), (torch.empty(0), False)) + (((z, True),) if p == 0.0 else ()):
            torch.library.opcheck(torch.ops.lora_kernels.dora_bwd.default,
                                  (dy, x, W, b, A.detach(), B.detach(), g.detach(), u, zz, is_y, 0.5, p, seed, 0,
                                   "torch", True, True, True, True))


class _Tiny(torch.nn.Module):
    def __init__(self, p, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter((torch.randn(32, 24) / 5).to(dtype), requires_grad=False)
        self.a = torch.nn.Parameter(torch.randn(4, 24) / 5)
        self.b = torch.nn.Parameter(torch.randn(32, 4) / 2)
        self.m = torch.nn.Parameter(torch.rand(32) + 0.5)
        self.p = p

    def forward(self, x):
        h = lora_kernels.dora_linear(x, self.w, None, self.a, self.b, 2.0, self.m, dropout_p=self.p,
                                     training=self.training)
        return torch.relu(h).sum(-1)


@pytest.mark.parametrize("p,dtype", [(0.0, torch.float32), (0.1, torch.float32), (0.0, torch.bfloat16)])
def test_torch_compile_fullgraph(p, dtype):
    # bf16 W: the norm's W Aᵀ takes the chunked up-cast path inside the graph
    torch._dynamo.reset()
    m = _Tiny(p, dtype)
    x = torch.randn(3, 5, 24).to(dtype)
    out = torch.compile(m, fullgraph=True)(x)
    out.sum().backward()
    grads = [t.grad.clone() for t in (m.a, m.b, m.m)]
    assert all(torch.isfinite(g).all() for g in grads)
    if p == 0.0:
        m.zero_grad()
        ref = m(x)
        ref.sum().backward()
        torch.testing.assert_close(out, ref)
        for got, want in zip(grads, (m.a.grad, m.b.grad, m.m.grad)):
            torch.testing.assert_close(got, want)


def test_double_backward_raises():
    x, W, b, A, B, m = make((4,), 16, 8, 2, torch.float32, "cpu")
    x.requires_grad_()
    y = lora_kernels.dora_linear(x, W, b, A, B, 1.0, m)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# ------------------------------------------------------------------------------------------------- the norm
def _norm64(W, A, B, s):
    return torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_norm_matches_float64(dtype):
    W = (torch.randn(70, 90) / 9).to(dtype)
    A, B = torch.randn(6, 90) / 9, torch.randn(70, 6) / 3
    got = dora.dora_weight_norm(W, A, B, 2.0)
    assert got.dtype == torch.float32 and got.shape == (70,)
    ref = _norm64(W, A, B, 2.0)
    # PEFT's norm in fp32 (its default: W up-cast to the fp32 adapters' dtype) is the baseline; the reference
    # computes the same by row chunks
    base = torch.linalg.norm(W.float() + 2.0 * (B @ A), dim=1)
    assert (got.double() - ref).abs().max() <= 2 * (base.double() - ref).abs().max()


_TRITON_DEVICES = sorted({d for b, d in backend_cases() if b == "triton"})


@pytest.mark.skipif(not _TRITON_DEVICES, reason="no Triton here (needs a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("N,K,r", [(70, 90, 6), (33, 200, 256), (5, 17, 1), (300, 1000, 64)])
def test_fast_weight_norm_matches_float64(dtype, adapter_dtype, N, K, r):
    # the fast backends' norm: cached ‖W‖², W Aᵀ from one Triton pass over W (every dot mode: 16-bit, the bf16
    # three-piece split of a float32 A, 3xTF32; widened to float32 under the interpreter), one combine kernel
    from lora_kernels.dora_kernels import w_at, weight_norm

    device = _TRITON_DEVICES[-1]  # cuda when there is one
    W = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    A = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, device=device) / r**0.5).to(adapter_dtype)
    wa = w_at(W, A).sum(0)
    wa64 = W.double() @ A.double().t()
    assert (wa.double() - wa64).abs().max() <= 4 * torch.finfo(torch.float32).eps * K**0.5 * wa64.abs().max()
    got = weight_norm(W, A, B, 2.0, dora._weight_sq(W, torch.float32))
    ref = _norm64(W, A, B, 2.0)
    base = torch.linalg.norm(W.float() + 2.0 * (B.float() @ A.float()), dim=1)  # PEFT's: float32, N×K temporaries
    assert got.dtype == torch.float32 and got.shape == (N,)
    e, e0 = (got.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()
    assert e <= 2 * e0 + 2 * torch.finfo(torch.float32).eps * ref.abs().max().item(), (e, e0)


def _cancelling(N, K, r, f, device="cpu", dtype=torch.float32, adapter_dtype=torch.float32):
    """(W, A, B) whose odd rows the adapter (s = 1) cancels to f of their norm: W_n in A's row space and
    B_n = −(1 − f) W_n A⁺, so W_n + (B A)_n = f W_n; the even rows are plain."""
    A = torch.randn(r, K, dtype=torch.float64) / K**0.5
    W = torch.randn(N, K, dtype=torch.float64)
    pinv = torch.linalg.pinv(A)
    W[1::2] = (W[1::2] @ pinv) @ A
    B = torch.randn(N, r, dtype=torch.float64) / 10
    B[1::2] = -(1 - f) * (W[1::2] @ pinv)
    return W.to(device, dtype), A.to(device, adapter_dtype), B.to(device, adapter_dtype)


def _fast_norm_if_any(W, A, B, s):
    from lora_kernels.dora_kernels import weight_norm

    return weight_norm(W, A, B, s, dora._weight_sq(W, torch.float32))


@pytest.mark.parametrize("f", [0.0, 1e-3, 0.05, 0.5])
@pytest.mark.parametrize("which", ["reference", "fast"])
def test_weight_norm_of_cancelling_rows_against_float64(which, f):
    """Rows that the adapter cancels to f of their norm: the expansion ‖W_n‖² + 2s·B_n·(A W_nᵀ) + s²·B_n AAᵀ B_nᵀ
    loses about 1/f² in relative precision there (its float32 rounding is relative to the terms), so those rows are
    summed directly; the error stays within twice PEFT's (the full float32 matrix). f = 0: the norm is 0 (clamped,
    not NaN)."""
    if which == "fast" and not _TRITON_DEVICES:
        pytest.skip("no Triton here (needs a GPU or TRITON_INTERPRET=1)")
    device = _TRITON_DEVICES[-1] if which == "fast" else "cpu"
    W, A, B = _cancelling(40, 96, 6, f, device=device)
    norm = dora.dora_weight_norm if which == "reference" else _fast_norm_if_any
    got = norm(W, A, B, 1.0)
    ref = _norm64(W, A, B, 1.0)
    base = torch.linalg.norm(W + B @ A, dim=1)  # PEFT's: float32, the N×K matrix
    assert torch.isfinite(got).all()
    err = ((got.double() - ref).abs() / ref.clamp_min(1e-30)).cpu()
    err0 = ((base.double() - ref).abs() / ref.clamp_min(1e-30)).cpu()
    if f == 0.0:
        assert (got[1::2].abs() <= 1e-5 * W[1::2].norm(dim=1)).all()
        err, err0 = err[0::2], err0[0::2]
    assert err.max() <= 2 * err0.max() + 4 * torch.finfo(torch.float32).eps, (err.max(), err0.max())


@pytest.mark.parametrize("backend,device", backend_cases())
def test_dora_linear_with_cancelling_rows(backend, device):
    """dora_linear where the adapter cancels some rows of W to 1% of their norm: those rows' g (100 times the
    others') and outputs against float64 with the tolerance rule (from the expansion alone the norm was 2e-3 off
    there: every backend sums such rows directly)."""
    W, A, B = _cancelling(48, 64, 8, 0.01, device=device)
    x, b, m = torch.randn(24, 64, device=device), torch.randn(48, device=device), torch.rand(48, device=device) + 0.5
    y = lora_kernels.dora_linear(x, W, b, A, B, 1.0, m, backend=backend)
    ref = peft_formula(x.double(), W.double(), b.double(), A.double(), B.double(), 1.0, m.double())
    assert_tolerance(y, ref, peft_formula(x, W, b, A, B, 1.0, m), "y")


def _rank_sum_cancelling(K, s, seed=7, N=96, r=16):
    g = torch.Generator().manual_seed(seed)
    W, A, B = torch.randn(N, K, generator=g), torch.randn(r, K, generator=g), torch.randn(N, r, generator=g) / 4
    return g, W, A, B


@pytest.mark.parametrize("K,s", [(1, 1000.0), (1, -30.0), (2, 1000.0), (3, 100.0)])
@pytest.mark.parametrize("which", ["reference", "fast"])
def test_weight_norm_where_the_rank_sum_cancels(which, K, s):
    """The row norm at small K with a large scaling (below): per row within twice PEFT's relative error (the full
    float32 matrix) against float64."""
    if which == "fast" and not _TRITON_DEVICES:
        pytest.skip("no Triton here (needs a GPU or TRITON_INTERPRET=1)")
    device = _TRITON_DEVICES[-1] if which == "fast" else "cpu"
    _, W, A, B = _rank_sum_cancelling(K, s)
    W, A, B = W.to(device), A.to(device), B.to(device)
    got = (dora.dora_weight_norm if which == "reference" else _fast_norm_if_any)(W, A, B, s)
    ref = _norm64(W, A, B, s)
    base = torch.linalg.norm(W + s * (B @ A), dim=1)
    err = ((got.double() - ref).abs() / ref).max().item()
    err0 = ((base.double() - ref).abs() / ref).max().item()
    assert err <= 2 * err0 + 4 * torch.finfo(torch.float32).eps, (err, err0)


@pytest.mark.parametrize("K,s", [(1, 1000.0), (1, -30.0), (2, 1000.0)])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_dora_linear_where_the_rank_sum_cancels(backend, device, K, s):
    """At small K, A's rows are nearly parallel and the rank-r sum B_n A cancels within itself: the expansion's
    terms (2s·B_n·(A W_nᵀ), s²·B_n AAᵀ B_nᵀ) are then small while their products are large, so the float32
    rounding of the quadratic form is large against the row's norm (10× PEFT's error in y at K = 1, s = 1000).
    Such rows are recognised by the sizes of the products themselves and summed directly: g and y within the
    tolerance rule against float64."""
    g, W, A, B = _rank_sum_cancelling(K, s)
    N = W.shape[0]
    x, b = torch.randn(24, K, generator=g), torch.randn(N, generator=g)
    m = torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1).float() * (1 + torch.rand(N, generator=g))
    W, A, B, x, b, m = (t.to(device) for t in (W, A, B, x, b, m))
    y = lora_kernels.dora_linear(x, W, b, A, B, s, m, backend=backend)
    ref = peft_formula(x.double(), W.double(), b.double(), A.double(), B.double(), s, m.double())
    assert_tolerance(y, ref, peft_formula(x, W, b, A, B, s, m), "y")


def _count_wsq(monkeypatch):
    calls = []
    real = dora._weight_sq_compute

    def counting(w, acc):
        calls.append(w.shape)
        return real(w, acc)

    monkeypatch.setattr(dora, "_weight_sq_compute", counting)
    return calls


def test_norm_cache_hits_and_invalidation(monkeypatch):
    calls = _count_wsq(monkeypatch)
    W = torch.nn.Parameter(torch.randn(20, 30) / 5, requires_grad=False)
    A, B = torch.randn(4, 30) / 5, torch.randn(20, 4) / 2

    def check():
        torch.testing.assert_close(dora._weight_sq(W, torch.float32).double(), W.double().square().sum(1),
                                   rtol=1e-5, atol=1e-6)

    check()
    assert len(calls) == 1
    check()
    assert len(calls) == 1, "cache hit expected while W is unchanged"
    with torch.no_grad():
        W.add_(0.5)  # in place: bumps W's version counter
    check()
    assert len(calls) == 2
    with torch.no_grad():
        W.copy_(torch.randn(20, 30))
    check()
    assert len(calls) == 3
    W.data = torch.randn(20, 30)  # new storage, version counter untouched
    check()
    assert len(calls) == 4
    W.data = W.data.t().contiguous().t()  # same values, other strides
    check()
    assert len(calls) == 5
    # the same storage re-allocated in place (as FSDP2 frees and re-gathers an unsharded parameter) and new values
    # written without a version bump: the data pointer differs, so the entry misses
    storage, ptr, version = W.untyped_storage(), W.data_ptr(), W._version
    storage.resize_(storage.nbytes() * 2)  # a new allocation: the old one is freed only after the copy
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(W):
        W.copy_(torch.randn(20, 30))
    assert W.data_ptr() != ptr and W._version == version
    check()
    assert len(calls) == 6
    # dora_linear follows a changed W too
    x, m = torch.randn(5, 30), torch.rand(20) + 0.5
    y1 = lora_kernels.dora_linear(x, W, None, A, B, 1.5, m)
    with torch.no_grad():
        W.mul_(2.0)
    y2 = lora_kernels.dora_linear(x, W, None, A, B, 1.5, m)
    ref2 = peft_formula(x.double(), W.double(), None, A.double(), B.double(), 1.5, m.double())
    torch.testing.assert_close(y2.double(), ref2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y1, y2)


def test_norm_cache_documented_blind_spot(monkeypatch):
    # an in-place change at the same address through .data bypasses the version counter: the cache cannot see it
    # (documented); clear_weight_norm_cache() is the remedy
    calls = _count_wsq(monkeypatch)
    W = torch.randn(8, 12)
    dora._weight_sq(W, torch.float32)
    W.data.mul_(3.0)
    dora._weight_sq(W, torch.float32)
    assert len(calls) == 1
    dora.clear_weight_norm_cache()
    torch.testing.assert_close(dora._weight_sq(W, torch.float32).double(), W.double().square().sum(1),
                               rtol=1e-5, atol=1e-6)
    assert len(calls) == 2


def test_norm_cache_does_not_keep_weights_alive():
    import gc
    import weakref

    W = torch.randn(16, 16)
    dora._weight_sq(W, torch.float32)
    ref = weakref.ref(W)
    del W
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(not _TRITON_DEVICES, reason="no Triton here (needs a GPU or TRITON_INTERPRET=1)")
def test_fast_norm_uses_the_cache(monkeypatch):
    # the fast backends take ‖W_n‖² from the same cache (one fill per W), and follow a changed W
    calls = _count_wsq(monkeypatch)
    device = _TRITON_DEVICES[-1]
    x, W, b, A, B, m = make((6,), 40, 24, 4, torch.float32, device)
    W = torch.nn.Parameter(W, requires_grad=False)
    for _ in range(3):
        y1 = lora_kernels.dora_linear(x, W, b, A, B, 1.5, m, backend="triton")
    assert len(calls) == 1
    with torch.no_grad():
        W.mul_(0.5)
    y2 = lora_kernels.dora_linear(x, W, b, A, B, 1.5, m, backend="triton")
    assert len(calls) == 2
    ref = peft_formula(x.double(), W.double(), b.double(), A.double(), B.double(), 1.5, m.double())
    torch.testing.assert_close(y2.double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y1, y2)


# ------------------------------------------------------------------------------------------------- errors
def _good(dtype=torch.float32):
    return make((4,), 16, 8, 2, dtype, "cpu")


def test_bad_magnitude_errors():
    x, W, b, A, B, m = _good()
    cases = [
        (torch.rand(9), "magnitude must have shape \\(N=8,\\)"),
        (torch.rand(8, 1), "magnitude must have shape"),
        (torch.rand(8, dtype=torch.float16), "magnitude dtype torch.float16 must be float32 or x's dtype"),
        (torch.arange(8), "magnitude dtype torch.int64"),
        ([1.0] * 8, "magnitude must be a Tensor"),
        (torch.rand(8, device="meta"), "magnitude is on meta but x is on cpu"),
    ]
    for mag, msg in cases:
        with pytest.raises(ValueError, match=msg):
            lora_kernels.dora_linear(x, W, b, A, B, 1.0, mag)


def test_shared_checks_name_dora_linear():
    x, W, b, A, B, m = _good()
    with pytest.raises(ValueError, match="dora_linear: lora_B must have shape"):
        lora_kernels.dora_linear(x, W, b, A, B.t(), 1.0, m)
    with pytest.raises(ValueError, match="dora_linear: dropout_p must be in"):
        lora_kernels.dora_linear(x, W, b, A, B, 1.0, m, dropout_p=1.5)
    with pytest.raises(ValueError, match="dora_linear: x must be a Tensor"):
        lora_kernels.dora_linear(None, W, b, A, B, 1.0, m)
    with pytest.raises(ValueError, match="dora_linear: x's last dim"):
        lora_kernels.dora_linear(x[:, :5], W, b, A, B, 1.0, m)
    with pytest.raises(ValueError, match="unknown backend"):
        lora_kernels.dora_linear(x, W, b, A, B, 1.0, m, backend="nope")


def test_float64_needs_float64_adapters():
    x, W, b, A, B, m = _good(torch.float64)
    with pytest.raises(ValueError, match="float64 x needs float64 lora_A, lora_B and magnitude"):
        lora_kernels.dora_linear(x, W, b, A.float(), B, 1.0, m)
    with pytest.raises(ValueError, match="float64 x needs float64"):
        lora_kernels.dora_linear(x, W, b, A, B, 1.0, m.float())


def test_half_magnitude_on_half_x_is_accepted():
    x, W, b, A, B, m = _good(torch.float16)
    assert m.dtype == torch.float16
    y = lora_kernels.dora_linear(x, W, b, A, B, 1.0, m)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


# ------------------------------------------------------------------ the backends' backward_dx_from (DoRA's backward)
def _dx_from_cases():
    return [(b, d, dt) for b, d, dt in CASES if hasattr(lora_kernels._dispatch.get(b), "backward_dx_from")
            and lora_kernels._dispatch.get(b).backward_dx_from is not None]


@pytest.mark.parametrize("backend,device,dtype", _dx_from_cases(),
                         ids=[f"{b}-{d}-{str(dt).split('.')[-1]}" for b, d, dt in _dx_from_cases()])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backend_backward_dx_from(backend, device, dtype, p):
    """dx = dx_from W + s·keep/(1−p)·(dy B) A, dA and dB from dy (lora_kernels/backends/__init__.py), against the
    float64 formula; dA and dB bit-equal to the plain backward's."""
    be = lora_kernels._dispatch.get(backend)
    M, K, N, r, s, seed = 37, 72, 40, 8, 0.75, 1234
    x, W, _, A, B, _ = make((M,), K, N, r, dtype, device, bias=False)
    dy, dxf = torch.randn(M, N, device=device).to(dtype), torch.randn(M, N, device=device).to(dtype)
    u = be.forward(x, W, None, A, B, s, p, seed, 0)[1]
    dx, dA, dB = be.backward_dx_from(dy, x, W, A, B, u, dxf, s, p, seed, 0, True, True, True)
    keep = lora_kernels.dropout_mask(seed, 0, (M, K), p, device=device) if p > 0 else None

    def ref(dyy, dxff, xx, WW, AA, BB, uu):
        acc = torch.promote_types(AA.dtype, torch.float32)
        v = dyy.to(acc) @ BB.to(acc)
        term = s * (v @ AA.to(acc))
        xd = xx.to(acc)
        if keep is not None:
            term, xd = term * keep / (1.0 - p), xd * keep / (1.0 - p)
        return (((dxff @ WW).to(acc) + term).to(xx.dtype), (s * v.t() @ xd).to(AA.dtype),
                (dyy.to(acc).t() @ uu.to(acc)).to(BB.dtype))

    r64 = ref(*(t.double() for t in (dy, dxf, x, W, A, B, u)))
    base = ref(dy, dxf, x, W, A, B, u)
    for out, want, b0, name in zip((dx, dA, dB), r64, base, ("dx", "dA", "dB")):
        assert out.dtype == b0.dtype, name
        assert_tolerance(out, want, b0, name)
    _, dA0, dB0 = be.backward(dy, x, W, A, B, u, s, p, seed, 0, False, True, True)
    assert torch.equal(dA, dA0) and torch.equal(dB, dB0)


@pytest.mark.parametrize("backend,device,dtype", [c for c in _dx_from_cases() if c[2] != torch.float64],
                         ids=lambda v: str(v))
def test_backward_is_one_backend_call(monkeypatch, backend, device, dtype):
    """At p = 0 with y kept, DoRA's backward makes one backend call (backward_dx_from) for dx, dA and dB."""
    be = lora_kernels._dispatch.get(backend)
    calls = []
    real_from, real_bwd = be.backward_dx_from, be.backward
    monkeypatch.setattr(be, "backward_dx_from", lambda *a: calls.append("dx_from") or real_from(*a))
    monkeypatch.setattr(be, "backward", lambda *a: calls.append("backward") or real_bwd(*a))
    monkeypatch.setattr(be, "dora_entry", None, raising=False)  # the Python path (the C++ entry's is the same call)
    run_and_check(backend, device, dtype, (2, 9), 72, 40, 16, bias=True, p=0.0)
    assert calls == ["dx_from"]


# ------------------------------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def _gpu_backends():
    return [b for b in ("torch", "triton", "cuda") if b in lora_kernels.available_backends()]


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_norm_cache_hit_on_another_stream(backend):
    """‖W_n‖² cached by a call on one stream and hit by a call on another: the hit waits for the reduction, which is
    still queued on the first stream behind a long sleep. The reduction's output block was filled with NaN just
    before (the same stream's pool hands it out again), so a hit that does not wait reads NaN."""
    if backend not in lora_kernels.available_backends():
        pytest.skip(f"no {backend} backend here")
    dora.clear_weight_norm_cache()
    x, W, b, A, B, m = make((64,), 1024, 4096, 16, torch.bfloat16, "cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.no_grad():
        with torch.cuda.stream(s1):
            poison = torch.full((W.shape[0],), float("nan"), device="cuda")
            del poison
            torch.cuda._sleep(100_000_000)  # tens of milliseconds: the reduction below runs after it
            y1 = lora_kernels.dora_linear(x, W, b, A, B, 1.5, m, backend=backend)
        with torch.cuda.stream(s2):
            y2 = lora_kernels.dora_linear(x, W, b, A, B, 1.5, m, backend=backend)
        torch.cuda.synchronize()
        y3 = lora_kernels.dora_linear(x, W, b, A, B, 1.5, m, backend=backend)
    ref = peft_formula(x.double(), W.double(), b.double(), A.double(), B.double(), 1.5, m.double())
    assert torch.isfinite(y2).all()
    torch.testing.assert_close(y3.double(), ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(y1, y3) and torch.equal(y2, y3)


@gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_bf16_fp32_adapters_every_backend(p):
    for backend in _gpu_backends():
        run_and_check(backend, "cuda", torch.bfloat16, (4, 128), 512, 384, 16, bias=True, p=p,
                      adapter_dtype=torch.float32)
        run_and_check(backend, "cuda", torch.bfloat16, (300,), 1024, 256, 64, bias=False, p=p)
