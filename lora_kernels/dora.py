"""The DoRA op contract: ``dora_linear``, its checks, its torch.library registration and the row norm.

DoRA (weight-decomposed LoRA) with PEFT 0.21's semantics (``peft/tuners/lora/dora.py``, ``DoraLinearVariant``):

    g  = magnitude / ‖W + s·B A‖_row                 (N,), the norm detached (DoRA paper §4.3, as PEFT)
    y  = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ (s·x_d Aᵀ Bᵀ)

where x_d = dropout(x). PEFT takes x_d = x when its dropout is ``nn.Identity`` or the layer is in eval mode; then
y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b. Here that is ``dropout_p == 0`` or ``training=False``.

How it is computed (q = 1 − p, keep = the contract's Philox mask, ``lora_kernels.dropout_mask``, z = the LoRA
output without bias before the column scale):

    p = 0:   z = x Wᵀ + s·x Aᵀ Bᵀ                           the backend's LoRA forward (no bias)
             y = g ⊙ z + b                                   one element-wise pass, written over z
    p > 0:   x_k = keep ⊙ x  (exact: no rounding)            one pass
             z = x_k Wᵀ + s·x_k Aᵀ Bᵀ                        the backend's LoRA forward on x_k
             y = (g/q) ⊙ z + b over z,  then y += x_c Wᵀ     x_c = x − x_k/q written over x_k; cuBLAS beta = 1
    On the cuda and Triton backends (their ``forward_scaled``, z not kept) the column scale and the bias come with the
    LoRA forward itself: in the output pass's epilogue (y = round(c ⊙ acc + b), no pass over y and one rounding: the
    cuda backend's fused sm_90 forward, Triton's small-M, TMA and Triton main loops), on their other paths (cuBLAS
    main loops) in one in-place pass after them.

    (x_d = x_k/q, so x Wᵀ + (g−1)⊙(x_d Wᵀ) + g⊙(s·x_d Aᵀ Bᵀ) = x_c Wᵀ + (g/q)⊙z.) Two GEMMs over W at p > 0,
    as in PEFT, which runs its second one in the adapters' dtype (fp32).

    backward (dy; c = g at p = 0, c = (g − 1)/q at p > 0; Bg = g ⊙ B):
             dA, dB·q/g [, p > 0: dx_b = dy W + keep ⊙ (s/q (dy Bg) A)]
                                                             one backend backward of (dy, Bg): dy unrounded, so
                                                             the adapters' grads keep the adapters' precision
             p = 0, fast backends (SAVE_Y, the default): z = (y − b)/g from the output y the forward returned,
             dg = Σ_m dy ⊙ (y − b) / g                       fused with dy_c = c ⊙ dy in one pass over dy, y;
                                                             the columns y cannot give (g = 0, a small g with a
                                                             bias, an adapter row large against W_n) from their
                                                             z recomputed by one more launch that is a no-op
                                                             unless such a column exists (no synchronisation)
             otherwise by row chunks (below): z recomputed (the backend's forward on x, or on x_k at p > 0), and
             dg = Σ_m dy ⊙ z  (/q at p > 0)                  fused with dy_c = c ⊙ dy in one pass over dy, z;
                                                             dy_c is written over z. With float32 adapters on a
                                                             16-bit x only z's base x_k Wᵀ is recomputed, and
             dg = (Σ_m dy ⊙ x_k Wᵀ + Σ_j B ⊙ dyᵀ u)  (/q)   dyᵀ u being dB's product (z's LoRA part in float32)
             p = 0:  dx = backend dx of (dy_c, B)            = (g⊙dy) W + s·((g⊙dy) B) A
                     (cuda and triton backends, z or y saved: backward_dx_from gives dx = dy_c W + s·(dy Bg) A
                     with dA and dB in one backend call, dy_c computed before it: one backend backward, not two)
             p > 0:  dx = dx_b + keep ⊙ (dy_c W)             one more GEMM, masked add over dx_b
    The magnitude's grad dg/‖·‖ comes from autograd through g = magnitude / norm.

Memory. Saved for backward: x, u (M×r float32), g (N) and the seed: the same as ``lora_linear`` plus N floats. No
mask, no dropped copy of x, and nothing N×K (tests/test_dora_memory.py checks the saved tensors and every
allocation). The magnitude's grad needs Σ_m dy ⊙ z over all of z (M×N). At p = 0 on the fast backends the backward
reads z = (y − b)/g from the output y itself (``SAVE_Y``, ``LORA_KERNELS_DORA_SAVE_Y``, on by default): the tensor
the call returned, not a copy, and the backward runs in one chunk, its dy_c (M×N) transient; on the cuda backend's
C++ node dy_c is written over dy itself where autograd made dy (no other reference: csrc/dora_autograd.h,
grad_is_ours), after the dy pass has read it, so that the backward adds nothing M×N. It keeps y alive until
the backward: in a network whose next op would have freed y (rather than saved it, as a gated MLP's product saves its
factors), that is M×N more held per layer; and changing y in place before the backward raises autograd's "modified
by an inplace operation" error. The rounding: y is rounded once (x's dtype) before z is taken from it, as
PEFT's own ``base_result − bias``. Elsewhere (p > 0, the torch backend, ``SAVE_Y`` off) z is not kept but recomputed
in backward, which costs one GEMM over W (2·M·N·K FLOPs): there is no cheaper exact way (Σ_m dy[m,n]·(x Wᵀ)[m,n] is a
full contraction over m and k for each n). The backward's M×N temporaries (z, then dy_c over it) and M×K ones (dx of a
chunk; x_k at p > 0) live only for one row chunk of at most ``BWD_CHUNK_BYTES`` (64 MiB by default,
``LORA_KERNELS_DORA_CHUNK_MIB``): transient, never more than one chunk at a time, and they do not add up over the
layers of a network the way saved tensors do. The forward at p > 0 runs by the same row chunks: its x_k (then x_c)
and z are transient per chunk too.

``LORA_KERNELS_DORA_SAVE_Z=1`` (or ``lora_kernels.dora.SAVE_Z = True``) trades the recompute for memory: the
forward keeps z (M×N, x's dtype) for backward, as PEFT keeps its own M×N activations, and the backward skips one
GEMM over W and runs in one chunk (its dy_c, M×N, is then transient). Same results up to the recomputation's
rounding.

Cost per pass (e = bytes of x's dtype, fp32 adapters, M×K → N, rank r; on the cuda backend every GEMM is one
kernel with its rank-r term folded in; triton: the rank-r term written first, then cuBLAS with beta = 1):

    forward, p = 0                      FLOPs                       HBM bytes (besides what LoRA moves)
      ‖W_n‖² (cache miss only)          2NK                         NKe
      W Aᵀ (w_at, one pass over W)      6NKr (bf16 split) / 2NKr    NKe
      A Aᵀ, B AAᵀ, combine              2Kr² + 2Nr² + 4Nr           O(Nr)
      LoRA forward (no bias) → z        2MNK + 2MKr + 2MNr          (LoRA's own)
      y = g ⊙ z + b over z              2MN                         2MNe (0 in an epilogue: forward_scaled)
    backward, p = 0
      backend bwd of (dy, Bg): dA, dB   4MNr + 4MKr                 (LoRA's own: dy and x read once)
      per chunk, all chunks together:
        LoRA forward of x_c → z_c       2MNK + 2MKr + 2MNr          MKe (x again) + MNe (z written)
        dg, c ⊙ dy over z               3MN                         3MNe
        backend dx of (dy_c, B)         2MNK + 4MNr + 2MKr          MNe (its rank-r pass reads dy_c)
        dx chunk copied into dx         -                           2MKe (only with more than one chunk)
    So over LoRA, p = 0: +1 GEMM (2MNK) in backward, +7MNe + MKe (+2MKe when chunked) + NKe bytes (the norm's
    pass over W; one more on a cache miss). With SAVE_Y (the default at p = 0): no extra GEMM, +5MNe + NKe bytes
    (y read by the dg pass, dy_c written and read), nothing more saved. With SAVE_Z: no extra GEMM, +6MNe + NKe
    bytes (and z, MNe, saved).
    p > 0 adds, in forward: x_k and x_c (4MKe) and the GEMM x_c Wᵀ (2MNK, y read and written by cuBLAS beta = 1:
    2MNe); in backward: x_k of each chunk again (2MKe), the GEMM dy_c W (2MNK, t = dy_c W written over x_k: MKe)
    and its masked add into dx (3MKe).

The norm needs no N×K temporary:
- triton/cuda backends (eager): ‖W_n + s(BA)_n‖² = ‖W_n‖² + 2s·B_n·(A W_nᵀ) + s²·B_n (A Aᵀ) B_nᵀ with ‖W_n‖²
  cached per frozen W (``_weight_sq``), W Aᵀ from one Triton pass over W (``dora_kernels.w_at``; W is read once
  per call because A changes every step) and one combine kernel (``dora_kernels.weight_norm``).
  A row whose sum is under half the sum of its terms' products' sizes (the adapter undoes much of W_n, or B_n A
  cancels within itself at a small K) is summed again directly in that kernel, Σ_k (W_nk + s·(B A)_nk)² from W's
  row and A: the expansion's float32 rounding is relative to those products, about 1/f² of the result where the
  row cancels to f of ‖W_n‖ (2e-3 at f = 0.01 against PEFT's 1e-6, tests/test_dora.py). Training keeps f near 1,
  so no row is normally summed twice.
- torch backend, torch.compile, non-unit-stride W (``dora_weight_norm``, the reference): PEFT's computation, W
  up-cast plus s·B A, by row chunks (one pass over W and 2NKr FLOPs, as the expansion's W Aᵀ).

On the cuda backend an eager call runs these same steps in C++ (csrc/dora_autograd.h: at p = 0 the SAVE_Y path, at
p > 0 the row chunks above, the masking passes as one CUDA kernel), without Python in its forward or backward;
``dora_linear`` hands it the call first, and this module runs what it declines.

The registered ops (``lora_kernels::dora_fwd`` / ``dora_bwd``) have fake impls and ``register_autograd``, so
``dora_linear`` works under ``torch.compile``; eager calls use a ``torch.autograd.Function`` twin (as
``lora_kernels.ops`` does, for host time).
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _config, _dispatch, ops
from .dora_kernels import adapter_gram, masked, scale_bias, scale_colsum, triton_usable, weight_norm
from .philox import calls_per_row

__all__ = ["dora_linear", "dora_weight_norm", "clear_weight_norm_cache"]

# The backward's memory/speed dial (see the module docstring). Read at import; tests and benchmarks set the attributes.
SAVE_Z = _config.DORA_SAVE_Z
SAVE_Y = _config.DORA_SAVE_Y
BWD_CHUNK_BYTES = _config.DORA_CHUNK_BYTES
_CHUNK_ALIGN = 64  # rows


def _acc(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


# ------------------------------------------------------------------------------------------------ the norm
_CHUNK_ELEMS = 1 << 22  # rows of W are up-cast in chunks of at most this many elements (16 MiB in fp32)
_WSQ_CACHE = WeakIdKeyDictionary()  # weight tensor -> (key, storage weak ref, ‖W_n‖², stream, event)


def clear_weight_norm_cache() -> None:
    """Forget every cached ‖W_n‖² (this module's and the cuda backend's C++ entry's). Needed only after changing a
    weight in place without bumping its version counter (through ``W.data``, or under
    ``torch.autograd._unsafe_preserve_version_counter``) at the same address."""
    _WSQ_CACHE.clear()
    be = _dispatch._load("cuda")[0]
    if be is not None and getattr(be, "clear_dora_cache", None) is not None:
        be.clear_dora_cache()


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
    the old one while the weak reference lives), its data pointer (a storage re-allocated in place, as
    ``untyped_storage().resize_()`` and FSDP2's free/re-gather of unsharded parameters do, misses), storage offset,
    shape, strides, dtype and torch's version counter (every in-place op on W, ``copy_`` included, bumps it). Not
    seen: in-place changes at the same address that bypass the version counter (through ``W.data``, or under
    ``torch.autograd._unsafe_preserve_version_counter``); call ``clear_weight_norm_cache()`` after those.

    On CUDA the entry keeps the stream that computed it and an event recorded there: a hit on another stream waits
    for that event (the reduction may still be queued behind other work there) and marks the tensor as used on that
    stream, so that the caching allocator does not reuse its memory under that stream's reads after a miss drops
    it."""
    if torch.compiler.is_compiling():  # no Python-side cache inside a graph; the reduction fuses there
        return _weight_sq_compute(weight, acc)
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        # a CUDA graph captures the reduction, which each replay runs on W as it then is: a cached tensor would be
        # read as it was at capture (stale once W changes) and could be freed by a later cache miss
        return _weight_sq_compute(weight, acc)
    try:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = weight.untyped_storage()
        key = (weight.data_ptr(), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()),
               weight.dtype, weight._version, acc)
    except Exception:  # tensors without a plain storage (subclasses): no caching
        return _weight_sq_compute(weight, acc)
    hit = _WSQ_CACHE.get(weight)
    if hit is not None and hit[0] == key and not hit[1].expired() and hit[1].cdata == storage._cdata:
        wsq, stream, event = hit[2:]
        if stream is not None:
            current = torch.cuda.current_stream(weight.device)
            if current != stream:
                current.wait_event(event)
                wsq.record_stream(current)
        return wsq
    with torch.no_grad():
        wsq = _weight_sq_compute(weight.detach(), acc)
    stream = event = None
    if weight.is_cuda:
        stream = torch.cuda.current_stream(weight.device)
        event = torch.cuda.Event()
        event.record(stream)
    _WSQ_CACHE[weight] = (key, StorageWeakRef(storage), wsq, stream, event)
    return wsq


