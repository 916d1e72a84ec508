"""DoRA's row norm, combine pass: ‖W_n + s(BA)_n‖ from ‖W_n‖², W Aᵀ's partials and A Aᵀ (no N×K temporary),
rows that cancel summed again directly."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _quadratic_form(b_ptr, aat_ptr, rows, n_mask, s_bn, R, ABS: tl.constexpr, R_PAD: tl.constexpr,
                    BN: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr):
    # B_n (A Aᵀ) B_nᵀ per row of the block (ABS: of |B_n| and |A Aᵀ|): by column blocks of A Aᵀ, (B AAᵀ)[:, j-block]
    # as float32 "ieee" dots over BR-row blocks of A Aᵀ (their operands stay in registers), times B[:, j-block]
    quad = tl.zeros((BN,), dtype=tl.float32)
    for j0 in range(0, R_PAD, BJ):
        jj = j0 + tl.arange(0, BJ)
        j_mask = jj < R
        t = tl.zeros((BN, BJ), dtype=tl.float32)
        for k0 in range(0, R_PAD, BR):
            kk = k0 + tl.arange(0, BR)
            k_mask = kk < R
            bk = tl.load(b_ptr + rows * s_bn + kk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                         other=0.0).to(tl.float32)
            ak = tl.load(aat_ptr + kk[:, None] * R + jj[None, :], mask=k_mask[:, None] & j_mask[None, :],
                         other=0.0)
            if ABS:
                bk, ak = tl.abs(bk), tl.abs(ak)
            t = tl.dot(bk, ak, t, input_precision="ieee")
        bj = tl.load(b_ptr + rows * s_bn + jj[None, :], mask=n_mask[:, None] & j_mask[None, :],
                     other=0.0).to(tl.float32)
        if ABS:
            bj = tl.abs(bj)
        quad += tl.sum(t * bj, axis=1)
    return quad


@triton.jit
def _norm_combine_kernel(part_ptr, wsq_ptr, b_ptr, aat_ptr, w_ptr, a_ptr, out_ptr, N, K, R, S, s_bn, s_wn, s_ar,
                         scaling, R_PAD: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr,
                         BK: tl.constexpr):
    # ‖W_n + s(BA)_n‖² = ‖W_n‖² + 2s·Σ_j B_nj (W Aᵀ)_nj + s²·B_n (A Aᵀ) B_nᵀ, clamped at 0, square-rooted (the
    # quadratic form: _quadratic_form).
    # A row whose sum is under half the sum of its terms' sizes has cancelled: the adapter undoes much of W_n,
    # or the rank-r sum B_n A itself cancels (at small K, where A's rows are nearly parallel). The expansion's
    # float32 rounding is relative to those sizes, not to the result, so such a row is summed again directly,
    # Σ_k (W_nk + s·(B A)_nk)², over K in BK-column blocks (W's row, A's block; B A by float32 "ieee" dots). The
    # sizes are every product's: ‖W_n‖², 2|s|·Σ_j |B_nj (W Aᵀ)_nj| and s²·Σ_jk |B_nj (A Aᵀ)_jk B_nk| (the
    # quadratic form of |B_n| and |A Aᵀ|, alongside the signed one). A block without such a row skips that loop.
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    rr = tl.arange(0, R_PAD)
    r_mask = rr < R
    mask = n_mask[:, None] & r_mask[None, :]
    wa = tl.zeros((BN, R_PAD), dtype=tl.float32)
    p_ptrs = part_ptr + offs_n.to(tl.int64)[:, None] * R + rr[None, :]
    for _sp in range(0, S):  # the K splits' partial sums, in a fixed order; a 64-bit pointer steps N·r per split
        wa += tl.load(p_ptrs, mask=mask, other=0.0)
        p_ptrs += N * R
    rows = offs_n.to(tl.int64)[:, None]
    b = tl.load(b_ptr + rows * s_bn + rr[None, :], mask=mask, other=0.0).to(tl.float32)
    wsq = tl.load(wsq_ptr + offs_n, mask=n_mask, other=0.0)
    lin = 2.0 * scaling * tl.sum(b * wa, axis=1)
    lin_size = 2.0 * tl.abs(scaling) * tl.sum(tl.abs(b * wa), axis=1)
    quad = (scaling * scaling) * _quadratic_form(b_ptr, aat_ptr, rows, n_mask, s_bn, R, False, R_PAD, BN, BJ, BR)
    quad_size = (scaling * scaling) * _quadratic_form(b_ptr, aat_ptr, rows, n_mask, s_bn, R, True, R_PAD, BN, BJ,
                                                      BR)
    sq = wsq + lin + quad
    redo = n_mask & (sq < 0.5 * (wsq + lin_size + quad_size))
    if tl.sum(redo.to(tl.int32), axis=0) > 0:
        direct = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            k_mask = kk < K
            v = tl.load(w_ptr + rows * s_wn + kk[None, :], mask=redo[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            ba = tl.zeros((BN, BK), dtype=tl.float32)
            for j0 in range(0, R_PAD, BR):
                jj = j0 + tl.arange(0, BR)
                j_mask = jj < R
                bj = tl.load(b_ptr + rows * s_bn + jj[None, :], mask=redo[:, None] & j_mask[None, :],
                             other=0.0).to(tl.float32)
                aj = tl.load(a_ptr + jj.to(tl.int64)[:, None] * s_ar + kk[None, :],
                             mask=j_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                ba = tl.dot(bj, aj, ba, input_precision="ieee")
            v += scaling * ba
            direct += tl.sum(v * v, axis=1)
        sq = tl.where(redo, direct, sq)
    tl.store(out_ptr + offs_n, tl.sqrt(tl.maximum(sq, 0.0)), mask=n_mask)
