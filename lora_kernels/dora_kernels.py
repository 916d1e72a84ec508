"""The element-wise passes of the DoRA op (``lora_kernels.dora``) around the LoRA backends' forward/backward.

Each pass reads its inputs once and rounds once; math in float32 (float64 for float64 inputs):

    scale_bias(z, c, bias)              -> c ⊙ z + b                           per-column scale c (N,)
    scale_colsum(dy, z, c)              -> (c ⊙ dy, Σ_m dy ⊙ z)                 the magnitude grad's reduction,
                                                                               fused with the pass that scales dy
    masked(t, p, seed, offset, ak, ad, base=None)
                                        -> base + where(keep, ak·t, ad·t)       keep = the contract's dropout mask
    row_norm(W, A, B, s)                -> ‖W + s·B A‖_row (N,)                 Triton only: tiles of W + s·B A
                                                                               formed in registers, never stored

``fast=True`` runs Triton kernels (on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1): one pass and no
temporary. ``fast=False`` is plain PyTorch (the torch backend's reference, and the fallback where Triton cannot
run); it materialises float32 temporaries of the tensors' size. The column sums are deterministic: each
(column block, row split) program writes a partial sum, and the partials are summed with torch in a fixed order.
"""
from __future__ import annotations

import os

import torch

from .philox import calls_per_row, keep_threshold
from .philox import dropout_mask as _ref_mask

try:
    import triton
    import triton.language as tl

    from .backends.triton import _keep_mask, _num_sms, _seed_arg