def _autocast_off(device_type: str):
    """Autocast off for the norm's math; 'meta' has no autocast (asking about it raises), so nothing to turn off."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def dora_weight_norm(weight, lora_A, lora_B, scaling) -> torch.Tensor:
    """‖W + scaling · B A‖ of every row (N,), detached, in float32 (float64 if any input is float64): the reference
    (plain PyTorch), computed as PEFT computes it, W up-cast plus scaling · B A in the accumulation dtype, but by row
    chunks of at most ``_CHUNK_ELEMS`` elements, so that no N×K temporary exists. One pass over W and 2NKr FLOPs."""
    acc = _acc(weight, lora_A, lora_B)
    with torch.no_grad(), _autocast_off(weight.device.type):
        A, B, W = lora_A.detach().to(acc), lora_B.detach().to(acc), weight.detach()
        s = float(scaling)
        fused = abs(s) <= torch.finfo(acc).max  # addmm's alpha must fit acc; past it, s · B A is inf as in PEFT

        def rows(i, j):
            return torch.addmm(W[i:j].to(acc), B[i:j], A, alpha=s) if fused else W[i:j].to(acc) + s * (B[i:j] @ A)
        # concatenated, not written into a buffer: under vmap A or B may be batched
        return torch.cat([torch.linalg.vector_norm(rows(i, j), dim=1) for i, j in _row_chunks(W)])


def _norm(weight, lora_A, lora_B, scaling, fast: bool):
    """(the detached row norm for a call, its parts): the Triton pass over W on the fast backends (eager, unit-stride
    W, A, B; ‖W_n‖² from the cache), with parts = (‖W_n‖², A Aᵀ) in float32, which the saved-y backward's recompute
    test reads again; else ``dora_weight_norm``, with parts None."""
    if (fast and not torch.compiler.is_compiling() and weight.stride(-1) == 1 and lora_A.stride(-1) == 1
            and lora_B.stride(-1) == 1 and weight.dtype != torch.float64):
        with torch.no_grad(), _autocast_off(weight.device.type):
            wsq, aat = _weight_sq(weight, torch.float32), adapter_gram(lora_A)
            return weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling, wsq, aat), (wsq, aat)
    return dora_weight_norm(weight, lora_A, lora_B, scaling), None


# ----------------------------------------------------------------------------------------------- the ops
_lib = torch.library.Library("lora_kernels", "FRAGMENT")
_lib.define(
    "dora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor g, float scaling, "
    "float p, Tensor? seed, int offset, str backend, bool save_z, bool save_y) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "dora_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor g, Tensor u, "
    "Tensor z, bool z_is_y, float scaling, float p, Tensor? seed, int offset, str backend, bool need_dx, "
    "bool need_dA, bool need_dB, bool need_dg) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fast(backend: str, t: torch.Tensor) -> bool:
    """Triton element-wise passes for the fast backends; plain PyTorch for the reference backend."""
    return backend != "torch" and _triton_usable_on(t.device.type)


# Whether Triton runs on a device type: a constant of the process that may import the backend, which dynamo cannot
# trace; under torch.compile it runs once at trace time and enters the graph as a constant (as ops._resolve).
@torch.compiler.assume_constant_result
def _triton_usable_on(device_type: str) -> bool:
    return triton_usable(torch.device(device_type))


def _fwd_impl(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend, save_z, save_y=False):
    """(y, u, z): z (the output before the column scale and bias) only with ``save_z``, else an empty tensor.
    ``save_y`` changes nothing here: the autograd's setup keeps y itself (p = 0, fast backends)."""
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    if M == 0:
        return x.new_empty(0, N), x.new_empty(0, r, dtype=_acc(x)), x.new_empty(0)
    be, fast = _dispatch.get(backend), _fast(backend, x)
    if p == 0.0:
        scaled = getattr(be, "forward_scaled", None) if not save_z else None  # the column scale inside the backend
        if scaled is not None:
            y, u = scaled(x, weight, bias, lora_A, lora_B, g.contiguous(), scaling, 0.0, 0, offset)
            return y, u, x.new_empty(0)
        z, u = be.forward(x, weight, None, lora_A, lora_B, scaling, 0.0, 0, offset)
        return scale_bias(z, g, bias, fast, out=None if save_z else z), u, (z if save_z else x.new_empty(0))
    sd, gq = ops._backend_seed(seed, p), g / (1.0 - p)
    K = x.shape[1]
    # By row chunks, so that the M×K x_k (then x_c) and the M×N z are transient per chunk, as in backward; with
    # z saved (the speed side of the trade) one chunk.
    chunks = [(0, M)] if save_z else _row_chunks_of(M, (N + K) * x.element_size())
    if len(chunks) == 1:
        y, u, z = _fwd_dropped_rows(x, weight, bias, lora_A, lora_B, gq, scaling, p, sd, offset, fast, be, None,
                                    keep_z=save_z)
        return y, u, (z if save_z else x.new_empty(0))
    y, u = x.new_empty(M, N), x.new_empty(M, r, dtype=_acc(x))
    k8 = calls_per_row(K)
    for m0, m1 in chunks:
        _fwd_dropped_rows(x[m0:m1], weight, bias, lora_A, lora_B, gq, scaling, p, sd, offset + m0 * k8, fast, be,
                          (y[m0:m1], u[m0:m1]), keep_z=False)
    return y, u, x.new_empty(0)


