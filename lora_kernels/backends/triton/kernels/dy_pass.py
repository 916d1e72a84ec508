"""The dy pass of the backward: g = dy @ B, and dB's per-M-block partials, in one read of dy."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import _block, _rank_dot, _rank_operand


# ------------------------------------------------------------------------------------------------------
# g = dy @ B (grid: M blocks; loops over N) and, if NEED_DB, per-M-block partials of dB = dy^T @ u
# written to dbp[pid_m] (summed by _sum_partials_kernel afterwards): one pass over dy.
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _dy_pass_kernel(
    dy_ptr, b_ptr, u_ptr, g_ptr, dbp_ptr,
    M, N, R,
    s_dm, s_dn, s_bn, s_br, s_um, s_ur, s_gm, s_gr, s_pp, s_pn, s_pr,
    NEED_DB: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr, RANK_F32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    DT = dy_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_m, m_mask = _block(pid, BM, M)
    rn = tl.arange(0, BN)
    rr, r_mask = _block(0, R_PAD, R)
    dy_ptrs = dy_ptr + offs_m.to(tl.int64)[:, None] * s_dm + rn[None, :] * s_dn
    b_ptrs = b_ptr + rn[:, None] * s_bn + rr[None, :] * s_br
    if NEED_DB:
        ut = _rank_operand(tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * s_um + rr[None, :] * s_ur,
                                   mask=m_mask[:, None] & r_mask[None, :], other=0.0), DT, RANK_F32)
    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n_mask = (n0 + rn) < N
        dyt = _rank_operand(tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0), DT, RANK_F32)
        bt = _rank_operand(tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0), DT, RANK_F32)
        acc = _rank_dot(dyt, bt, acc, DT, RANK_F32, DOT_PREC)
        if NEED_DB:
            part = _rank_dot(tl.trans(dyt), ut, None, DT, RANK_F32, DOT_PREC)  # (BN, R_PAD)
            p_ptrs = dbp_ptr + pid.to(tl.int64) * s_pp + (n0 + rn).to(tl.int64)[:, None] * s_pn + rr[None, :] * s_pr
            tl.store(p_ptrs, part, mask=n_mask[:, None] & r_mask[None, :])
        dy_ptrs += BN * s_dn
        b_ptrs += BN * s_bn
    g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * s_gm + rr[None, :] * s_gr
    tl.store(g_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])
