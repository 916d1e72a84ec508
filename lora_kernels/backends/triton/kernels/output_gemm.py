"""The output GEMM pass (expand and dx): a @ b plus the rank-r term and the bias, pointer-based or through TMA
descriptors."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import _PER_CALL_SCALARS, _block, _col_scale_bias, _keep_mask, _load_seed, _mm, _rank_expand


# ------------------------------------------------------------------------------------------------------
# C = a @ b + [keep *] lora_scale * (l @ lb) + bias
#   forward: a = x, b = W^T (strides swapped), l = u, lb = B^T, lora_scale = 1, bias
#   dx:      a = dy, b = W,                    l = g, lb = A,   lora_scale = s/q, keep mask
# Two kernels compute it: _output_gemm_kernel (pointer loads, one program per output tile; with K = 0 it writes the
# rank-r term and the bias only, for cuBLAS to accumulate the GEMM into) and _output_gemm_tma_kernel (the main loop
# through TMA descriptors, persistent). Both share the tile order and the epilogue's math below (_lora_add, after
# masked pointer loads in _lora_epilogue or, in the TMA kernel, TMA loads), so they compute the same sums in the same
# order.
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number `tile` in grouped order: bands of GROUP_M tile rows, numbered down the
    rows of a band before across its columns, so that tiles running together share a few b column blocks (and a
    row blocks), which stay in L2."""
    tiles_per_band = GROUP_M * num_pid_n
    band = tile // tiles_per_band
    first_m = band * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)  # the last band may be short
    local = tile % tiles_per_band
    return first_m + local % rows, local // rows