def _fwd_dropped_rows(x, weight, bias, lora_A, lora_B, gq, scaling, p, sd, offset, fast, be, out, keep_z):
    """y, u (and z) of rows x at p > 0: z = x_k Wᵀ + s·x_k Aᵀ Bᵀ, y = (g/q) ⊙ z + b + x_c Wᵀ (gq = g/q).
    ``out`` = (y, u) row slices to write, or None to allocate (y then over z unless ``keep_z``)."""
    q = 1.0 - p
    xk = masked(x, p, sd, offset, 1.0, 0.0, fast)  # keep ⊙ x
    scaled = getattr(be, "forward_scaled", None) if (out is None and not keep_z) else None
    if scaled is not None:  # (g/q) ⊙ z + b from the backend itself
        y, u = scaled(xk, weight, bias, lora_A, lora_B, gq.contiguous(), scaling, 0.0, 0, offset)
        z = None
    else:
        z, u = be.forward(xk, weight, None, lora_A, lora_B, scaling, 0.0, 0, offset)
        y = scale_bias(z, gq, bias, fast, out=out[0] if out is not None else (None if keep_z else z))
    xc = masked(x, p, sd, offset, 1.0 - 1.0 / q, 1.0, fast, out=xk)  # x − keep ⊙ x / q, over x_k
    y.addmm_(xc, weight.t())
    if out is not None:
        out[1].copy_(u)
    return y, u, z


