"""The element-wise passes and the row-norm kernels of the DoRA op (``lora_kernels.dora``), around the LoRA
backends' forward/backward.

Each pass reads its inputs once and rounds once; math in float32 (float64 for float64 inputs):

    scale_bias(z, c, bias, out=)        -> c ⊙ z + b                           per-column scale c (N,); out=z:
                                                                               in place
    scale_colsum(dy, z, c, out=)        -> (c ⊙ dy, Σ_m dy ⊙ z)                 the magnitude grad's reduction,
                                                                               fused with the pass that scales dy;
                                                                               out=z: c ⊙ dy written over z;
                                                                               from_y: z = (y − b)/c from y
    zero_g_colsum(dg, dy, x, W, u, B, g, fast, bias)
                                        -> dg_n = Σ_m dy ⊙ z where y cannot     g_n = 0, or a bias and |g_n| < 1/2
                                           give z (z_lost_from_y)
    masked(t, p, seed, offset, ak, ad, base=None)
                                        -> base + where(keep, ak·t, ad·t)       keep = the contract's dropout mask
    w_at(W, A)                          -> W Aᵀ (N, r) float32                  Triton only: one pass over W
    weight_norm(W, A, B, s, wsq)        -> ‖W + s·B A‖_row (N,) from ‖W_n‖²     Triton only (w_at + one combine)

``fast=True`` runs Triton kernels (on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1): one pass and no
temporary. ``fast=False`` is plain PyTorch (the torch backend's reference, and the fallback where Triton cannot
run); it materialises float32 temporaries of the tensors' size. The column sums are deterministic: each
(column block, row split) program writes a partial sum, and the partials are summed with torch in a fixed order.

Names used from ``lora_kernels.backends.triton``: ``_keep_mask`` and ``_load_seed`` (the in-kernel Philox mask, its
seed by value or from memory), ``_num_sms``, ``_seed_args``, the shared-memory budget, and ``_launch`` (the triton
backend's launch, with its fast relaunch that skips the JIT's per-call argument binding: tens of microseconds of host
time per launch).
"""
from __future__ import annotations

import torch

from . import _config
from .philox import calls_per_row, keep_threshold
from .philox import dropout_mask as _ref_mask

