"""DoRA's magnitude grad for the columns whose z the saved y cannot give (g = 0, a bias and a small g, or an adapter
row large against W's: lora_kernels/dora_kernels.py's z_lost_from_y): z recomputed there, dg_n = Σ_m dy ⊙ z. A rare
path: the other column blocks return once they have found none among their columns."""
from __future__ import annotations

import triton
import triton.language as tl

from .dora_norm import _quadratic_form


@triton.jit
def _zero_g_colsum_kernel(x_ptr, w_ptr, u_ptr, bl_ptr, aat_ptr, wsq_ptr, g_ptr, b_ptr, dy_ptr, dg_ptr, M, K, N, R,
                          s_xm, s_wn, s_um, s_bn, s_dm, min_g, s_sq, max_adapter_sq, HAS_BIAS: tl.constexpr,
                          R_PAD: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr):
    # grid (column blocks,): a block with a column whose z y cannot give (z_lost_from_y: g = 0, where y = b; a bias
    # and |g| < min_g; or s²·B_n (A Aᵀ) B_nᵀ > max_adapter_sq·‖W_n‖², the adapter's row large against W_n's) computes
    # those columns' z = x Wᵀ + u Bᵀ (u holds s) and writes dg = Σ_m dy ⊙ z there; the other blocks return after
    # the test. float32 "ieee" dots: float32 accuracy.
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    gn = tl.load(g_ptr + offs_n, mask=n_mask, other=1.0)
    lost = gn == 0.0
    if HAS_BIAS:
        bn = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        lost = lost | ((bn != 0.0) & (tl.abs(gn) < min_g))
    cols = offs_n.to(tl.int64)
    # ‖s·(B A)_n‖² = s²·B_n (A Aᵀ) B_nᵀ: the norm combine's quadratic form, in (BR, BR) pieces of B and A Aᵀ (whole,
    # at r = 256, they would spill)
    adapter_sq = s_sq * _quadratic_form(bl_ptr, aat_ptr, cols[:, None], n_mask, s_bn, R, False, R_PAD, BN, BR, BR)
    wsq = tl.load(wsq_ptr + offs_n, mask=n_mask, other=0.0)
    lost = lost | (adapter_sq > max_adapter_sq * wsq)
    lost = lost & n_mask
    if tl.sum(lost.to(tl.int32), axis=0) > 0:
        rr = tl.arange(0, R_PAD)
        bl = tl.load(bl_ptr + cols[:, None] * s_bn + rr[None, :], mask=n_mask[:, None] & (rr < R)[None, :],
                     other=0.0).to(tl.float32)  # (BN, R_PAD)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for m0 in range(0, M, BM):
            offs_m = m0 + tl.arange(0, BM)
            m_mask = offs_m < M
            rows = offs_m.to(tl.int64)
            z = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_mask = offs_k < K
                xk = tl.load(x_ptr + rows[:, None] * s_xm + offs_k[None, :],
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                wk = tl.load(w_ptr + cols[:, None] * s_wn + offs_k[None, :],
                             mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                z = tl.dot(xk, tl.trans(wk), z, input_precision="ieee")
            uu = tl.load(u_ptr + rows[:, None] * s_um + rr[None, :], mask=m_mask[:, None] & (rr < R)[None, :],
                         other=0.0).to(tl.float32)
            z = tl.dot(uu, tl.trans(bl), z, input_precision="ieee")
            dy = tl.load(dy_ptr + rows[:, None] * s_dm + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(dy * z, axis=0)
        tl.store(dg_ptr + offs_n, acc, mask=lost)