def _row_chunks_of(M: int, row_bytes: int):
    """Row ranges with at most ``BWD_CHUNK_BYTES`` of per-row temporaries each: balanced, a multiple of 64 rows
    when over 64 (whole tiles for the GEMMs)."""
    n = max(1, -(-M * row_bytes // max(1, BWD_CHUNK_BYTES)))
    if n == 1:
        return [(0, M)]
    rows = -(-M // n)
    if rows > _CHUNK_ALIGN:
        rows = -(-rows // _CHUNK_ALIGN) * _CHUNK_ALIGN
    return [(i, min(i + rows, M)) for i in range(0, M, rows)]


def _bwd_impl(dy, x, weight, bias, lora_A, lora_B, g, u, z, z_is_y, scaling, p, seed, offset, backend,
              need_dx, need_dA, need_dB, need_dg, norm_parts=None):
    """The backward's grads; ``norm_parts``: the forward's (‖W_n‖², A Aᵀ) where it has them (the eager fast path),
    else the recompute test's inputs are taken again here (the ‖W_n‖² cache, A Aᵀ)."""
    acc = _acc(x)
    M, K = x.shape
    N = weight.shape[0]
    empty = x.new_empty(0)
    if M == 0:
        return (torch.zeros_like(x) if need_dx else empty, torch.zeros_like(lora_A) if need_dA else empty,
                torch.zeros_like(lora_B) if need_dB else empty,
                torch.zeros(N, dtype=acc, device=x.device) if need_dg else empty)
    be, fast = _dispatch.get(backend), _fast(backend, x)
    sd, q = ops._backend_seed(seed, p), 1.0 - p
    dx = dA = dB = dg = None
    wsq_aat = norm_parts if norm_parts is not None and norm_parts[0].dtype == acc else None
    wsq = (lambda: wsq_aat[0]) if wsq_aat is not None else (lambda: _weight_sq(weight, acc))
    aat = wsq_aat[1] if wsq_aat is not None else None
    one_call = getattr(be, "backward_dx_from", None) if (p == 0.0 and need_dx and z.numel() > 0) else None
    if one_call is not None:
        # p = 0 with z (or y) saved, on a backend whose backward takes dx's frozen product from another operand:
        # dy_c = g ⊙ dy and dg first (one pass over dy and z), then one backward of (dy, Bg) for every grad:
        # dx = dy_c W + s·(dy Bg) A, dA, dB·/g; dy read once more (its pass), not twice.
        recompute = (x, weight, u, lora_A, lora_B, scaling, wsq()) if need_dg and z_is_y else None
        dyc, dg = scale_colsum(dy, z, g, True, need_dg, fast, from_y=z_is_y, bias=bias, recompute=recompute,
                               aat=aat)
        bg = (lora_B.to(acc) * g[:, None]).to(lora_B.dtype)
        dx, dA, dB = one_call(dy, x, weight, lora_A, bg, u, dyc, scaling, 0.0, 0, 0, True, need_dA, need_dB)
        if need_dB:
            dB = (dB.to(acc) * g[:, None]).to(lora_B.dtype)
        return (dx, dA if need_dA else empty, dB if need_dB else empty, dg if need_dg else empty)
    saved = z.numel() > 0  # z, or y to take z from: nothing to recompute
    # z recomputed, with float32 adapters on a 16-bit x (PEFT keeps the LoRA term in float32 there): only its base
    # x_k Wᵀ, by the frozen GEMM in x's dtype as PEFT's base layer computes it; z's LoRA part enters dg as
    # Σ_m dy ⊙ (u Bᵀ) = Σ_j B ⊙ (dyᵀ u), from dB's product dyᵀ u, which the backend computes in float32. (z whole,
    # rounded to x's dtype, carries the rounding of its LoRA part: several times PEFT's error in dg where that part
    # is large against the base.) With adapters in x's dtype z comes whole from the backend's forward, as PEFT
    # rounds its LoRA term to x's dtype too (dyᵀ u in x's dtype would lose more).
    split_z = need_dg and not saved and lora_B.dtype != x.dtype
    dbu = None  # dyᵀ u (N, r), the backend's dB of (dy, Bg) before its scale
    # The adapters' grads (and at p > 0 dx without the masked base-weight term) from unrounded dy, with Bg = g ⊙ B.
    if need_dA or need_dB or split_z or (need_dx and p > 0.0):
        bg = (lora_B.to(acc) * g[:, None]).to(lora_B.dtype)
        dx, dA, dbu = be.backward(dy, x, weight, lora_A, bg, u, scaling, p, sd, offset,
                                  need_dx and p > 0.0, need_dA, need_dB or split_z)
        if need_dB:
            dB = (dbu.to(acc) * (g if p == 0.0 else g / q)[:, None]).to(lora_B.dtype)
    if need_dg or need_dx:
        c = g if p == 0.0 else (g - 1.0) / q
        # per-row temporaries of a chunk: z (or the dy_c buffer) and, p = 0, the chunk's dx / p > 0, x_k then dy_c W.
        # With z or y saved (nothing to recompute) one chunk: dy_c (M×N) is then transient for the whole backward,
        # and no chunk's dx is copied into dx (by row chunks, 4096->14336 at M = 8192 took 1.68x the floor's GPU
        # time against 1.37x in one).
        chunks = [(0, M)] if saved else _row_chunks_of(M, (N + K) * x.element_size())
        if need_dx and p == 0.0 and len(chunks) > 1:
            dx = x.new_empty(M, K)
        k8 = calls_per_row(K)
        for m0, m1 in chunks:
            rows = (lambda t: t) if len(chunks) == 1 else (lambda t: t[m0:m1])  # no slicing ops for one chunk
            xs, dys, us, off = rows(x), rows(dy), rows(u), offset + m0 * k8
            zs, xk = (rows(z) if saved else None), None
            if need_dg and not saved:  # z of these rows (no bias; x_k = x at p = 0): whole, or its base (split_z)
                xk = xs if p == 0.0 else masked(xs, p, sd, off, 1.0, 0.0, fast)
                zs = (torch.mm(xk, weight.t()) if split_z
                      else be.forward(xk, weight, None, lora_A, lora_B, scaling, 0.0, 0, 0)[0])
                if p == 0.0:
                    xk = None  # x itself: not a buffer for dy_c W
            # dg += Σ_m dy ⊙ z;  dy_c = c ⊙ dy, written over a recomputed z (the saved z or y is left alone);
            # from y (p = 0): z = (y − b)/g, and the columns y cannot give (g = 0, a bias and a small g, or an
            # adapter row large against W's: dora_kernels.z_lost_from_y) from z recomputed there alone
            recompute = (xs, weight, us, lora_A, lora_B, scaling, wsq()) if need_dg and z_is_y else None
            dyc, part = scale_colsum(dys, zs, c, need_dx, need_dg, fast, out=zs if (need_dg and not saved) else None,
                                     from_y=z_is_y, bias=bias, recompute=recompute, aat=aat)
            if need_dg:
                dg = part if dg is None else dg.add_(part)
            if not need_dx:
                continue
            if p == 0.0:
                dxs = be.backward(dyc, xs, weight, lora_A, lora_B, us, scaling, 0.0, 0, 0, True, False, False)[0]
                if len(chunks) > 1:
                    dx[m0:m1].copy_(dxs)
                else:
                    dx = dxs
            else:  # dx += keep ⊙ (dy_c W), the product written over x_k when there is one
                t = torch.mm(dyc, weight, out=xk) if xk is not None else torch.mm(dyc, weight)
                masked(t, p, sd, off, 1.0, 0.0, fast, base=rows(dx), out=rows(dx))
        if split_z:  # z's LoRA part: Σ_m dy ⊙ (u Bᵀ), u = s·x_k Aᵀ as the forward saved it
            dg = dg + (lora_B.to(acc) * dbu.to(acc)).sum(1)
        if need_dg and p > 0.0:
            dg = dg / q
    return (dx if need_dx else empty, dA if need_dA else empty, dB if need_dB else empty,
            dg if need_dg else empty)


_lib.impl("dora_fwd", _fwd_impl, "CompositeExplicitAutograd")
_lib.impl("dora_bwd", _bwd_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("lora_kernels::dora_fwd")
def _fwd_fake(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend, save_z, save_y):
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty(M, N), x.new_empty(M, lora_A.shape[0], dtype=_acc(x)),
            x.new_empty(M, N) if save_z and M else x.new_empty(0))


@torch.library.register_fake("lora_kernels::dora_bwd")
def _bwd_fake(dy, x, weight, bias, lora_A, lora_B, g, u, z, z_is_y, scaling, p, seed, offset, backend,
              need_dx, need_dA, need_dB, need_dg):
    empty = x.new_empty(0)
    return (torch.empty_like(x) if need_dx else empty, torch.empty_like(lora_A) if need_dA else empty,
            torch.empty_like(lora_B) if need_dB else empty, torch.empty_like(g) if need_dg else empty)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend, save_z, save_y = inputs
    # save_y holds at p = 0 without save_z: the output y itself (the tensor the call returns, not a copy) in z's place
    z_is_y = bool(save_y and not save_z and p == 0.0)
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, g, output[1], output[0] if z_is_y else output[2], seed)
    ctx.args = (scaling, p, offset, backend, bias is not None, z_is_y)


def _backward(ctx, dy, *_unused, bwd=None):
    x, weight, bias, lora_A, lora_B, g, u, z, seed = ctx.saved_tensors
    scaling, p, offset, backend, has_bias, z_is_y = ctx.args
    need_dx, need_dW, need_db, need_dA, need_dB, need_dg = ctx.needs_input_grad[:6]
    dy = dy.contiguous()
    dx, dA, dB, dg = (bwd or torch.ops.lora_kernels.dora_bwd)(
        dy, x, weight, bias, lora_A, lora_B, g, u, z, z_is_y, scaling, p, seed, offset, backend, need_dx, need_dA,
        need_dB, need_dg)
    dW = _dweight(dy, x, weight, g, p, seed, offset) if need_dW else None
    db = dy.to(_acc(dy)).sum(0).to(dy.dtype) if (need_db and has_bias) else None
    return (dx if need_dx else None, dW, db, dA if need_dA else None, dB if need_dB else None,
            dg if need_dg else None, None, None, None, None, None, None, None)


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
    autograd wrapper; see ``lora_kernels.ops._EagerLoRA``). ``norm_parts`` (the norm's (‖W_n‖², A Aᵀ), or None)
    goes to the backward as it is: the op's schema does not carry it."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend, save_z, save_y,
                norm_parts=None):
        y, u, z = _fwd_impl(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend, save_z)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, g, scaling, p, seed, offset, backend, save_z,
                             save_y), (y, u, z))
        ctx.norm_parts = norm_parts
        return y

    @staticmethod
    def backward(ctx, dy):
        bwd = functools.partial(_bwd_impl, norm_parts=ctx.norm_parts)
        # the kernels record no graph: under create_graph=True the grads come back first-order (ops.first_order), so
        # a double backward raises instead of giving wrong numbers
        if torch.is_grad_enabled():
            with torch.no_grad():
                grads = _backward(ctx, dy, bwd=bwd)
            x, weight, _, lora_A, lora_B, g = ctx.saved_tensors[:6]
            return ops.first_order(grads, dy, x, weight, lora_A, lora_B, g) + (None,)
        return _backward(ctx, dy, bwd=bwd) + (None,)