try:
    import triton
    import triton.language as tl

    from .backends.triton import (_HOPPER_SMEM, _keep_mask, _launch, _load_seed, _max_smem, _num_sms, _seed_args,
                                  _smem_per_block)
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
    return device.type == "cuda" or _config.TRITON_INTERPRET


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

    @triton.jit
    def _zero_g_colsum_kernel(x_ptr, w_ptr, u_ptr, bl_ptr, g_ptr, b_ptr, dy_ptr, dg_ptr, M, K, N, R, s_xm, s_wn,
                              s_um, s_bn, s_dm, min_g, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # grid (column blocks,): a block with a column whose z y cannot give (z_lost_from_y: g = 0, where y = b; or a
        # bias and |g| < min_g) computes those columns' z = x Wᵀ + u Bᵀ (u holds s) and writes dg = Σ_m dy ⊙ z
        # there; the other blocks return at once. float32 "ieee" dots (a rare path): float32 accuracy.
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_mask = offs_n < N
        gn = tl.load(g_ptr + offs_n, mask=n_mask, other=1.0)
        lost = gn == 0.0
        if HAS_BIAS:
            bn = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            lost = lost | ((bn != 0.0) & (tl.abs(gn) < min_g))
        lost = lost & n_mask
        if tl.sum(lost.to(tl.int32), axis=0) > 0:
            rr = tl.arange(0, R_PAD)
            cols = offs_n.to(tl.int64)
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

    # The per-call scalars (the seed, the counter offset of a row chunk, the threshold, the scales) are not
    # specialized and have fixed types, so one compiled kernel serves every value (as the triton backend's kernels).
    @triton.jit(do_not_specialize=["a_keep", "a_drop", "seed", "seed_in_mem", "offset", "thr"])
    def _masked_kernel(t_ptr, base_ptr, out_ptr, M, K, s_tm, s_bm, s_om, a_keep, a_drop,
                       seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8, thr: tl.int32,
                       HAS_BASE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        # the seed by value, or (seed_in_mem) read from seed_ptr at run time: a CUDA graph's replays refill it
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        k0 = tl.program_id(1) * BK  # a multiple of 8, as the mask's column groups need
        offs_k = k0 + tl.arange(0, BK)
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        t = tl.load(t_ptr + rows * s_tm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        keep = _keep_mask(_load_seed(seed, seed_ptr, seed_in_mem), offset, offs_m, k0, K8, thr, BM, BK)
        out = tl.where(keep, t * a_keep, t * a_drop)
        if HAS_BASE:
            out += tl.load(base_ptr + rows * s_bm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows * s_om + offs_k[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


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
        for sp in range(0, S):  # the K splits' partial sums, in a fixed order
            wa += tl.load(part_ptr + (sp * N + offs_n.to(tl.int64))[:, None] * R + rr[None, :], mask=mask,
                          other=0.0)
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


_W_AT_TILES = {}  # (r_pad, mode) -> (BN, BK, num_warps), overridable for measurements


def _w_at_tiles(r_pad: int, mode: int):
    """(BN, BK, num_warps) of ``_w_at_kernel`` on GPUs: the (BN, R_PAD) float32 accumulator and, for 3xTF32, the
    split operands stay in registers (checked for sm_90 by tests/test_dora_sm90.py: no spills)."""
    if (r_pad, mode) in _W_AT_TILES:
        return _W_AT_TILES[r_pad, mode]
    if mode == 3:  # 3xTF32 keeps hi/lo copies of both operands
        return (64, 32, 4) if r_pad <= 32 else ((64, 32, 8) if r_pad <= 64 else (32, 32, 8))
    return (64, 64, 4) if r_pad <= 64 else (32, 64, 8)


def w_at(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W Aᵀ (N, r) in float32, one Triton pass over W (A's columns stream beside it, from L2). Products at float32
    accuracy: exact 16-bit products for 16-bit W and A, an exact three-piece bf16 split of a float32 A on a bf16 W,
    3xTF32 for float32 operands (float32 "ieee" under the interpreter). W and A must have unit stride along K."""
    N, K = weight.shape
    R = lora_A.shape[0]
    r_pad = max(16, 1 << (R - 1).bit_length())
    interp = _interp(weight)
    if weight.dtype == lora_A.dtype and weight.dtype != torch.float32:
        mode = 1
    elif weight.dtype == torch.bfloat16:
        mode = 2
    else:
        mode = 3
    BN, BK, warps = (16, 32, 4) if interp else _w_at_tiles(r_pad, mode)
    meta = dict(MODE=mode, WIDEN=interp, R_PAD=r_pad, BN=BN, BK=BK, num_warps=warps)
    smem = _HOPPER_SMEM if interp else _smem_per_block(weight.device)
    if smem < _HOPPER_SMEM:  # the tiles are sized for a Hopper block: on a smaller one the pipeline is cut to fit
        per_stage = (BN * weight.element_size() + r_pad * lora_A.element_size()) * BK
        meta["num_stages"] = max(1, min(3, _max_smem(smem) // per_stage))
    n_blocks = _cdiv(N, BN)
    want = 1 if interp else max(1, 2 * _num_sms(weight.device) // n_blocks)
    per = _cdiv(_cdiv(K, BK), max(1, min(want, _cdiv(K, BK)))) * BK
    splits = max(1, _cdiv(K, per))
    part = torch.empty((splits, N, R), dtype=torch.float32, device=weight.device)
    _launch(_w_at_kernel, (n_blocks, splits),
            (weight, lora_A, part, N, K, R, per, weight.stride(0), lora_A.stride(0)), meta)
    return part


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                wsq: torch.Tensor) -> torch.Tensor:
    """‖W + scaling · B A‖ per row (N,) in float32 from ‖W_n‖² (``wsq``, float32, cached by the caller):
    ‖W_n‖² + 2s·B_n·(A W_nᵀ) + s²·B_n (A Aᵀ) B_nᵀ, with W Aᵀ from ``w_at`` (the one pass over W), A Aᵀ as a
    float32 GEMM of r×r, and one combine kernel that forms the quadratic form B_n (A Aᵀ) B_nᵀ itself, and sums the
    rows where the adapter cancels much of W_n again directly from W and A (the expansion loses precision there).
    No N×K temporary. W and A must have unit stride along K."""
    N = weight.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.float32, device=weight.device)
    R = lora_A.shape[0]
    part = w_at(weight, lora_A)
    A32 = lora_A.float()
    aat = A32 @ A32.t()  # (r, r) float32; B (A Aᵀ) Bᵀ per row in the combine kernel
    out = torch.empty(N, dtype=torch.float32, device=weight.device)
    r_pad = max(16, 1 << (R - 1).bit_length())
    # tiles that keep (BN, R_PAD) float32 tiles and the dot's operands in registers on sm_90 (no spills:
    # tests/test_dora_sm90.py)
    BN = 16 if _interp(weight) else max(16, min(64, 1024 // r_pad))
    _launch(_norm_combine_kernel, (_cdiv(N, BN),),
            (part, wsq, lora_B, aat, weight, lora_A, out, N, weight.shape[1], R, part.shape[0], lora_B.stride(0),
             weight.stride(0), lora_A.stride(0), float(scaling)),
            dict(R_PAD=r_pad, BN=BN, BJ=min(r_pad, 32 if r_pad <= 64 else 16), BR=min(r_pad, 64), BK=16,
                 num_warps=4 if r_pad <= 64 else 8))
    return out


def _tiles(t: torch.Tensor):
    return (16, 32) if _interp(t) else (32, 128)


def _tiled(t: torch.Tensor, out):
    """For an elementwise kernel over the (M, N) t: (out, or a new tensor like t when None; the grid of _tiles(t)
    blocks, None when t is empty: nothing to launch; the tile sizes)."""
    M, N = t.shape
    if out is None:
        out = torch.empty_like(t)
    BM, BN = _tiles(t)
    return out, ((_cdiv(M, BM), _cdiv(N, BN)) if M and N else None), BM, BN


def scale_bias(z: torch.Tensor, c: torch.Tensor, bias, fast: bool, out=None) -> torch.Tensor:
    """``c ⊙ z + bias`` (z (M, N) contiguous, c (N,) float32/64, bias (N,) or None), in z's dtype; ``out=z``
    writes it over z."""
    if not fast:
        acc = _acc(z)
        y = z.to(acc) * c.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        return y.to(z.dtype) if out is None else out.copy_(y)
    M, N = z.shape
    out, grid, BM, BN = _tiled(z, out)
    if grid is not None:
        _launch(_scale_bias_kernel, grid,
                (z, c, bias if bias is not None else c, out, M, N, z.stride(0), out.stride(0)),
                dict(HAS_BIAS=bias is not None, BM=BM, BN=BN))
    return out


def scale_colsum(dy: torch.Tensor, z, c: torch.Tensor, need_out: bool, need_sum: bool, fast: bool, out=None,
                 from_y: bool = False, bias=None):
    """(``c ⊙ dy`` in dy's dtype or None, ``Σ_m dy ⊙ z`` (N,) in float32/64 or None); one pass over dy and z.
    ``out`` (optional, may be z itself: each tile of z is read before its c ⊙ dy is written) receives c ⊙ dy.
    ``from_y``: ``z`` holds y = c ⊙ z + bias instead (p = 0, c = g), and the sum is Σ_m dy ⊙ (y − bias) / c,
    0 where c = 0 (``zero_g_colsum`` fills those columns)."""
    acc = _acc(dy)
    M, N = dy.shape
    if not fast:
        d = dy.to(acc)
        colsum = None
        if need_sum:
            zz = z.to(acc) - (bias.to(acc) if (from_y and bias is not None) else 0.0)
            colsum = (d * zz).sum(0)
            if from_y:
                cc = c.to(acc)
                colsum = torch.where(cc != 0, colsum / torch.where(cc != 0, cc, torch.ones_like(cc)),
                                     torch.zeros_like(colsum))
        if not need_out:
            return None, colsum
        scaled = d * c.to(acc)
        return (scaled.to(dy.dtype) if out is None else out.copy_(scaled)), colsum
    if need_out and out is None:
        out = torch.empty_like(dy)
    if M == 0 or N == 0 or not (need_out or need_sum):
        return (out if need_out else None), (torch.zeros(N, dtype=acc, device=dy.device) if need_sum else None)
    BM, BN = _tiles(dy)
    n_blocks = _cdiv(N, BN)
    want = 1 if _interp(dy) else max(1, 2 * _num_sms(dy.device) // n_blocks)  # about two programs per SM
    rows = _cdiv(_cdiv(M, BM), max(1, min(want, _cdiv(M, BM)))) * BM
    splits = _cdiv(M, rows)
    part = torch.empty((splits, N), dtype=torch.float32, device=dy.device) if need_sum else c
    has_bias = bool(from_y and need_sum and bias is not None)
    _launch(_scale_colsum_kernel, (n_blocks, splits),
            (dy, z if need_sum else dy, c, bias if has_bias else c, out if need_out else dy, part, M, N, rows,
             dy.stride(0), z.stride(0) if need_sum else 0, out.stride(0) if need_out else 0),
            dict(NEED_OUT=need_out, NEED_SUM=need_sum, FROM_Y=bool(from_y and need_sum), HAS_BIAS=has_bias,
                 BM=BM, BN=BN))
    return (out if need_out else None), (part.sum(0) if need_sum else None)


# DoRA at p = 0 takes z = (y − b)/g from the output y. y is rounded at the scale of max(|g z|, |b|), so z's error grows
# as |b|/|g| where |g| is small; PEFT's base_result − bias is not divided by g. The columns with g = 0 (y = b: z is
# lost), or with a bias and |g| < Z_FROM_Y_MIN_G (z's error past 2× PEFT's), recompute z (zero_g_colsum); DoRA
# starts at g = 1 and training keeps it near there, so this is for unusual magnitudes. csrc/common.cuh's
# dora_recompute_z is the same rule.
Z_FROM_Y_MIN_G = 0.5


def z_lost_from_y(g: torch.Tensor, bias) -> torch.Tensor:
    """(N,) bool: the columns whose z the saved-y backward recomputes rather than takes from y."""
    lost = g == 0
    if bias is not None:
        lost = lost | ((bias != 0) & (g.abs() < Z_FROM_Y_MIN_G))
    return lost


def zero_g_colsum(dg: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor,
                  lora_B: torch.Tensor, g: torch.Tensor, fast: bool, bias=None) -> torch.Tensor:
    """Writes ``dg_n = Σ_m dy_mn z_mn`` for the columns that y cannot give z accurately (``z_lost_from_y``: g_n = 0,
    or a bias and a small g_n), z = x Wᵀ + u Bᵀ recomputed for those columns only; ``dg`` elsewhere is left alone.
    Without a synchronisation: on the fast path one launch whose programs return at once unless they hold such a
    column; the plain PyTorch version (reference backends) recomputes z of every column and selects."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return dg
    if not fast:
        acc = dg.dtype
        z = x.to(acc) @ weight.to(acc).t() + u.to(acc) @ lora_B.to(acc).t()
        return dg.copy_(torch.where(z_lost_from_y(g, bias), (dy.to(acc) * z).sum(0), dg))
    R = lora_B.shape[1]
    r_pad = max(16, 1 << (R - 1).bit_length())
    BM, BN, BK = (16, 16, 16) if _interp(x) else (32, 16, 32)
    _launch(_zero_g_colsum_kernel, (_cdiv(N, BN),),
            (x, weight, u, lora_B, g, g if bias is None else bias, dy, dg, M, K, N, R, x.stride(0), weight.stride(0),
             u.stride(0), lora_B.stride(0), dy.stride(0), Z_FROM_Y_MIN_G),
            dict(HAS_BIAS=bias is not None, R_PAD=r_pad, BM=BM, BN=BN, BK=BK))
    return dg


def masked(t: torch.Tensor, p: float, seed, offset: int, a_keep: float, a_drop: float, fast: bool,
           base=None, out=None) -> torch.Tensor:
    """``base + where(keep, a_keep·t, a_drop·t)`` in t's dtype, keep = dropout_mask(seed, offset, t.shape, p)
    for the flattened (M, K) t; ``seed`` an int, or a 0-d int64 device tensor (CUDA graph capture) read when the
    pass runs. ``out`` may be ``base`` or ``t`` (in place)."""
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
    out, grid, BM, BK = _tiled(t, out)
    if grid is not None:
        seed_v, seed_p, seed_in_mem = _seed_args(seed, t)
        _launch(_masked_kernel, grid,
                (t, base if base is not None else t, out, M, K, t.stride(0),
                 base.stride(0) if base is not None else 0, out.stride(0), float(a_keep), float(a_drop),
                 seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(K), keep_threshold(p)),
                dict(HAS_BASE=base is not None, BM=BM, BK=BK))
    return out
