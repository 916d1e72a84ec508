"""The cuda backend's two ops for DoRA, GPU-only (skips elsewhere):

* ``forward_scaled``, the forward with a per-column scale (y = c ⊙ (x Wᵀ + s·u Bᵀ) + b): in the fused sm_90
  forward's epilogue (lead tiles and u tiles), and by one pass over y on every other path (small M, the shrink + GEMM
  path, cuBLAS where the sm_90 GEMM does not take the shape, dropout). y against the float64 formula under the
  tolerance rule, the baseline being the same formula in x's dtype (z rounded, then scaled); u bit-equal to the
  unscaled forward's.
* ``backward_dx_from``, the backward whose dx takes its frozen product from another operand (dx = dx_from W +
  s·(dy B) A, dA and dB from dy): on the sm_90 dx GEMM, cuBLAS (small M, odd K) and with dropout, against float64.
* ``dora_entry``, dora_linear's eager call in C++ (csrc/dora_autograd.h, csrc/dora_*.cu): taken by default, with
  dropout too (its own node, DoraDropoutFunction); against float64 and PEFT's formula (tests/test_dora.py's
  run_and_check) on odd shapes and every dtype pair, zero magnitudes, the dropout path's row chunks, against the
  Python path with the same seed, the ‖W_n‖² cache following a changed W, no host synchronisation.

Outputs poisoned; DoRA's cuda forward and backward take these ops.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import lora_kernels

from conftest import HAS_CUDA, SM90_TILE_FORCED, WIDE_TILE, assert_tolerance

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


@pytest.mark.skipif(not SM90, reason="the fused forward runs on compute capability 9.0 only")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_fused_epilogue_wide(bias, dtype, adapter_dtype):
    """The lead tiles' wide variant (128 x 256 cooperative tiles, K and N >= 2048) applies the scale and bias in its
    epilogue too: a partial last row block, tile column and K-tile."""
    M, K, N, r = 300, 2056, 2056, 16
    x, W, b, A, B, c = _inputs(M, K, N, r, dtype, adapter_dtype, bias)
    path = _cb().forward_path(x, W, b, A, B, 0.0)
    assert path.startswith("sm90 fused lead") and (SM90_TILE_FORCED or path.endswith(WIDE_TILE)), path
    _check(x, W, b, A, B, c)


@pytest.mark.parametrize("case", ["small_m", "small_m_bf16", "shrink_gemm", "cublas", "dropout"])
@pytest.mark.parametrize("bias", [True, False])
def test_other_paths(case, bias):
    """Every other path: y without the bias, then one pass that scales it and adds the bias (small_m: the small-M
    forward's mma.sync kernel, its Hopper kernel switched off; small_m_bf16: the Hopper kernel where the GPU has
    one)."""
    cb = _cb()
    M, K, N, r, p, previous = 200, 256, 384, 16, 0.0, None
    adapter_dtype = torch.bfloat16 if case == "small_m_bf16" else torch.float32
    if case.startswith("small_m"):
        M = 16
    elif case == "cublas":
        K = 100  # rows of 200 B: no 16-byte TMA rows, no sm_90 GEMM
    elif case == "dropout":
        p = 0.2
    x, W, b, A, B, c = _inputs(M, K, N, r, torch.bfloat16, adapter_dtype, bias)
    if case == "shrink_gemm":
        previous = cb.set_fused_forward(0)
    previous_sm90 = cb.set_small_m_sm90(False) if case == "small_m" else None  # the mma.sync kernel
    try:
        path = cb.forward_path(x, W, b, A, B, p)
        if case == "small_m":
            assert path == "small_m", path
        elif case == "small_m_bf16":
            assert path == ("small_m sm90" if torch.cuda.get_device_capability() == (9, 0) else "small_m"), path
        else:
            assert not path.startswith(("small_m", "sm90 fused")), path
        if case == "cublas":
            assert path.startswith("cublas"), path
        _check(x, W, b, A, B, c, p=p, seed=1234)
    finally:
        if previous is not None:
            cb.set_fused_forward(previous)
        if previous_sm90 is not None:
            cb.set_small_m_sm90(previous_sm90)


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
    monkeypatch.setattr(cb, "dora_entry", None)  # the Python path (the C++ entry calls the op below Python)
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


def _check_backward(M, K, N, r, p=0.0, seed=0):
    cb = _cb()
    x, W, _, A, B, _ = _inputs(M, K, N, r, torch.bfloat16, torch.float32, False)
    dy = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    dxf = torch.randn(M, N, device="cuda").to(torch.bfloat16)  # dx's frozen product's operand
    _, u = cb.forward(x, W, None, A, B, S, p, seed, 0)
    dx, dA, dB = cb.backward_dx_from(dy, x, W, A, B, u, dxf, S, p, seed, 0, True, True, True)
    keep = lora_kernels.dropout_mask(seed, 0, (M, K), p, device="cuda") if p > 0 else None

    def formula(dyy, dxff, xx, WW, AA, BB, uu):
        acc = torch.promote_types(AA.dtype, torch.float32)
        v = dyy.to(acc) @ BB.to(acc)  # (M, r)
        term = S * (v @ AA.to(acc))
        if keep is not None:
            term = term * keep / (1.0 - p)
        xd = xx.to(acc) if keep is None else xx.to(acc) * keep / (1.0 - p)
        ddx = (dxff @ WW).to(acc) + term
        # u already holds s (u = s·x_d Aᵀ): dB = dyᵀ u
        return ddx.to(xx.dtype), (S * v.t() @ xd).to(AA.dtype), (dyy.to(acc).t() @ uu.to(acc)).to(BB.dtype)

    ref = formula(dy.double(), dxf.double(), x.double(), W.double(), A.double(), B.double(), u.double())
    base = formula(dy, dxf, x, W, A, B, u)
    for out, r64, b0, name in zip((dx, dA, dB), ref, base, ("dx", "dA", "dB")):
        assert_tolerance(out, r64, b0, name)
    # dA and dB are the plain backward's, bit for bit
    _, dA0, dB0 = cb.backward(dy, x, W, A, B, u, S, p, seed, 0, False, True, True)
    assert torch.equal(dA, dA0) and torch.equal(dB, dB0)


@pytest.mark.parametrize("case", ["sm90", "small_m", "odd_k", "dropout"])
def test_backward_dx_from(case):
    """dx = dx_from W + s·(dy B) A on each of dx's paths: the sm_90 GEMM with the rank-r K-tiles (Hopper), cuBLAS
    (M <= 64, and K not a multiple of 8), and with dropout (the masked term)."""
    M, K, N, r, p = 300, 256, 392, 16, 0.0
    if case == "small_m":
        M = 40
    elif case == "odd_k":
        K = 100
    elif case == "dropout":
        p = 0.25
    if case == "sm90" and SM90:
        assert _cb().dx_path(torch.empty(M, K, device="cuda", dtype=torch.bfloat16),
                             torch.empty(N, K, device="cuda", dtype=torch.bfloat16),
                             torch.empty(r, K, device="cuda"), torch.empty(N, r, device="cuda")) == "sm90"
    _check_backward(M, K, N, r, p=p, seed=99)


def test_backward_dx_from_bad_input():
    cb = _cb()
    x, W, _, A, B, _ = _inputs(64, 64, 64, 4, torch.bfloat16, torch.float32, False)
    dy = torch.randn(64, 64, device="cuda").to(torch.bfloat16)
    _, u = cb.forward(x, W, None, A, B, S, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="dx_from must be"):
        cb.backward_dx_from(dy, x, W, A, B, u, dy[:, :-1], S, 0.0, 0, 0, True, True, True)
    with pytest.raises(RuntimeError, match="dx_from must have x's dtype"):
        cb.backward_dx_from(dy, x, W, A, B, u, dy.float(), S, 0.0, 0, 0, True, True, True)


def test_dora_backward_takes_one_call(monkeypatch):
    """dora_linear's backward on the cuda backend at p = 0 makes one backend backward call (backward_dx_from, none
    of the plain backward), and its output and grads pass test_dora.py's float64 checks (run_and_check: PEFT's
    formula, the tolerance rule with DoRA's sum-of-|terms| floor)."""
    from test_dora import run_and_check

    cb = _cb()
    calls = []
    real_from, real_bwd = cb.backward_dx_from, cb.backward
    monkeypatch.setattr(cb, "backward_dx_from", lambda *a: calls.append("dx_from") or real_from(*a))
    monkeypatch.setattr(cb, "backward", lambda *a: calls.append("backward") or real_bwd(*a))
    monkeypatch.setattr(cb, "dora_entry", None)  # the Python path
    run_and_check("cuda", "cuda", torch.bfloat16, (256,), 192, 320, 16, bias=True, p=0.0,
                  adapter_dtype=torch.float32)
    assert calls == ["dx_from"]


