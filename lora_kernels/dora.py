"""The DoRA op contract: ``dora_linear``, its checks, its torch.library registration and the row norm.

DoRA (weight-decomposed LoRA) with PEFT 0.21's semantics (``peft/tuners/lora/dora.py``, ``DoraLinearVariant``):

    g  = magnitude / ‖W + s·B A‖_row                 (N,), the norm detached (DoRA paper §4.3, as PEFT)
    y  = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ (s·x_d Aᵀ Bᵀ)

where x_d = dropout(x). PEFT takes x_d = x when its dropout is ``nn.Identity`` or the layer is in eval mode; then
y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b. Here that is ``dropout_p == 0`` or ``training=False``.

How it is computed (q = 1 − p, keep = the contract's Philox mask, ``lora_kernels.dropout_mask``):

    p = 0:   z = x Wᵀ + s·x Aᵀ Bᵀ                           the backend's LoRA forward (no bias)
             y = g ⊙ z + b                                   one element-wise pass (dora_kernels.scale_bias)
    p > 0:   x_k = keep ⊙ x  (exact: no rounding)            one pass
             z = x_k Wᵀ + s·x_k Aᵀ Bᵀ                        the backend's LoRA forward on x_k
             y = (g/q) ⊙ z + b,  then y += x_c Wᵀ            x_c = x − x_k/q written over x_k; cuBLAS beta = 1

    (x_d = x_k/q, so x Wᵀ + (g−1)⊙(x_d Wᵀ) + g⊙(s·x_d Aᵀ Bᵀ) = x_c Wᵀ + (g/q)⊙z.) Two GEMMs over W at p > 0,
    as in PEFT, which runs its second one in the adapters' dtype (fp32).

    backward (dy; c = g at p = 0, c = (g − 1)/q at p > 0; Bg = g ⊙ B):
             dg = Σ_m dy ⊙ z  (/q at p > 0)                  fused with dy_c = c ⊙ dy in one pass over dy, z
             p = 0:  dx = backend dx of (dy_c, B)            = (g⊙dy) W + s·((g⊙dy) B) A
                     dA, dB/g = backend dA, dB of (dy, Bg)  (dy unrounded: the adapters' precision)
             p > 0:  dx, dA, dB·q/g = backend backward of (dy, Bg) with the mask, then dx += keep ⊙ (dy_c W)
    The magnitude's grad dg/‖·‖ comes from autograd through g = magnitude / norm.

Saved for backward: x, z (M×N in x's dtype: the output before the column scale, which the magnitude's grad
needs), u (M×r float32) and the seed; no mask, no dropped copy of x, and nothing N×K. The norm needs no N×K
temporary either:
- triton/cuda backends (eager): ``dora_kernels.row_norm``, one Triton pass over W that forms each tile of
  W + s·B A in registers and sums its squares. W is read anyway, so ‖W_n‖² is not cached there.
- torch backend, torch.compile, non-unit-stride W (``dora_weight_norm``): ‖W_n + s(BA)_n‖² = ‖W_n‖² +
  2s·B_n·(A W_nᵀ) + s²·B_n (A Aᵀ) B_nᵀ from ‖W_n‖² (cached per frozen W, see ``_weight_sq``), W Aᵀ (N×r, one pass
  over W) and A Aᵀ (r×r). Rounding can make the sum slightly negative when the row nearly cancels; it is
  clamped at 0.

The registered ops (``lora_kernels::dora_fwd`` / ``dora_bwd``) have fake impls and ``register_autograd``, so
``dora_linear`` works under ``torch.compile``; eager calls use a ``torch.autograd.Function`` twin (as
``lora_kernels.ops`` does, for host time).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from . import _dispatch, ops
from .dora_kernels import masked, row_norm, scale_bias, scale_colsum, triton_usable

__all__ = ["dora_linear", "dora_weight_norm", "clear_weight_norm_cache"]


def _acc(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


# ------------------------------------------------------------------------------------------------ the norm
_CHUNK_ELEMS = 1 << 22  # rows of W are up-cast in chunks of at most this many elements (16 MiB in fp32)
_WSQ_CACHE = WeakIdKeyDictionary()  # weight tensor -> (key, storage weak ref, ‖W_n‖²)


def clear_weight_norm_cache() -> None:
    """Forget every cached ‖W_n‖². Needed only after changing a weight in place through ``.data`` (which bypasses
    the version counter the cache checks)."""
    _WSQ_CACHE.clear()


def _row_chunks(w: torch.Tensor):
    rows = max(1, _CHUNK_ELEMS // max(1, w.shape[1]))
    return [(i, min(i + rows, w.shape[0])) for i in range(0, w.shape[0], rows)]


def _weight_sq_compute(w: torch.Tensor, acc) -> torch.Tensor:
    out = torch.empty(w.shape[0], dtype=acc, device=w.device)
    for i, j in _row_chunks(w):
        out[i:j] = w[i:j].to(acc).square().sum(1)
    return out


def _weight_sq(weight: torch.Tensor, acc) -> torch.Tensor:
    """‖W_n‖² (N,) in ``acc``, cached for a W that has not changed.

    The cache entry is keyed on the weight tensor object and checked against its storage (a weak reference to the
    StorageImpl: replacing ``W.data`` or the storage misses, and a freed storage's address cannot be mistaken for
    the old one while the weak reference lives), storage offset, shape, strides, dtype and torch's version counter
    (every in-place op on W, ``copy_`` included, bumps it). Not seen: in-place changes through ``W.data`` (no
    version bump); call ``clear_weight_norm_cache()`` after those."""
    if torch.compiler.is_compiling():  # no Python-side cache inside a graph; the reduction fuses there
        return _weight_sq_compute(weight, acc)
    try:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = weight.untyped_storage()
        key = (weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, weight._version,
               acc)
    except Exception:  # tensors without a plain storage (subclasses): no caching
        return _weight_sq_compute(weight, acc)
    hit = _WSQ_CACHE.get(weight)
    if hit is not None and hit[0] == key and not hit[1].expired() and hit[1].cdata == storage._cdata:
        return hit[2]
    wsq = _weight_sq_compute(weight, acc)
    _WSQ_CACHE[weight] = (key, StorageWeakRef(storage), wsq)
    return wsq


def _w_at(weight: torch.Tensor, lora_A: torch.Tensor, acc) -> torch.Tensor:
    """W Aᵀ (N, r) in ``acc`` (float32 precision: the norm feeds g, and with float32 adapters PEFT computes it in
    float32) without an N×K temporary: one GEMM when W has the accumulation dtype, else W up-cast in row chunks of
    at most ``_CHUNK_ELEMS`` elements. (The fast backends take ``dora_kernels.row_norm`` instead.)"""
    A = lora_A.to(acc)
    if weight.dtype == acc:
        return weight @ A.t()
    out = torch.empty(weight.shape[0], A.shape[0], dtype=acc, device=weight.device)
    for i, j in _row_chunks(weight):
        out[i:j] = weight[i:j].to(acc) @ A.t()
    return out


def dora_weight_norm(weight, lora_A, lora_B, scaling) -> torch.Tensor:
    """‖W + scaling · B A‖ of every row (N,), detached, in float32 (float64 if any input is float64), computed
    without an N×K temporary."""
    acc = _acc(weight, lora_A, lora_B)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        A, B = lora_A.detach().to(acc), lora_B.detach().to(acc)
        s = float(scaling)
        wa = _w_at(weight.detach(), A, acc)  # (N, r)
        sq = _weight_sq(weight, acc) + (B * (2.0 * s * wa + (s * s) * (B @ (A @ A.t())))).sum(1)
        return sq.clamp_min(0.0).sqrt()


# ----------------------------------------------------------------------------------------------- the ops
_lib = torch.library.Library("lora_kernels", "FRAGMENT")
_lib.define(
    "dora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor g, float scaling, "
    "float p, Tensor seed, int offset, str backend) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "dora_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor g, Tensor z, Tensor u, "
    "float scaling, float p, Tensor seed, int offset, str backend, bool need_dx, bool need_dA, bool need_dB, "
    "bool need_dg) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fast(backend: str, t: torch.Tensor) -> bool:
    """Triton element-wise passes for the fast backends; plain PyTorch for the reference backend."""
    return backend != "torch" and triton_usable(t.device)


def _fwd_impl(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend):
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    if M == 0:
        return x.new_empty(0, N), x.new_empty(0, N), x.new_empty(0, r, dtype=_acc(x))
    be, fast = _dispatch.get(backend), _fast(backend, x)
    if p == 0.0:
        z, u = be.forward(x, weight, None, lora_A, lora_B, scaling, 0.0, 0, offset)
        return scale_bias(z, g, bias, fast), z, u
    sd, q = ops._backend_seed(seed, p), 1.0 - p
    xk = masked(x, p, sd, offset, 1.0, 0.0, fast)  # keep ⊙ x
    z, u = be.forward(xk, weight, None, lora_A, lora_B, scaling, 0.0, 0, offset)
    y = scale_bias(z, g / q, bias, fast)
    xc = masked(x, p, sd, offset, 1.0 - 1.0 / q, 1.0, fast, out=xk)  # x − keep ⊙ x / q, over x_k
    return y.addmm_(xc, weight.t()), z, u


def _bwd_impl(dy, x, weight, lora_A, lora_B, g, z, u, scaling, p, seed, offset, backend,
              need_dx, need_dA, need_dB, need_dg):
    acc = _acc(x)
    if x.shape[0] == 0:
        dx, dA, dB = torch.zeros_like(x), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
        dg = torch.zeros(weight.shape[0], dtype=acc, device=x.device)
    else:
        be, fast = _dispatch.get(backend), _fast(backend, x)
        sd, q = ops._backend_seed(seed, p), 1.0 - p
        c = g if p == 0.0 else (g - 1.0) / q
        dyc, dg = scale_colsum(dy, z, c, need_dx, need_dg, fast)
        if dg is not None and p > 0.0:
            dg = dg / q
        dx = dA = dB = None
        if need_dx and p == 0.0:
            dx = be.backward(dyc, x, weight, lora_A, lora_B, u, scaling, 0.0, 0, offset, True, False, False)[0]
        if need_dA or need_dB or (need_dx and p > 0.0):
            bg = (lora_B.to(acc) * g[:, None]).to(lora_B.dtype)
            dxb, dA, dB = be.backward(dy, x, weight, lora_A, bg, u, scaling, p, sd, offset,
                                      need_dx and p > 0.0, need_dA, need_dB)
            if need_dB:
                dB = (dB.to(acc) * (g / q)[:, None]).to(lora_B.dtype)
            if need_dx and p > 0.0:  # dx = dy W + keep ⊙ (s/q (dy Bg) A)  [backend]  + keep ⊙ (dy_c W)
                dx = masked(torch.mm(dyc, weight), p, sd, offset, 1.0, 0.0, fast, base=dxb, out=dxb)
    empty = x.new_empty(0)
    return (dx if need_dx else empty, dA if need_dA else empty, dB if need_dB else empty,
            dg if need_dg else empty)


_lib.impl("dora_fwd", _fwd_impl, "CompositeExplicitAutograd")
_lib.impl("dora_bwd", _bwd_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("lora_kernels::dora_fwd")
def _fwd_fake(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty(M, N), x.new_empty(M, N), x.new_empty(M, lora_A.shape[0], dtype=_acc(x))


@torch.library.register_fake("lora_kernels::dora_bwd")
def _bwd_fake(dy, x, weight, lora_A, lora_B, g, z, u, scaling, p, seed, offset, backend,
              need_dx, need_dA, need_dB, need_dg):
    empty = x.new_empty(0)
    return (torch.empty_like(x) if need_dx else empty, torch.empty_like(lora_A) if need_dA else empty,
            torch.empty_like(lora_B) if need_dB else empty, torch.empty_like(g) if need_dg else empty)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, g, output[1], output[2], seed)
    ctx.args = (scaling, p, offset, backend, bias is not None)


def _backward(ctx, dy, *_unused, bwd=None):
    x, weight, lora_A, lora_B, g, z, u, seed = ctx.saved_tensors
    scaling, p, offset, backend, has_bias = ctx.args
    need_dx, need_dW, need_db, need_dA, need_dB, need_dg = ctx.needs_input_grad[:6]
    dy = dy.contiguous()
    dx, dA, dB, dg = (bwd or torch.ops.lora_kernels.dora_bwd)(
        dy, x, weight, lora_A, lora_B, g, z, u, scaling, p, seed, offset, backend, need_dx, need_dA, need_dB, need_dg)
    dW = _dweight(dy, x, weight, g, p, seed, offset) if need_dW else None
    db = dy.to(_acc(dy)).sum(0).to(dy.dtype) if (need_db and has_bias) else None
    return (dx if need_dx else None, dW, db, dA if need_dA else None, dB if need_dB else None,
            dg if need_dg else None, None, None, None, None, None)


def _dweight(dy, x, weight, g, p, seed, offset):
    """The grad of a trainable base weight (outside the fast path; the norm is detached, as in PEFT):
    p = 0: (g ⊙ dy)ᵀ x;   p > 0: dyᵀ x_c + ((g/q) ⊙ dy)ᵀ x_k."""
    acc = _acc(x)
    d = dy.to(acc)
    if p == 0.0:
        return ((d * g).t() @ x.to(acc)).to(weight.dtype)
    sd, q = ops._backend_seed(seed, p), 1.0 - p
    xk = masked(x, p, sd, offset, 1.0, 0.0, False).to(acc)
    xc = masked(x, p, sd, offset, 1.0 - 1.0 / q, 1.0, False).to(acc)
    return (d.t() @ xc + (d * (g / q)).t() @ xk).to(weight.dtype)


torch.library.register_autograd("lora_kernels::dora_fwd", _backward, setup_context=_setup_context)


class _EagerDoRA(torch.autograd.Function):
    """Eager twin of ``dora_fwd`` with its registered autograd (the same impls, without the dispatcher's Python
    autograd wrapper; see ``lora_kernels.ops._EagerLoRA``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend):
        y, z, u = _fwd_impl(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend), (y, z, u))
        return y

    @staticmethod
    @once_differentiable  # the kernels record no graph: a double backward raises instead of giving wrong numbers
    def backward(ctx, dy):
        return _backward(ctx, dy, bwd=_bwd_impl)


