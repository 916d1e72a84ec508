"""DoRA's backward column pass: dy_c = c ⊙ dy and the magnitude grad's column sums Σ_m dy ⊙ z, one read of dy
(and of z, or of y to take z from), per-split partials summed afterwards in a fixed order."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scale_colsum_kernel(dy_ptr, z_ptr, c_ptr, b_ptr, out_ptr, part_ptr, M, N, ROWS_PER_SPLIT, s_dm, s_zm, s_om,
                         NEED_OUT: tl.constexpr, NEED_SUM: tl.constexpr, FROM_Y: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # grid (column blocks, row splits): each program loops over its rows, so dy is read once. FROM_Y: z_ptr is
    # y = c ⊙ z + b (p = 0, c = g), and z = (y − b)/c: Σ_m dy ⊙ (y − b) scaled by 1/c at the end (0 where
    # c = 0, whose columns zero_g_colsum fills)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    m_start = tl.program_id(1) * ROWS_PER_SPLIT
    c = tl.load(c_ptr + offs_n, mask=n_mask, other=0.0)
    if FROM_Y and HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for m0 in range(m_start, tl.minimum(m_start + ROWS_PER_SPLIT, M), BM):
        offs_m = m0 + tl.arange(0, BM)
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + rows * s_dm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_SUM:
            z = tl.load(z_ptr + rows * s_zm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            if FROM_Y and HAS_BIAS:
                z = tl.where(mask, z - b[None, :], 0.0)
            acc += tl.sum(dy * z, axis=0)
        if NEED_OUT:
            tl.store(out_ptr + rows * s_om + offs_n[None, :], (dy * c[None, :]).to(out_ptr.dtype.element_ty),
                     mask=mask)
    if NEED_SUM:
        if FROM_Y:
            acc = tl.where(c != 0.0, acc / tl.where(c != 0.0, c, 1.0), 0.0)
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * N + offs_n, acc, mask=n_mask)
