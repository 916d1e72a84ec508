"""DoRA's row norm, first pass: W Aᵀ (N, r) in float32, one read of W, per-K-split partials."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot16(a, b, acc, WIDEN: tl.constexpr):
    """acc + a @ b for 16-bit a, b with float32 accumulation; WIDEN (the interpreter, whose bf16 dots are wrong):
    the operands widened to float32 first (exact), an "ieee" dot."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _w_at_kernel(w_ptr, a_ptr, part_ptr, N, K, R, K_PER_SPLIT, s_wn, s_ar,
                 MODE: tl.constexpr, WIDEN: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):
    # grid (row blocks, K splits): partial W Aᵀ over this program's K range, float32 (BN, R_PAD) per program.
    # MODE 1: one dot in W's dtype (16-bit A of W's dtype: exact products); 2: bf16 W, float32 A split into
    # three bf16 pieces hi + mid + lo (8 + 8 + 8 bits: A to float32 rounding), three bf16 dots with exact
    # products; 3: float32 operands as 3xTF32 (float32 W, or fp16 W with float32 A; "ieee" when WIDEN).
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    rr = tl.arange(0, R_PAD)
    r_mask = rr < R
    k_start = tl.program_id(1) * K_PER_SPLIT
    acc = tl.zeros((BN, R_PAD), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < K
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * s_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.trans(tl.load(a_ptr + rr[:, None] * s_ar + offs_k[None, :],
                             mask=r_mask[:, None] & k_mask[None, :], other=0.0))  # Aᵀ tile (BK, R_PAD)
        if MODE == 1:
            acc = _dot16(w, a.to(w.dtype), acc, WIDEN)
        elif MODE == 2:
            a32 = a.to(tl.float32)
            hi = a32.to(tl.bfloat16)
            rest = a32 - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            acc = _dot16(w, hi, acc, WIDEN)
            acc = _dot16(w, mid, acc, WIDEN)
            acc = _dot16(w, lo, acc, WIDEN)
        elif WIDEN:
            acc = tl.dot(w.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(tl.float32), a.to(tl.float32), acc, input_precision="tf32x3")
    p_ptrs = part_ptr + (tl.program_id(1).to(tl.int64) * N + offs_n)[:, None] * R + rr[None, :]
    tl.store(p_ptrs, acc, mask=n_mask[:, None] & r_mask[None, :])
