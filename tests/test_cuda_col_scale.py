"""The cuda backend's forward with a per-column scale (``cuda_backend.forward_scaled``, DoRA's y = c ⊙ (x Wᵀ + s·u Bᵀ)
+ b): in the fused sm_90 forward's epilogue (lead tiles and u tiles), and by one pass over y on every other path
(small M, the shrink + GEMM path, cuBLAS where the sm_90 GEMM does not take the shape, dropout). GPU-only (skips
elsewhere). y against the float64 formula under the tolerance rule, the baseline being the same formula in x's
dtype (z rounded, then scaled); u bit-equal to the unscaled forward's; outputs poisoned; DoRA's cuda forward takes
this op."""
import pytest
import torch
import torch.nn.functional as F

import lora_kernels

from conftest import HAS_CUDA, assert_tolerance

pytestmark = [
    pytest.mark.usefixtures("poisoned_outputs"),
    pytest.mark.skipif(not HAS_CUDA or "cuda" not in lora_kernels.available_backends(),
                       reason="needs the cuda backend on a GPU"),
]

S = 0.75
SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)


def _cb():
    from lora_kernels.backends import cuda_backend

    return cuda_backend


def _inputs(M, K, N, r, dtype, adapter_dtype, bias):
    def rn(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, device="cuda") * std).to(dt)

    c = torch.rand(N, device="cuda") * 1.5 + 0.25  # DoRA's g: magnitudes over norms, around 1
    return (rn(M, K), rn(N, K, std=K ** -0.5), rn(N) if bias else None, rn(r, K, dt=adapter_dtype, std=K ** -0.5),
            rn(N, r, dt=adapter_dtype, std=r ** -0.5), c)


def _check(x, W, b, A, B, c, p=0.0, seed=0):
    cb = _cb()
    y, u = cb.forward_scaled(x, W, b, A, B, c, S, p, seed, 0)
    keep = lora_kernels.dropout_mask(seed, 0, tuple(x.shape), p, device=x.device) if p > 0 else None

    def formula(xx, WW, bb, AA, BB, cc):
        xd = xx if keep is None else xx * keep / (1.0 - p)
        z = F.linear(xx, WW) + ((S * (xd.to(AA.dtype) @ AA.t())) @ BB.to(AA.dtype).t()).to(xx.dtype)
        acc = torch.promote_types(xx.dtype, torch.float32)
        yy = z.to(acc) * cc.to(acc) + (0.0 if bb is None else bb.to(acc))
        return yy.to(xx.dtype)

    ref = formula(x.double(), W.double(), None if b is None else b.double(), A.double(), B.double(), c.double())
    base = formula(x, W, b, A, B, c)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], W.shape[0])
    assert_tolerance(y, ref, base, "y")
    # u is the unscaled forward's, bit for bit (the same kernels); and a second call gives the same bits
    _, u0 = cb.forward(x, W, b, A, B, S, p, seed, 0)
    assert torch.equal(u, u0)
    y2, _ = cb.forward_scaled(x, W, b, A, B, c, S, p, seed, 0)
    assert torch.equal(y, y2)
    return y


@pytest.fixture
def fused_mode(request):
    previous = _cb().set_fused_forward(request.param)
    yield request.param
    _cb().set_fused_forward(previous)


@pytest.mark.skipif(not SM90, reason="the fused forward runs on compute capability 9.0 only")
@pytest.mark.parametrize("fused_mode", [-1, 1, 2], indirect=True)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
def test_fused_epilogue(fused_mode, bias, dtype, adapter_dtype):
    """The fused forward (default, u tiles, lead tiles) applies the scale and bias in its epilogue: M not a multiple
    of 128, an odd number of 128-column tiles, K not a multiple of 64."""
    M, K, N, r = 300, 200, 648, 16
    x, W, b, A, B, c = _inputs(M, K, N, r, dtype, adapter_dtype, bias)
    assert _cb().forward_path(x, W, b, A, B, 0.0).startswith("sm90 fused")
    _check(x, W, b, A, B, c)


@pytest.mark.parametrize("case", ["small_m", "shrink_gemm", "cublas", "dropout"])
@pytest.mark.parametrize("bias", [True, False])
def test_other_paths(case, bias):
    """Every other path: y without the bias, then one pass that scales it and adds the bias."""
    cb = _cb()
    M, K, N, r, p, previous = 200, 256, 384, 16, 0.0, None
    if case == "small_m":
        M = 16
    elif case == "cublas":
        K = 100  # rows of 200 B: no 16-byte TMA rows, no sm_90 GEMM
    elif case == "dropout":
        p = 0.2
    x, W, b, A, B, c = _inputs(M, K, N, r, torch.bfloat16, torch.float32, bias)
    if case == "shrink_gemm":
        previous = cb.set_fused_forward(0)
    try:
        path = cb.forward_path(x, W, b, A, B, p)
        if case == "small_m":
            assert path == "small_m", path
        else:
            assert not path.startswith(("small_m", "sm90 fused")), path
        if case == "cublas":
            assert path.startswith("cublas"), path
        _check(x, W, b, A, B, c, p=p, seed=1234)
    finally:
        if previous is not None:
            cb.set_fused_forward(previous)


def test_unaligned_scale_and_bad_input():
    """A column scale that is not 16-byte aligned (a view at an odd offset) gives the same y; a wrong dtype, shape
    or device is refused with a message."""
    cb = _cb()
    x, W, b, A, B, c = _inputs(256, 128, 256, 8, torch.bfloat16, torch.float32, True)
    buf = torch.empty(c.numel() + 1, device="cuda")
    buf[1:] = c
    y = _check(x, W, b, A, B, buf[1:])
    y_aligned, _ = cb.forward_scaled(x, W, b, A, B, c, S, 0.0, 0, 0)
    assert torch.equal(y, y_aligned)
    with pytest.raises(RuntimeError, match="col_scale must be float32"):
        cb.forward_scaled(x, W, b, A, B, c.double(), S, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="col_scale must be"):
        cb.forward_scaled(x, W, b, A, B, c[:-1], S, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="col_scale must be a CUDA tensor"):
        cb.forward_scaled(x, W, b, A, B, c.cpu(), S, 0.0, 0, 0)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_forward_takes_it(monkeypatch, p):
    """dora_linear on the cuda backend gets y from forward_scaled (no scale pass of its own), at p = 0 and p > 0,
    and its y still matches the reference backend's under the tolerance rule."""
    cb = _cb()
    calls = []
    real = cb.forward_scaled

    def counting(*args):
        calls.append(args[5].shape)
        return real(*args)

    monkeypatch.setattr(cb, "forward_scaled", counting)
    x, W, b, A, B, _ = _inputs(256, 192, 320, 16, torch.bfloat16, torch.float32, True)
    m = (torch.rand(320, device="cuda") + 0.5).requires_grad_()
    torch.manual_seed(7)  # the same dropout seed for every call below
    y = lora_kernels.dora_linear(x, W, b, A, B, S, m, dropout_p=p, backend="cuda")
    assert calls == [(320,)]
    torch.manual_seed(7)
    ref = lora_kernels.dora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), S, m.double(),
                                   dropout_p=p, backend="torch")
    torch.manual_seed(7)
    base = lora_kernels.dora_linear(x, W, b, A, B, S, m, dropout_p=p, backend="torch")
    assert_tolerance(y, ref, base, "y")