# ------------------------------------------------------------------------------------------- the C++ DoRA entry
def _dora_node(y):
    """The name of y's DoRA node (the C++ DoraLinearFunction or the Python path's _EagerDoRA), past a reshape."""
    fn = y.grad_fn
    while fn is not None and "dora" not in fn.name().lower() and fn.next_functions:
        fn = fn.next_functions[0][0]
    return fn.name() if fn is not None else ""


@pytest.mark.parametrize("p,training,node", [(0.0, True, "DoraLinearFunction"), (0.1, False, "DoraLinearFunction"),
                                             (0.1, True, "DoraDropoutFunction")])
def test_dora_entry_taken(p, training, node):
    x, W, b, A, B, _ = _inputs(64, 96, 80, 8, torch.bfloat16, torch.float32, True)
    m = (torch.rand(80, device="cuda") + 0.5).requires_grad_()
    y = lora_kernels.dora_linear(x.reshape(4, 16, 96), W, b, A, B, S, m, dropout_p=p, training=training,
                                 backend="cuda")
    assert node in _dora_node(y), _dora_node(y)
    with lora_kernels.record_dropout():  # a recorded dropout call runs in Python, which records its seed
        y = lora_kernels.dora_linear(x, W, b, A, B, S, m, dropout_p=p, training=training, backend="cuda")
    assert ("DoraDropoutFunction" in _dora_node(y)) is False