# ------------------------------------------------------------------------------------------ the public op
def _check_magnitude(magnitude, x, N):
    def fail(msg):
        raise ValueError(f"dora_linear: {msg}")

    if not isinstance(magnitude, torch.Tensor):
        fail(f"magnitude must be a Tensor, got {type(magnitude).__name__}")
    if magnitude.dim() != 1 or magnitude.shape[0] != N:
        fail(f"magnitude must have shape (N={N},) (one entry per output feature), got {tuple(magnitude.shape)}")
    if magnitude.dtype not in (torch.float32, x.dtype):
        fail(f"magnitude dtype {magnitude.dtype} must be float32 or x's dtype {x.dtype}")
    if magnitude.device != x.device:
        fail(f"magnitude is on {magnitude.device} but x is on {x.device}; all tensors must be on one device")


def _check_float64(x, lora_A, lora_B, magnitude):
    # the torch backend's float64 path multiplies float64 x by the adapters as given: float64 throughout
    if x.dtype == torch.float64 and any(t.dtype != torch.float64 for t in (lora_A, lora_B, magnitude)):
        raise ValueError("dora_linear: float64 x needs float64 lora_A, lora_B and magnitude, got "
                         f"{lora_A.dtype}, {lora_B.dtype}, {magnitude.dtype}")


def dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, dropout_p=0.0, training=True, backend=None):
    """Fused DoRA linear with PEFT 0.21's semantics (see the module docstring):

        g = magnitude / ‖W + scaling·B A‖_row (detached);  y = x Wᵀ + b + (g−1)⊙(x_d Wᵀ) + g⊙(scaling·x_d Aᵀ Bᵀ)

    x: (..., K); weight: (N, K) (frozen in the fast path); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r);
    magnitude: (N,). Adapters and magnitude in float32 or x's dtype. x_d = dropout(x) with the contract's mask
    (``lora_kernels.dropout_mask`` / ``record_dropout``) when ``training`` and ``dropout_p > 0``, else x_d = x.
    Returns (..., N) in x's dtype; grads for x, lora_A, lora_B and magnitude (and weight/bias if they require
    grad). ``backend``: None/'auto', 'torch', 'triton', 'cuda', as ``lora_linear``.
    """
    norm_weight = weight
    if torch.is_autocast_enabled(x.device.type):  # behave like F.linear under autocast (the norm uses W as given)
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    try:
        ops._check(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    except ValueError as e:
        raise ValueError(str(e).replace("lora_linear:", "dora_linear:", 1)) from None
    N = weight.shape[0]
    _check_magnitude(magnitude, x, N)
    _check_float64(x, lora_A, lora_B, magnitude)
    if not 0.0 <= dropout_p < 1.0:  # lora_linear takes p = 1 (its LoRA path is then zero); DoRA does not yet
        raise ValueError(f"dora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    name = ops._resolve(backend, x.device.type, x.dtype == torch.float64, False)  # DoRA draws CPU seeds only
    p = float(dropout_p) if training else 0.0
    seed = ops._draw_seed() if p > 0.0 else ops._NO_SEED
    if p > 0.0 and ops._recorders:
        for calls in ops._recorders:
            calls.append((int(seed), 0))
    if _fast(name, x) and not torch.compiler.is_compiling() and norm_weight.stride(-1) == 1:
        with torch.no_grad():  # one Triton pass over W (no cache needed: W is read for B A's cross term anyway)
            norm = row_norm(norm_weight, lora_A.contiguous(), lora_B.contiguous(), scaling)
    else:
        norm = dora_weight_norm(norm_weight, lora_A, lora_B, scaling)
    g = magnitude.to(_acc(x)) / norm.to(_acc(x))
    two_d = x.dim() == 2
    x2 = x if two_d else x.reshape(-1, x.shape[-1])
    args = (x2.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
            lora_A.contiguous(), lora_B.contiguous(), g, float(scaling), p, seed, 0, name)
    if torch.compiler.is_compiling():
        y = torch.ops.lora_kernels.dora_fwd(*args)[0]
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                         for t in (x, weight, bias, lora_A, lora_B, g)):
        y = _EagerDoRA.apply(*args)
    else:
        y = _fwd_impl(*args)[0]
    return y if two_d else y.reshape(*x.shape[:-1], N)
