"""DoRA's forward column scale: out = c ⊙ z + b (c the per-column g, z an (M, N) product), one read of z and
one write. Grid (row blocks, column blocks)."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import _col_scale_bias


@triton.jit
def _scale_bias_kernel(z_ptr, c_ptr, b_ptr, out_ptr, M, N, s_zm, s_om,
                       HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    z = tl.load(z_ptr + offs_m.to(tl.int64)[:, None] * s_zm + offs_n[None, :], mask=mask, other=0.0)
    out = _col_scale_bias(z.to(tl.float32), c_ptr, b_ptr, offs_n, n_mask, True, HAS_BIAS)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * s_om + offs_n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