# ------------------------------------------------------------------------------------------ the public op
def _check_magnitude(magnitude, x, N):
    def fail(msg):
        raise ValueError(f"dora_linear: {msg}")

    if not isinstance(magnitude, torch.Tensor):
        fail(f"magnitude must be a Tensor, got {type(magnitude).__name__}")
    if magnitude.layout != torch.strided:
        fail(f"magnitude must be a dense (strided) tensor, got layout {magnitude.layout}")
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


def _composite(x, weight, bias, lora_A, lora_B, scaling, magnitude, p, seed):
    """dora_linear on 2-D x as plain PyTorch ops, the reference math in the accumulation dtype, for the transforms
    that only such ops carry (ops.transform_backend): the transform differentiates or batches it itself. The norm is
    the reference's (detached, as in PEFT)."""
    acc = _acc(x, lora_A, lora_B, magnitude)
    s = float(scaling)
    g = magnitude.to(acc) / dora_weight_norm(weight, lora_A, lora_B, s).to(acc)
    xa, Wa = x.to(acc), weight.to(acc)
    xd = xa if p == 0.0 else xa * ops.dropout_mask(seed, 0, x.shape, p, device=x.device) / (1.0 - p)
    lora = s * ((xd @ lora_A.to(acc).t()) @ lora_B.to(acc).t())
    base = xa @ Wa.t()
    y = g * (base + lora) if p == 0.0 else base + (g - 1.0) * (xd @ Wa.t()) + g * lora
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


