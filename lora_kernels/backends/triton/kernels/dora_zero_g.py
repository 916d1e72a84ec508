"""DoRA's magnitude grad for the columns whose z the saved y cannot give (g = 0, a bias and a small g, or an adapter
row large against W's: lora_kernels/dora_kernels.py's z_lost_from_y): z recomputed there, dg_n = Σ_m dy ⊙ z.

Math    : z = x Wᵀ + u Bᵀ (u holds s), dg_n = Σ_m dy_mn z_mn, for the flagged columns only.
Tiling  : grid (column blocks of BN, row splits of ROWS rows). A program tests its columns first; a block without a
          flagged column returns (the common case: DoRA keeps g near 1 and the adapter small against W). Otherwise
          it is a GEMM tile loop: (BM, BN) tiles of x Wᵀ over K on the tensor cores (16-bit x: exact products, float32
          sums; float32 x: "ieee" dots), u Bᵀ added as float32 "ieee" dots, and Σ dy ⊙ z over its rows into its
          partial. Where every column is flagged (an adapter larger than W, as in a benchmark's random init) the pass
          costs about one GEMM, not one per column block.
Finish  : one more launch sums each column's row-split partials in a fixed order (deterministic): the recompute's
          in a flagged column, the colsum's (from y, dora_colsum.py) in every other. The two passes share one buffer
          of partials (lora_kernels/dora_kernels.py's scale_colsum with recompute=), whose last row holds the flags
          (from the row-split-0 programs).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dora_norm import _quadratic_form


@triton.jit
def _zero_g_colsum_kernel(x_ptr, w_ptr, u_ptr, bl_ptr, aat_ptr, wsq_ptr, g_ptr, b_ptr, dy_ptr, part_ptr, M, K, N, R,
                          ROWS, ROW0, FLAG_ROW, s_xm, s_wn, s_um, s_bn, s_dm, min_g, s_sq, max_adapter_sq,
                          HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, R_PAD: tl.constexpr, BR: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # the columns whose z y cannot give (z_lost_from_y): g = 0, where y = b; a bias and |g| < min_g; or
    # s²·B_n (A Aᵀ) B_nᵀ > max_adapter_sq·‖W_n‖², the adapter's row large against W_n's
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
    split = tl.program_id(1)
    if split == 0:  # the flags, for the finish
        tl.store(part_ptr + FLAG_ROW * N + offs_n, lost.to(tl.float32), mask=n_mask)
    if tl.sum(lost.to(tl.int32), axis=0) > 0:
        acc = tl.zeros((BN,), dtype=tl.float32)
        m_begin = split * ROWS
        for m0 in range(m_begin, tl.minimum(m_begin + ROWS, M), BM):
            offs_m = m0 + tl.arange(0, BM)
            m_mask = offs_m < M
            rows = offs_m.to(tl.int64)
            z = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_mask = offs_k < K
                xk = tl.load(x_ptr + rows[:, None] * s_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                             other=0.0)
                wk = tl.load(w_ptr + cols[None, :] * s_wn + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                             other=0.0)  # (BK, BN): Wᵀ's tile
                if IEEE:
                    z = tl.dot(xk.to(tl.float32), wk.to(tl.float32), z, input_precision="ieee")
                else:
                    z = tl.dot(xk, wk, z)
            for j0 in range(0, R_PAD, BR):  # + u Bᵀ in BR-column pieces of u and B (float32, L2-resident)
                jj = j0 + tl.arange(0, BR)
                j_mask = jj < R
                uu = tl.load(u_ptr + rows[:, None] * s_um + jj[None, :], mask=m_mask[:, None] & j_mask[None, :],
                             other=0.0).to(tl.float32)
                bb = tl.load(bl_ptr + cols[:, None] * s_bn + jj[None, :], mask=n_mask[:, None] & j_mask[None, :],
                             other=0.0).to(tl.float32)
                z = tl.dot(uu, tl.trans(bb), z, input_precision="ieee")
            dy = tl.load(dy_ptr + rows[:, None] * s_dm + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(dy * z, axis=0)
        tl.store(part_ptr + (ROW0 + split).to(tl.int64) * N + offs_n, acc, mask=lost)


@triton.jit
def _colsum_finish_kernel(part_ptr, dg_ptr, N, S_COLSUM, Z_ROW0, S_Z, FLAG_ROW, BN: tl.constexpr):
    # dg_n = Σ of the recompute's partials (rows Z_ROW0.., S_Z of them) in a flagged column, else of the colsum's
    # (rows 0.., S_COLSUM of them), each in split order
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    lost = (tl.load(part_ptr + FLAG_ROW * N + offs_n, mask=n_mask, other=0.0) != 0.0) & n_mask
    kept = n_mask & (lost == 0)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for s in range(0, S_COLSUM):
        acc += tl.load(part_ptr + s * N + offs_n, mask=kept, other=0.0)
    if tl.sum(lost.to(tl.int32), axis=0) > 0:
        for s in range(0, S_Z):
            acc += tl.load(part_ptr + (Z_ROW0 + s) * N + offs_n, mask=lost, other=0.0)
    tl.store(dg_ptr + offs_n, acc, mask=n_mask)
