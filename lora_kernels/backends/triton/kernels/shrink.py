"""The shrink pass (also dA and dB): a long dimension contracted against a rank-r operand."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import _PER_CALL_SCALARS, _apply_keep, _block, _keep_mask, _load_seed, _rank_dot


# ------------------------------------------------------------------------------------------------------
# The shrink: out[i, r] = scale * sum over j of [keep *] w[i, j] * rk[j, r], a long dimension j contracted against a
# rank-r operand (grid: (I blocks, J splits); each program loops over its J range and reads w once):
#   shrink      w = x (i = m, j = k), rk = A^T, scale = s/q, keep mask          -> u (M, r)
#   dA          w = x^T (i = k, j = m), rk = g, scale = s/q, keep mask          -> dA^T (K, r), stored as (r, K)
#   dB          w = dy^T (i = n, j = m), rk = u, scale = 1 (when the dy pass does not fuse it)   -> dB (N, r)
# W_T: w is the transpose of the tensor in memory (dA, dB). Its tiles are then loaded and masked as that tensor's
# (BJ, BI) tiles, row j of the tensor being row j of the mask, and transposed for the dot.
# With several J splits, split s writes its partial sum to out[s] of an (S, I, r) buffer (the shrink at small M:
# too few M blocks to fill the GPU; dA and dB: M split into chunks), summed afterwards in a fixed order.
# ------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_PER_CALL_SCALARS)
def _shrink_kernel(
    w_ptr, rk_ptr, out_ptr,
    I, J, R, J_PER_SPLIT,
    s_wi, s_wj, s_rr, s_rj, s_os, s_oi, s_or,
    scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
    HAS_DROPOUT: tl.constexpr, W_T: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    RANK_F32: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
):
    DT = w_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_i, i_mask = _block(pid, BI, I)
    rj = tl.arange(0, BJ)
    rr, r_mask = _block(0, R_PAD, R)
    j_start = pid_s * J_PER_SPLIT  # a multiple of BJ (so of 8, as the mask's column groups need)
    j_end = tl.minimum(j_start + J_PER_SPLIT, J)
    if W_T:  # (BJ, BI) tiles of the tensor in memory
        w_ptrs = w_ptr + (j_start + rj).to(tl.int64)[:, None] * s_wj + offs_i.to(tl.int64)[None, :] * s_wi
    else:  # (BI, BJ) tiles
        w_ptrs = w_ptr + offs_i.to(tl.int64)[:, None] * s_wi + (j_start + rj)[None, :].to(tl.int64) * s_wj
    rk_ptrs = rk_ptr + rr[None, :] * s_rr + (j_start + rj)[:, None].to(tl.int64) * s_rj  # (BJ, R_PAD)
    acc = tl.zeros((BI, R_PAD), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = _load_seed(seed, seed_ptr, seed_in_mem)
    for j0 in range(j_start, j_end, BJ):
        j_mask = (j0 + rj) < j_end
        if W_T:
            wt = tl.load(w_ptrs, mask=j_mask[:, None] & i_mask[None, :], other=0.0)
            if HAS_DROPOUT:
                wt = _apply_keep(wt, _keep_mask(seed, offset, j0 + rj, pid * BI, K8, thr, BJ, BI))
            wt = tl.trans(wt)
        else:
            wt = tl.load(w_ptrs, mask=i_mask[:, None] & j_mask[None, :], other=0.0)
            if HAS_DROPOUT:
                wt = _apply_keep(wt, _keep_mask(seed, offset, offs_i, j0, K8, thr, BI, BJ))
        rkt = tl.load(rk_ptrs, mask=j_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _rank_dot(wt, rkt, acc, DT, RANK_F32, DOT_PREC)
        w_ptrs += BJ * s_wj
        rk_ptrs += BJ * s_rj
    acc = acc * scale
    out_ptrs = out_ptr + pid_s.to(tl.int64) * s_os + offs_i.to(tl.int64)[:, None] * s_oi + rr[None, :] * s_or
    tl.store(out_ptrs, acc, mask=i_mask[:, None] & r_mask[None, :])