@pytest.mark.parametrize("chunk_rows", [None, 64, 1000])
def test_dora_entry_dropout_row_chunks(monkeypatch, chunk_rows):
    """The entry's forward and backward by row chunks of dora.BWD_CHUNK_BYTES (the mask's counters continuing across
    chunks): 2000 rows in chunks of 64 (32 chunks) and 1000 rows (a tail chunk), against float64."""
    from lora_kernels import dora
    from test_dora import run_and_check

    K, N = 256, 320
    if chunk_rows is not None:
        monkeypatch.setattr(dora, "BWD_CHUNK_BYTES", chunk_rows * (N + K) * 2)
    run_and_check("cuda", "cuda", torch.bfloat16, (2000,), K, N, 16, bias=True, p=0.1, adapter_dtype=torch.float32)


@pytest.mark.parametrize("dtype,adapters", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float16, torch.float32), (torch.float32, torch.float32)],
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("shape", [((1,), 64, 48, 4), ((3, 7), 100, 50, 33), ((300,), 256, 200, 16),
                                   ((2048,), 512, 384, 64), ((64,), 128, 96, 256)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_entry_against_float64(dtype, adapters, shape, p):
    """The entry's y and grads of x, A, B and the magnitude under the tolerance rule against PEFT's formula in
    float64 (run_and_check), with and without a bias; odd K and N (with dropout: the scalar masking pass), M = 1
    (small M), 3-D x, r up to 256. With dropout, the contract's mask of the seed the call drew."""
    from test_dora import run_and_check

    lead, K, N, r = shape
    for bias in (True, False):
        run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=bias, p=p, adapter_dtype=adapters)


@pytest.mark.parametrize("M,K,N", [(8449, 64, 1000), (8449, 40, 1001), (130, 72, 4096)], ids=str)
def test_dora_entry_colsum_splits(M, K, N):
    """Row splits of the magnitude's column sums where ceil(M / ceil(M / splits)) < splits (M = 8449, N = 1000: every
    split's partial row is written, the empty ones as zeros), the 16-byte pass (N % 8 = 0) and the scalar one."""
    from test_dora import run_and_check

    run_and_check("cuda", "cuda", torch.bfloat16, (M,), K, N, 4, bias=True, p=0.0, adapter_dtype=torch.float32)


def test_dora_entry_zero_magnitudes_and_magnitude_dtype():
    from test_dora import run_and_check

    run_and_check("cuda", "cuda", torch.bfloat16, (300,), 256, 320, 16, bias=True, p=0.0,
                  adapter_dtype=torch.float32, zero_cols=[0, 127, 128, 319])
    run_and_check("cuda", "cuda", torch.bfloat16, (37,), 100, 50, 8, bias=True, p=0.0,
                  adapter_dtype=torch.bfloat16, zero_cols=[3])  # a bf16 magnitude: its grad in bf16


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dora_entry_matches_the_python_path(monkeypatch, p):
    """Entry and Python path (entry switched off) on the same inputs agree to within a bf16 rounding or two: the same
    forward op with g equal up to the norm's summation order, the same backward op, and with dropout the same seed
    (drawn from the same generator state), so the same mask (each path is checked against float64 on its own above
    and in tests/test_dora.py)."""
    cb = _cb()
    x, W, b, A, B, _ = _inputs(512, 256, 384, 16, torch.bfloat16, torch.float32, True)
    m = torch.rand(384, device="cuda") + 0.5

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
        torch.manual_seed(123)
        y = lora_kernels.dora_linear(leaves[0], W, b, leaves[1], leaves[2], S, leaves[3], dropout_p=p,
                                     backend="cuda")
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    dy = torch.randn(512, 384, device="cuda").bfloat16()
    ours = run()
    monkeypatch.setattr(cb, "dora_entry", None)
    py = run()
    for name, a, p_ in zip(("y", "dx", "dA", "dB", "dmag"), ours, py):
        assert a.dtype == p_.dtype, name
        torch.testing.assert_close(a.float(), p_.float(), rtol=1e-2, atol=1e-2 * p_.float().abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("dtype,adapters", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("shape", [((1,), 64, 48, 4), ((3, 7), 100, 50, 33), ((300,), 256, 320, 16),
                                   ((2048,), 512, 384, 64)], ids=str)
def test_dora_entry_owned_dy(dtype, adapters, shape):
    """A dy that autograd made (the grad of (y ⊙ w).sum(), as in a network) is the node's own: g ⊙ dy goes over it
    after the dy pass has read it, and the grads equal, bit for bit, those from a dy that the caller holds (which the
    node leaves as it was); zero-g columns (read by the magnitude's recompute, then zeroed), 3-D x (a view of the
    next op's grad), small M (cuBLAS dx), odd N (the scalar colsum pass) and the sm_90 dx GEMM."""
    lead, K, N, r = shape
    x, W, b, A, B, _ = _inputs(math.prod(lead), K, N, r, dtype, adapters, True)
    x = x.reshape(*lead, K)
    m = torch.rand(N, device="cuda") + 0.5
    m[[0, N - 1]] = 0.0
    w = torch.randn(*lead, N, device="cuda").to(dtype)
    w0 = w.clone()
    grads = []
    for owned in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
        y = lora_kernels.dora_linear(leaves[0], W, b, leaves[1], leaves[2], S, leaves[3], backend="cuda")
        assert "DoraLinearFunction" in _dora_node(y)
        if owned:
            (y * w).sum().backward()
        else:
            y.backward(w)
        assert torch.ops.lora_kernels_cuda.dora_last_dyc_in_place() == int(owned)
        assert torch.equal(w, w0)
        grads.append([t.grad for t in leaves])
    for name, held, mine in zip(("x", "A", "B", "magnitude"), *grads):
        assert torch.isfinite(held).all(), name
        assert torch.equal(held, mine), name


def test_dora_entry_norm_cache_follows_the_weight():
    from test_dora import peft_formula

    x, W0, b, A, B, _ = _inputs(128, 96, 80, 8, torch.float32, torch.float32, True)
    m = torch.rand(80, device="cuda") + 0.5
    W = torch.nn.Parameter(W0.clone(), requires_grad=False)

    def check():
        y = lora_kernels.dora_linear(x, W, b, A, B, S, m.requires_grad_(), backend="cuda")
        want = peft_formula(x.double(), W.double(), b.double(), A.double(), B.double(), S, m.double())
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)

    check()
    check()
    with torch.no_grad():
        W.mul_(1.5)
    check()
    W.data = torch.randn_like(W0)
    check()
    W.data.mul_(2.0)  # the documented blind spot, then the remedy
    lora_kernels.dora.clear_weight_norm_cache()
    check()


@pytest.mark.parametrize("p,node", [(0.0, "DoraLinearFunction"), (0.1, "DoraDropoutFunction")])
def test_dora_entry_no_host_sync(p, node):
    x, W, b, A, B, _ = _inputs(1024, 512, 384, 16, torch.bfloat16, torch.float32, True)
    m = (torch.rand(384, device="cuda") + 0.5).requires_grad_()
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    lora_kernels.dora_linear(x, W, b, A, B, S, m, dropout_p=p, backend="cuda").sum().backward()  # warm: cache filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = lora_kernels.dora_linear(x, W, b, A, B, S, m, dropout_p=p, backend="cuda")
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert node in _dora_node(y)