_BLAS_READY: set = set()  # (thread, device index) where this module has made sure of a cuBLAS handle


def _blas_ready(y: torch.Tensor) -> None:
    """Makes sure this thread has its cuBLAS handle on y's device. Eager calls on the cuda backend run in C++ without
    cuBLAS, while the calls it declines, graph capture among them, run the Python path, which multiplies with
    torch (A Aᵀ): a capture warmed up by eager calls (as torch recommends) would otherwise create the handle inside
    the capture, which cuBLAS refuses."""
    key = (threading.get_ident(), y.get_device())
    if key not in _BLAS_READY:
        with torch.cuda.device(y.device):
            torch.cuda.current_blas_handle()
        _BLAS_READY.add(key)


def _all_dropped(x, weight, bias, lora_A, lora_B, scaling, magnitude, backend):
    """DoRA at p = 1 in training (PEFT allows it): x_d = 0, so y = x Wᵀ + b, and the grads of lora_A, lora_B and
    the magnitude are zero. lora_linear at p = 1 gives x Wᵀ + b with zero grads for the adapters (and dx = dy W);
    the magnitude joins through an exact zero added per column, so that its grad is zero as well (NaN where dy is,
    as in PEFT, whose magnitude grad is Σ_m dy ⊙ 0)."""
    y = ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling, 1.0, training=True, backend=backend)
    if torch.is_grad_enabled() and magnitude.requires_grad:
        y = y + (magnitude * 0.0).to(y.dtype)
    return y


def dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, dropout_p=0.0, training=True, backend=None):
    """Fused DoRA linear with PEFT 0.21's semantics (see the module docstring):

        g = magnitude / ‖W + scaling·B A‖_row (detached);  y = x Wᵀ + b + (g−1)⊙(x_d Wᵀ) + g⊙(scaling·x_d Aᵀ Bᵀ)

    x: (..., K); weight: (N, K) (frozen in the fast path); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r);
    magnitude: (N,). Adapters and magnitude in float32 or x's dtype. x_d = dropout(x) with the contract's mask
    (``lora_kernels.dropout_mask`` / ``record_dropout``) when ``training`` and ``dropout_p > 0``, else x_d = x;
    ``dropout_p = 1`` drops all of x_d (y = x Wᵀ + b; the adapters' and the magnitude's grads are zero).
    Returns (..., N) in x's dtype; grads for x, lora_A, lora_B and magnitude (and weight/bias if they require
    grad). ``backend``: None/'auto', 'torch', 'triton', 'cuda', as ``lora_linear``.
    """
    # The whole call in C++ where the backend has an entry for it (the cuda backend: csrc/dora_autograd.h, the same
    # math as below: SAVE_Y at p = 0, the row chunks of BWD_CHUNK_BYTES at p > 0): it declines (None) every call that
    # it does not run as the code below would. Not under torch.compile, a functorch transform, with SAVE_Z, at p = 0
    # without SAVE_Y (the entry keeps y there), or with dropout inside a record_dropout block (the seeds are recorded
    # here).
    backend, composite = ops.transform_backend(backend, "dora_linear", x, weight, bias, lora_A, lora_B, magnitude)
    dropped = bool(training and isinstance(dropout_p, (int, float)) and dropout_p > 0)
    if (not SAVE_Z and (SAVE_Y or dropped) and not (ops._recorders and dropped) and not composite
            and not torch.compiler.is_compiling()):
        y = _dispatch.call_entry(backend, "dora_entry", x, weight, bias, lora_A, lora_B, scaling, magnitude,
                                 dropout_p, training, int(BWD_CHUNK_BYTES))
        if y is not None:
            _blas_ready(y)
            return y
    norm_weight = weight
    # behave like F.linear under autocast; the norm takes W as given
    x, weight, bias = ops.autocast_inputs(x, weight, bias)
    try:
        ops._check(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    except ValueError as e:
        raise ValueError(str(e).replace("lora_linear:", "dora_linear:", 1)) from None
    N = weight.shape[0]
    _check_magnitude(magnitude, x, N)
    _check_float64(x, lora_A, lora_B, magnitude)
    p = float(dropout_p) if training else 0.0
    # Under CUDA graph capture the dropout seed lives on the device, drawn from its generator, which refills it on
    # every replay (a seed drawn on the host would be baked into the graph: one mask for every replay); as
    # lora_linear does. torch.compile draws the host seed inside its graph.
    capturing = (p > 0.0 and not torch.compiler.is_compiling() and x.is_cuda
                 and torch.cuda.is_current_stream_capturing())
    name = ops._resolve(backend, x.device.type, x.dtype == torch.float64, capturing)
    if p == 1.0:
        return _all_dropped(x, weight, bias, lora_A, lora_B, scaling, magnitude, name)
    # No seed at all without dropout (as lora_linear): a module-level tensor passed here would enter every compiled
    # graph as an input and, saved for backward, leave the forward graph as an output, which CUDA graph trees
    # (mode="reduce-overhead") refuse. With dropout the seed is drawn here, inside a compiled graph when compiling.
    seed = (ops._draw_seed(x.device) if capturing else ops._draw_seed()) if p > 0.0 else None
    if p > 0.0 and ops._recorders:
        ops._record(seed)
    if composite:  # under forward AD or a torch.func transform (ops.transform_backend)
        y = _composite(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, magnitude, p,
                       ops._backend_seed(seed, p))
        return y.reshape(*x.shape[:-1], N)
    fast = _fast(name, x)
    norm, norm_parts = _norm(norm_weight, lora_A, lora_B, scaling, fast)
    g = magnitude.to(_acc(x)) / norm.to(_acc(x))
    two_d = x.dim() == 2
    x2 = x if two_d else x.reshape(-1, x.shape[-1])
    compiling = torch.compiler.is_compiling()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, lora_A, lora_B, g))
    save_z = bool(SAVE_Z) and (grad or compiling)
    # y kept for the backward in z's place on the fast backends (the torch backend recomputes); _setup_context
    # applies it where it holds: p = 0, z not saved
    save_y = bool(SAVE_Y) and (grad or compiling) and fast
    args = (x2.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
            lora_A.contiguous(), lora_B.contiguous(), g, float(scaling), p, seed, 0, name, save_z, save_y)
    if compiling:
        y = torch.ops.lora_kernels.dora_fwd(*args)[0]
    elif grad:
        y = _EagerDoRA.apply(*args, norm_parts)
    else:
        y = _fwd_impl(*args)[0]
    return y if two_d else y.reshape(*x.shape[:-1], N)
