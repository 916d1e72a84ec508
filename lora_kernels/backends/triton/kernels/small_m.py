"""The small-M forward (M <= SMALL_M): shrink and expand in one launch."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (_PER_CALL_SCALARS, _apply_keep, _block, _col_scale_bias, _keep_mask, _load_seed, _mm,
                     _rank_expand)


# ------------------------------------------------------------------------------------------------------
# Small M (decode, M <= SMALL_M): the forward in one launch, all in Triton (no cuBLAS).
#   y[:, n-block] = x @ W^T[:, n-block] + (s/q * (keep * x) @ A^T) @ B^T[:, n-block] + b
# Each program owns a BN-column block of y for all M rows; its K loop reads the x tile once for both dots
# and recomputes u = s/q * (keep * x) @ A^T (M x r, tiny) itself, so no program waits on another. The cost
# is the read of W (N*K elements, the floor of this memory-bound shape) plus r*K of A per program, served
# from L2. Program 0 stores u (needed by backward).
# U_GIVEN: u was computed beforehand by the split-K _shrink_kernel, as U_SPLITS fp32 partial sums at up_ptr
# (split stride s_up); every program adds them up in the same fixed order and program 0 stores the sum as u
# (with one split the shrink wrote u itself). Chosen where the recomputation would cost more than one small
# launch: with dropout (every program would regenerate the whole M x K mask) and at large rank (every program
# would read all of A). Summing here instead of in a separate torch.sum saves a launch and its output.
# ------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_PER_CALL_SCALARS)
def _small_m_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, cs_ptr, u_ptr, up_ptr, y_ptr,
    M, N, K, R, U_SPLITS,
    s_xm, s_xk, s_wn, s_wk, s_ar, s_ak, s_bn, s_br, s_um, s_ur, s_up, s_ym, s_yn,
    scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    U_GIVEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, COL_SCALE: tl.constexpr,
):
    DT = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    offs_m, m_mask = _block(tl.program_id(1), BM, M)
    offs_n, n_mask = _block(pid_n, BN, N)
    rk = tl.arange(0, BK)
    rr, r_mask = _block(0, R_PAD, R)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + rk[None, :] * s_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * s_wn + rk[:, None] * s_wk  # W^T tile (BK, BN)
    a_ptrs = a_ptr + rr[None, :] * s_ar + rk[:, None] * s_ak  # A^T tile (BK, R_PAD)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    uacc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    if HAS_DROPOUT and not U_GIVEN:
        seed = _load_seed(seed, seed_ptr, seed_in_mem)
    for k0 in range(0, K, BK):
        k_mask = (k0 + rk) < K
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(_mm(xt), _mm(wt), acc, input_precision=DOT_PREC)
        if not U_GIVEN:
            if HAS_DROPOUT:
                keep = _keep_mask(seed, offset, offs_m, k0, K8, thr, BM, BK)
                xt = _apply_keep(xt, keep)
            at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(DT)
            uacc = tl.dot(_mm(xt), _mm(at), uacc, input_precision=DOT_PREC)
        x_ptrs += BK * s_xk
        w_ptrs += BK * s_wk
        a_ptrs += BK * s_ak
    u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * s_um + rr[None, :] * s_ur
    u_mask = m_mask[:, None] & r_mask[None, :]
    if U_GIVEN:  # the shrink's partial sums, already scaled (the host passes scale = 1)
        up_ptrs = up_ptr + offs_m.to(tl.int64)[:, None] * s_um + rr[None, :] * s_ur
        for _split in range(0, U_SPLITS):
            uacc += tl.load(up_ptrs, mask=u_mask, other=0.0)
            up_ptrs += s_up
    u = uacc * scale
    if pid_n == 0 and (not U_GIVEN or U_SPLITS > 1):
        tl.store(u_ptrs, u, mask=u_mask)
    bt = tl.load(b_ptr + rr[:, None] * s_br + offs_n.to(tl.int64)[None, :] * s_bn,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # B^T tile (R_PAD, BN), as stored
    if DOT_PREC == "ieee" or (bt.dtype == tl.float32 and DT != tl.float32):
        # fp32 outputs, or fp32 adapters (the term in fp32, as PyTorch: y rounded once; FFMA, a small cost next to
        # this memory-bound pass): own accumulator, scaled after the dot (see output_gemm.py)
        acc += tl.dot(uacc, bt.to(tl.float32), input_precision="ieee") * scale
    else:
        acc = _rank_expand(u, bt, acc, DT, DOT_PREC, False)
    acc = _col_scale_bias(acc, cs_ptr, bias_ptr, offs_n, n_mask, COL_SCALE, HAS_BIAS)  # (launch.forward_scaled)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n.to(tl.int64)[None, :] * s_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