@triton.jit
def _lora_epilogue(acc, l_ptr, lb_ptr, bias_ptr, cs_ptr, offs_m, m_mask, offs_n, n_mask, col0, R,
                   s_lm, s_lr, s_lbr, s_lbn, lora_scale, thr, seed, seed_ptr, seed_in_mem, offset, K8,
                   DT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                   COL_SCALE: tl.constexpr):
    """acc (the tile's a @ b, fp32) + [keep *] lora_scale * l @ lb (times the column scale) + bias for the output
    rows offs_m and columns offs_n (col0 = the first of them): the rank-r term is one more K-step of width R_PAD,
    masked to R. l and lb through pointer loads, lb as stored (fp32 adapters stay fp32 until _lora_add); _lora_add
    does the math."""
    rr, r_mask = _block(0, R_PAD, R)
    lt = tl.load(l_ptr + offs_m.to(tl.int64)[:, None] * s_lm + rr[None, :] * s_lr,
                 mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    lbt = tl.load(lb_ptr + rr[:, None] * s_lbr + offs_n.to(tl.int64)[None, :] * s_lbn,
                  mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    return _lora_add(acc, lt, lbt, bias_ptr, cs_ptr, offs_m, offs_n, n_mask, col0, lora_scale, thr, seed, seed_ptr,
                     seed_in_mem, offset, K8, DT, HAS_BIAS, HAS_DROPOUT, DOT_PREC, BM, BN, SPLIT, COL_SCALE)


@triton.jit
def _lora_add(acc, lt, lbt, bias_ptr, cs_ptr, offs_m, offs_n, n_mask, col0, lora_scale, thr, seed, seed_ptr,
              seed_in_mem, offset, K8, DT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
              COL_SCALE: tl.constexpr):
    """acc + [keep *] lora_scale * lt @ lbt + bias, for lt (BM, R_PAD) fp32 and lbt (R_PAD, BN) as the adapter is
    stored (DT, or fp32 adapters), zero past R and past the M and N edges (however they were loaded). COL_SCALE (the
    forward of DoRA, launch.forward_scaled): the sum times cs (N,) fp32 per column before the bias, so that
    y = cs ⊙ (x Wᵀ + u Bᵀ) + b is rounded once, with no pass over y."""
    if HAS_DROPOUT:
        lo = _rank_expand(lt, lbt, None, DT, DOT_PREC, SPLIT)
        seed = _load_seed(seed, seed_ptr, seed_in_mem)
        keep = _keep_mask(seed, offset, offs_m, col0, K8, thr, BM, BN)
        acc += lo * lora_scale * keep.to(tl.float32)  # as the reference: NaN/inf times a dropped 0 is NaN
    elif DOT_PREC == "ieee":
        # fp32 outputs: the rank-r sum gets its own accumulator. Folded into the main one, its r small terms
        # are each rounded against the large x W^T partial (at r = 256, several times torch's error).
        # The scale multiplies the dot's result: Triton's combine pass rewrites `acc + dot(a, b, 0)` into
        # `dot(a, b, acc)`, which would fold the sum back into the main accumulator.
        acc += tl.dot(lt, lbt, input_precision=DOT_PREC) * lora_scale
    else:  # 16-bit outputs: one more K-step (of 4 R_PAD with fp32 adapters) into the same accumulator
        acc = _rank_expand(lt * lora_scale, lbt, acc, DT, DOT_PREC, SPLIT)
    return _col_scale_bias(acc, cs_ptr, bias_ptr, offs_n, n_mask, COL_SCALE, HAS_BIAS)


@triton.jit(do_not_specialize=_PER_CALL_SCALARS)
def _output_gemm_kernel(
    a_ptr, b_ptr, l_ptr, lb_ptr, bias_ptr, cs_ptr, c_ptr,
    M, N, K, R,
    s_am, s_ak, s_bk, s_bn, s_lm, s_lr, s_lbr, s_lbn, s_cm, s_cn,
    lora_scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, RANK_SPLIT: tl.constexpr,
    COL_SCALE: tl.constexpr,
):
    DT = a_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m, m_mask = _block(pid_m, BM, M)
    offs_n, n_mask = _block(pid_n, BN, N)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + rk[:, None] * s_bk + offs_n.to(tl.int64)[None, :] * s_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_mask = (k0 + rk) < K
        at = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(_mm(at), _mm(bt.to(DT)), acc, input_precision=DOT_PREC)
        a_ptrs += BK * s_ak
        b_ptrs += BK * s_bk
    acc = _lora_epilogue(acc, l_ptr, lb_ptr, bias_ptr, cs_ptr, offs_m, m_mask, offs_n, n_mask, pid_n * BN, R,
                         s_lm, s_lr, s_lbr, s_lbn, lora_scale, thr, seed, seed_ptr, seed_in_mem, offset, K8,
                         DT, HAS_BIAS, HAS_DROPOUT, R_PAD, DOT_PREC, BM, BN, RANK_SPLIT, COL_SCALE)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * s_cm + offs_n.to(tl.int64)[None, :] * s_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# The TMA kernel (LORA_KERNELS_TRITON_MAINLOOP=tma): a, b and c are tensor descriptors built on the host
# (triton.tools.tensor_descriptor.TensorDescriptor), a over (M, K), c over (M, N), b over (K, N) when B_KN (dx: W as
# stored) or over (N, K) (the forward: W as stored, its tiles transposed for the dot). 16-bit inputs only (the host
# falls back for fp32). TMA reads out-of-range elements as zero and clips stores at the edges, so the partial tiles
# at M, N and K need no masks.
# The rank-r operands: with LR_TMA, l and lb are descriptors too: l over (M, R) (u or g, fp32), block
# (BM, R_PAD); lb over (R, N) when LB_RN (dx: A as stored), block (R_PAD, BN), or over (N, R) (the forward: B as
# stored, its tile transposed), block (BN, R_PAD). The descriptors' shapes are R, not R_PAD: TMA's zero fill past
# R and past the M and N edges replaces the masks. Why: triton 3.6 compiles the flattened loop's epilogue with a
# `wgmma.wait_group 0` on the accumulator, and with the rank-r dot's operands from pointer loads (ld.global) after
# it, ptxas (12.8 to 13.0) serialises every wgmma of the kernel, the main loop's included (warning C7515, "wgmma.
# mma_async instructions are serialized ..."). With the operands through TMA, the main loop keeps its wgmma in flight
# (wait depth 1). The host takes this wherever TMA can describe l and lb (16-byte aligned bases and row strides,
# contiguous rows: launch._tma_unsupported); elsewhere (e.g. ranks not a multiple of 4) l_src and lb_src are
# pointers with the strides s_*, loaded as in _output_gemm_kernel (correct, but serialised by triton 3.6's ptxas).
# The math after the loads is _lora_add either way. The bias stays a pointer load (it does not bring C7515 back:
# tests/test_triton_tma_mainloop.py::test_tma_kernel_wgmma_not_serialized).
@triton.jit(do_not_specialize=_PER_CALL_SCALARS)
def _output_gemm_tma_kernel(
    a_desc, b_desc, c_desc, l_src, lb_src, bias_ptr, cs_ptr,
    M, N, K, R,
    s_lm, s_lr, s_lbr, s_lbn,
    lora_scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    B_KN: tl.constexpr, LR_TMA: tl.constexpr, LB_RN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
    C_SPLIT: tl.constexpr, COL_SCALE: tl.constexpr,
):
    DT = a_desc.dtype
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_steps = tl.cdiv(K, BK)
    # Persistent: program p computes the output tiles p, p + NUM_SMS, ... (grouped order).
    first = tl.program_id(0)
    # The epilogue takes its tile from a counter of its own: once the loops are flattened, the pipeliner issues
    # the next tile's loads (advancing `tile`) before this tile's epilogue, and a separate counter keeps one value
    # from having to live across both ends of the pipeline.
    tile_out = first - NUM_SMS
    # FLATTEN fuses the tile loop and the K loop into one software-pipelined loop, so the first loads of tile
    # i + 1 overlap the epilogue of tile i; num_stages (a launch option) is the depth of its load pipeline.
    for tile in tl.range(first, num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ks in range(k_steps):
            k0 = ks * BK
            at = a_desc.load([off_m, k0])
            if B_KN:
                bt = b_desc.load([k0, off_n])
            else:
                bt = b_desc.load([off_n, k0]).T
            acc = tl.dot(_mm(at), _mm(bt), acc, input_precision=DOT_PREC)
        tile_out += NUM_SMS
        pid_m, pid_n = _grouped_tile(tile_out, num_pid_m, num_pid_n, GROUP_M)
        offs_m, m_mask = _block(pid_m, BM, M)
        offs_n, n_mask = _block(pid_n, BN, N)
        if LR_TMA:
            lt = l_src.load([pid_m * BM, 0]).to(tl.float32)
            if LB_RN:
                lbt = lb_src.load([0, pid_n * BN])
            else:
                lbt = lb_src.load([pid_n * BN, 0]).T
            acc = _lora_add(acc, lt, lbt, bias_ptr, cs_ptr, offs_m, offs_n, n_mask, pid_n * BN, lora_scale, thr,
                            seed, seed_ptr, seed_in_mem, offset, K8, DT, HAS_BIAS, HAS_DROPOUT, DOT_PREC, BM, BN,
                            True, COL_SCALE)
        else:
            acc = _lora_epilogue(acc, l_src, lb_src, bias_ptr, cs_ptr, offs_m, m_mask, offs_n, n_mask, pid_n * BN,
                                 R, s_lm, s_lr, s_lbr, s_lbn, lora_scale, thr, seed, seed_ptr, seed_in_mem, offset,
                                 K8, DT, HAS_BIAS, HAS_DROPOUT, R_PAD, DOT_PREC, BM, BN, True, COL_SCALE)
        out = acc.to(DT)
        if C_SPLIT == 2:  # stored as two (BM, BN / 2) halves: half the output's staging buffer in shared memory
            o0, o1 = out.reshape(BM, 2, BN // 2).permute(0, 2, 1).split()
            c_desc.store([pid_m * BM, pid_n * BN], o0)
            c_desc.store([pid_m * BM, pid_n * BN + BN // 2], o1)
        else:
            c_desc.store([pid_m * BM, pid_n * BN], out)