except Exception:  # no triton here: only the PyTorch versions run
    triton = None


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton versions can run on tensors of ``device``: the triton backend is available (cached by
    ``_dispatch``) and the tensors are on CUDA or the interpreter runs."""
    from . import _dispatch

    if triton is None or _dispatch.get("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interp(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


if triton is not None:

    @triton.jit
    def _scale_bias_kernel(z_ptr, c_ptr, b_ptr, out_ptr, M, N, s_zm, s_om,
                           HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_mask = offs_n < N
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        z = tl.load(z_ptr + offs_m.to(tl.int64)[:, None] * s_zm + offs_n[None, :], mask=mask, other=0.0)
        c = tl.load(c_ptr + offs_n, mask=n_mask, other=0.0)
        out = z.to(tl.float32) * c[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * s_om + offs_n[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_colsum_kernel(dy_ptr, z_ptr, c_ptr, out_ptr, part_ptr, M, N, ROWS_PER_SPLIT, s_dm, s_zm, s_om,
                             NEED_OUT: tl.constexpr, NEED_SUM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # grid (column blocks, row splits): each program loops over its rows, so dy is read once
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_mask = offs_n < N
        m_start = tl.program_id(1) * ROWS_PER_SPLIT
        c = tl.load(c_ptr + offs_n, mask=n_mask, other=0.0)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for m0 in range(m_start, tl.minimum(m_start + ROWS_PER_SPLIT, M), BM):
            offs_m = m0 + tl.arange(0, BM)
            mask = (offs_m < M)[:, None] & n_mask[None, :]
            rows = offs_m.to(tl.int64)[:, None]
            dy = tl.load(dy_ptr + rows * s_dm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            if NEED_SUM:
                z = tl.load(z_ptr + rows * s_zm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(dy * z, axis=0)
            if NEED_OUT:
                tl.store(out_ptr + rows * s_om + offs_n[None, :], (dy * c[None, :]).to(out_ptr.dtype.element_ty),
                         mask=mask)
        if NEED_SUM:
            tl.store(part_ptr + tl.program_id(1).to(tl.int64) * N + offs_n, acc, mask=n_mask)

    @triton.jit
    def _masked_kernel(t_ptr, base_ptr, out_ptr, M, K, s_tm, s_bm, s_om, a_keep, a_drop,
                       seed, offset, K8, thr, HAS_BASE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        k0 = tl.program_id(1) * BK  # a multiple of 8, as the mask's column groups need
        offs_k = k0 + tl.arange(0, BK)
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        t = tl.load(t_ptr + rows * s_tm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        keep = _keep_mask(seed, offset, offs_m, k0, K8, thr, BM, BK)
        out = tl.where(keep, t * a_keep, t * a_drop)
        if HAS_BASE:
            out += tl.load(base_ptr + rows * s_bm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows * s_om + offs_k[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _row_norm_kernel(w_ptr, a_ptr, b_ptr, part_ptr, N, K, R, K_PER_SPLIT, s_wn, s_ar, s_bn, scaling,
                         PREC: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # grid (row blocks, K splits): partial Σ_k (W + s·B A)² over this program's K range
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_mask = offs_n < N
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
        bt = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * s_bn + rr[None, :],
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32) * scaling
        k_start = tl.program_id(1) * K_PER_SPLIT
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BK):
            offs_k = k0 + tl.arange(0, BK)
            k_mask = offs_k < K
            w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * s_wn + offs_k[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + rr[:, None] * s_ar + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            t = w + tl.dot(bt, a, input_precision=PREC)  # (W + s·B A) tile, float32
            acc += tl.sum(t * t, axis=1)
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * N + offs_n, acc, mask=n_mask)


def row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + scaling · B A‖ per row (N,) in float32: one Triton pass over W; each (rows, columns) tile of
    W + s·B A is formed in registers (B's rows stay loaded, A's columns stream). Same value as PEFT's norm, no
    N×K temporary, no cancellation (the sum of squares is taken directly). float32 products run as 3xTF32 on
    GPUs (about float32 accuracy on tensor cores); W, A, B must have unit stride along K / r."""
    N, K = weight.shape
    R = lora_A.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.float32, device=weight.device)
    r_pad = max(16, 1 << (R - 1).bit_length())
    interp = _interp(weight)
    BN, BK = (16, 32) if interp else ((32, 32) if r_pad >= 128 else (64, 64))
    n_blocks = _cdiv(N, BN)
    want = 1 if interp else max(1, 2 * _num_sms(weight.device) // n_blocks)
    per = _cdiv(_cdiv(K, BK), max(1, min(want, _cdiv(K, BK)))) * BK
    splits = max(1, _cdiv(K, per))
    part = torch.empty((splits, N), dtype=torch.float32, device=weight.device)
    _row_norm_kernel[(n_blocks, splits)](
        weight, lora_A, lora_B, part, N, K, R, per, weight.stride(0), lora_A.stride(0), lora_B.stride(0),
        float(scaling), PREC="ieee" if interp else "tf32x3", R_PAD=r_pad, BN=BN, BK=BK,
        num_warps=8 if r_pad >= 128 else 4)
    return part.sum(0).sqrt_()


def _tiles(t: torch.Tensor):
    return (16, 32) if _interp(t) else (32, 128)


def scale_bias(z: torch.Tensor, c: torch.Tensor, bias, fast: bool) -> torch.Tensor:
    """``c ⊙ z + bias`` (z (M, N) contiguous, c (N,) float32/64, bias (N,) or None), in z's dtype."""
    if not fast:
        acc = _acc(z)
        y = z.to(acc) * c.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        return y.to(z.dtype)
    M, N = z.shape
    out = torch.empty_like(z)
    if M == 0 or N == 0:
        return out
    BM, BN = _tiles(z)
    _scale_bias_kernel[(_cdiv(M, BM), _cdiv(N, BN))](
        z, c, bias if bias is not None else c, out, M, N, z.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BM=BM, BN=BN)
    return out


def scale_colsum(dy: torch.Tensor, z: torch.Tensor, c: torch.Tensor, need_out: bool, need_sum: bool, fast: bool):
    """(``c ⊙ dy`` in dy's dtype or None, ``Σ_m dy ⊙ z`` (N,) in float32/64 or None); one pass over dy and z."""
    acc = _acc(dy)
    M, N = dy.shape
    if not fast:
        d = dy.to(acc)
        return ((d * c.to(acc)).to(dy.dtype) if need_out else None,
                (d * z.to(acc)).sum(0) if need_sum else None)
    out = torch.empty_like(dy) if need_out else None
    if M == 0 or N == 0 or not (need_out or need_sum):
        return out, (torch.zeros(N, dtype=acc, device=dy.device) if need_sum else None)
    BM, BN = _tiles(dy)
    n_blocks = _cdiv(N, BN)
    want = 1 if _interp(dy) else max(1, 2 * _num_sms(dy.device) // n_blocks)  # about two programs per SM
    rows = _cdiv(_cdiv(M, BM), max(1, min(want, _cdiv(M, BM)))) * BM
    splits = _cdiv(M, rows)
    part = torch.empty((splits, N), dtype=torch.float32, device=dy.device) if need_sum else c
    _scale_colsum_kernel[(n_blocks, splits)](
        dy, z, c, out if need_out else dy, part, M, N, rows, dy.stride(0), z.stride(0),
        out.stride(0) if need_out else 0, NEED_OUT=need_out, NEED_SUM=need_sum, BM=BM, BN=BN)
    return out, (part.sum(0) if need_sum else None)


def masked(t: torch.Tensor, p: float, seed: int, offset: int, a_keep: float, a_drop: float, fast: bool,
           base=None, out=None) -> torch.Tensor:
    """``base + where(keep, a_keep·t, a_drop·t)`` in t's dtype, keep = dropout_mask(seed, offset, t.shape, p)
    for the flattened (M, K) t. ``out`` may be ``base`` or ``t`` (in place)."""
    M, K = t.shape
    if not fast:
        acc = _acc(t)
        keep = _ref_mask(seed, offset, (M, K), p, device=t.device)
        t32 = t.to(acc)
        r = torch.where(keep, t32 * a_keep, t32 * a_drop)
        if base is not None:
            r = r + base.to(acc)
        if out is None:
            return r.to(t.dtype)
        return out.copy_(r)
    if out is None:
        out = torch.empty_like(t)
    if M == 0 or K == 0:
        return out
    BM, BK = _tiles(t)
    _masked_kernel[(_cdiv(M, BM), _cdiv(K, BK))](
        t, base if base is not None else t, out, M, K, t.stride(0),
        base.stride(0) if base is not None else 0, out.stride(0), float(a_keep), float(a_drop),
        _seed_arg(seed), int(offset), calls_per_row(K), keep_threshold(p),
        HAS_BASE=base is not None, BM=BM, BK=BK)
    return out
