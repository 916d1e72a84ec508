"""The Triton kernels of the LoRA op: the shared tile math first (dot operands, index blocks, the precision of the
adapter products), then dropout (the seed, the keep-mask), then the kernels: the shrink (which also serves dA and
dB), the output GEMM (expand and dx; pointer-based, or persistent through TMA descriptors), the one-launch small-M
forward, and the dy pass. What each pass computes is in this package's docstring (``__init__.py``); how the host
plans and launches it, in ``configs.py`` and ``launch.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ... import _config

# Per-call scalar arguments of the kernels. Triton specializes an integer argument on its value class (== 1 becomes a
# constant, divisible by 16 an attribute, the 32- or 64-bit type follows the value) and compiles one kernel per class,
# so a seed drawn per call would compile new kernels now and then for the whole run. These arguments are excluded
# from specialization, and the integers among them carry a fixed type annotation (tl.int64 / tl.int32): one compiled
# kernel serves every value (tests/test_triton_specialization.py). Floats are never specialized; the scales are listed
# for the record.
_PER_CALL_SCALARS = ["scale", "lora_scale", "thr", "seed", "seed_in_mem", "offset"]

# The interpreter (TRITON_INTERPRET=1) miscomputes bf16 arithmetic: tl.dot on bf16 operands, and inf * 0 (it
# gives 0). There, bf16 operands are widened to fp32: exact, and so are the products of two bf16 values in fp32,
# so a dot still equals a bf16 MMA with fp32 accumulation. Compiled kernels are unchanged (the constant is False
# and its branches are not compiled).
_WIDEN_BF16 = tl.constexpr(_config.TRITON_INTERPRET)
# LORA_KERNELS_TRITON_FP32_SPLIT (_config): fp32 adapter products on a bf16 x through the bf16x3 split (_rank_dot).
_FP32_SPLIT = tl.constexpr(_config.TRITON_FP32_SPLIT)


# ------------------------------------------------------------------------------------------------------
# Tile math: dot operands, index blocks, the adapter products' precision
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _mm(t):
    """A tl.dot operand: `t` itself, or under the interpreter a bf16 `t` widened to fp32."""
    if _WIDEN_BF16:
        if t.dtype == tl.bfloat16:
            t = t.to(tl.float32)
    return t


@triton.jit
def _block(pid, B: tl.constexpr, n):
    """The indices pid * B .. pid * B + B - 1 of a dimension of length n, and the mask of those below n."""
    offs = pid * B + tl.arange(0, B)
    return offs, offs < n


@triton.jit
def _rank_operand(t, DT: tl.constexpr, RANK_F32: tl.constexpr):
    """`t` as an operand of the adapter products (u, g, dA, dB): fp32 with fp32 adapters on a 16-bit x (RANK_F32,
    where PyTorch computes these products in fp32), else x's dtype DT."""
    return t.to(tl.float32 if RANK_F32 else DT)


@triton.jit
def _trunc_bf16(v):
    """fp32 v truncated (toward zero) to bf16's 8 significant bits, still as fp32; NaN stays NaN."""
    t = (v.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(v == v, t, v)


@triton.jit
def _bf16x3(b):
    """The bf16x3 split of fp32 b (csrc/common.cuh's bf16x3_piece): b = p0 + p1 + p2 exactly, each piece the
    residual so far truncated to bf16, so every piece has b's sign; a zero piece of a nonzero b becomes b's sign
    times 2^-126 and an infinite b gives (b, tiny, tiny), so that inf times the pieces sums to inf, not NaN."""
    tiny = tl.where(b < 0, -1.1754943508222875e-38, 1.1754943508222875e-38)
    finite = tl.abs(b) < float("inf")
    p0 = _trunc_bf16(b)
    r1 = tl.where(finite, b - p0, 0.0)
    p1 = _trunc_bf16(r1)
    p2 = r1 - p1  # at most 8 significant bits remain: exact in bf16
    p1 = tl.where((p1 == 0) & (b != 0), tiny, p1)
    p2 = tl.where((p2 == 0) & (b != 0), tiny, p2)
    return p0.to(tl.bfloat16), p1.to(tl.bfloat16), p2.to(tl.bfloat16)


@triton.jit
def _opaque(t):
    """t itself, through an instruction the compiler cannot see through: keeps `acc + dot(a, b)` from being folded
    into `dot(a, b, acc)` (Triton's combine pass), which would chain a tile's product into the running sum on the
    tensor cores, whose fp32 accumulation truncates. Under the interpreter (no inline PTX) t as is."""
    if _WIDEN_BF16:
        return t
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _rank_dot(a, b, acc, DT: tl.constexpr, RANK_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a @ b for the adapter products, on operands as ``_rank_operand`` makes them (an operand that already is
    one is not converted again): with RANK_F32 an fp32 "ieee" dot, or (LORA_KERNELS_TRITON_FP32_SPLIT, bf16 x) the
    bf16x3 split of b on the tensor cores; else a dot in x's dtype DT. acc may be None.
    Every call site passes the x-side operand (x, dy, exact in DT) as a and the fp32 adapter side as b. The split:
    a times each piece of b is exact, piece 0 in a fresh accumulator and pieces 1-2 in another (chains of one tile),
    both added to acc with fp32 adds: fp32 FFMA accuracy, on 3 bf16 MMAs."""
    if RANK_F32:
        if _FP32_SPLIT and DT == tl.bfloat16:
            a16 = _mm(a.to(tl.bfloat16))
            b0, b1, b2 = _bf16x3(b.to(tl.float32))
            hi = _opaque(tl.dot(a16, _mm(b0)))
            lo = _opaque(tl.dot(a16, _mm(b1), tl.dot(a16, _mm(b2))))
            t = hi + lo
            if acc is not None:
                t = acc + t
            acc = t
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(_mm(a.to(DT)), _mm(b.to(DT)), acc, input_precision=DOT_PREC)
    return acc


# ------------------------------------------------------------------------------------------------------
# Dropout: the seed, the keep-mask of a tile, and its application
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _load_seed(seed, seed_ptr, seed_in_mem):
    """The Philox key: the scalar argument, or (seed_in_mem != 0) the int64 read from seed_ptr on the device at
    run time. The memory form is what CUDA graphs need: torch's generator refills that tensor on every replay.
    A runtime branch, not a constexpr: eager calls (seed by value) and captured ones run the same binary, so a
    capture after an eager warm-up compiles nothing."""
    if seed_in_mem != 0:
        seed = tl.load(seed_ptr.to(tl.pointer_type(tl.int64)))
    return seed


@triton.jit
def _keep_mask(seed, offset, rows, k0, K8, thr, BM: tl.constexpr, BK: tl.constexpr):
    """Keep-mask (BM, BK) for rows ``rows`` and columns k0..k0+BK of an (M, K) input (k0 % 8 == 0).

    Counter of column group j: c = offset + row * ceil(K/8) + k0/8 + j (64-bit). Of its Philox words, word w
    holds column 8*j + 2*w in its low 16 bits and column 8*j + 2*w + 1 in its high 16 bits; a column is kept
    iff its 16 bits are >= thr = ceil(p * 65536) (``lora_kernels.philox.keep_threshold``).
    """
    j = tl.arange(0, BK // 8)
    c = offset + rows.to(tl.int64)[:, None] * K8 + (k0 // 8 + j)[None, :].to(tl.int64)
    lo = c.to(tl.uint32)  # int64 -> uint32 truncates: the low word (c >= 0)
    hi = (c >> 32).to(tl.uint32)
    zero = tl.zeros_like(lo)
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    # join(join(r0, r2), join(r1, r3))[.., j, a, b] = r_{2a+b}; joining the halves adds the last index h, so
    # the row-major reshape puts (j, a, b, h) at column 8j + 2(2a+b) + h
    w = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    h = tl.reshape(tl.join(w & 0xFFFF, w >> 16), (BM, BK))
    return h.to(tl.int32, bitcast=True) >= thr


@triton.jit
def _apply_keep(t, keep):
    """Dropout of a tile: t * keep, a product as in the reference, so that NaN or inf in a dropped element
    gives NaN (a select would give 0)."""
    k = keep.to(t.dtype)
    if _WIDEN_BF16:
        if t.dtype == tl.bfloat16:
            k = keep.to(tl.float32)
    return (t * k).to(t.dtype)


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
def _lora_epilogue(acc, l_ptr, lb_ptr, bias_ptr, offs_m, m_mask, offs_n, n_mask, col0, R,
                   s_lm, s_lr, s_lbr, s_lbn, lora_scale, thr, seed, seed_ptr, seed_in_mem, offset, K8,
                   DT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """acc (the tile's a @ b, fp32) + [keep *] lora_scale * l @ lb + bias for the output rows offs_m and columns
    offs_n (col0 = the first of them): the rank-r term is one more K-step of width R_PAD, masked to R. l and lb
    through pointer loads; _lora_add does the math."""
    rr, r_mask = _block(0, R_PAD, R)
    lt = tl.load(l_ptr + offs_m.to(tl.int64)[:, None] * s_lm + rr[None, :] * s_lr,
                 mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    lbt = tl.load(lb_ptr + rr[:, None] * s_lbr + offs_n.to(tl.int64)[None, :] * s_lbn,
                  mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(DT)
    return _lora_add(acc, lt, lbt, bias_ptr, offs_m, offs_n, n_mask, col0, lora_scale, thr, seed, seed_ptr,
                     seed_in_mem, offset, K8, DT, HAS_BIAS, HAS_DROPOUT, DOT_PREC, BM, BN)


@triton.jit
def _lora_add(acc, lt, lbt, bias_ptr, offs_m, offs_n, n_mask, col0, lora_scale, thr, seed, seed_ptr, seed_in_mem,
              offset, K8, DT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """acc + [keep *] lora_scale * lt @ lbt + bias, for lt (BM, R_PAD) fp32 and lbt (R_PAD, BN) in DT, zero past R
    and past the M and N edges (however they were loaded)."""
    if HAS_DROPOUT:
        lo = tl.dot(_mm(lt.to(DT)), _mm(lbt), input_precision=DOT_PREC)
        seed = _load_seed(seed, seed_ptr, seed_in_mem)
        keep = _keep_mask(seed, offset, offs_m, col0, K8, thr, BM, BN)
        acc += lo * lora_scale * keep.to(tl.float32)  # as the reference: NaN/inf times a dropped 0 is NaN
    elif DOT_PREC == "ieee":
        # fp32 outputs: the rank-r sum gets its own accumulator. Folded into the main one, its r small terms
        # are each rounded against the large x W^T partial (at r = 256, several times torch's error).
        # The scale multiplies the dot's result: Triton's combine pass rewrites `acc + dot(a, b, 0)` into
        # `dot(a, b, acc)`, which would fold the sum back into the main accumulator.
        acc += tl.dot(lt, lbt, input_precision=DOT_PREC) * lora_scale
    else:  # 16-bit outputs: one more K-step into the same accumulator (output rounding dominates)
        acc = tl.dot(_mm((lt * lora_scale).to(DT)), _mm(lbt), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    return acc


@triton.jit(do_not_specialize=_PER_CALL_SCALARS)
def _output_gemm_kernel(
    a_ptr, b_ptr, l_ptr, lb_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    s_am, s_ak, s_bk, s_bn, s_lm, s_lr, s_lbr, s_lbn, s_cm, s_cn,
    lora_scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
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
    acc = _lora_epilogue(acc, l_ptr, lb_ptr, bias_ptr, offs_m, m_mask, offs_n, n_mask, pid_n * BN, R,
                         s_lm, s_lr, s_lbr, s_lbn, lora_scale, thr, seed, seed_ptr, seed_in_mem, offset, K8,
                         DT, HAS_BIAS, HAS_DROPOUT, R_PAD, DOT_PREC, BM, BN)
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
    a_desc, b_desc, c_desc, l_src, lb_src, bias_ptr,
    M, N, K, R,
    s_lm, s_lr, s_lbr, s_lbn,
    lora_scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    B_KN: tl.constexpr, LR_TMA: tl.constexpr, LB_RN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
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
                lbt = lb_src.load([0, pid_n * BN]).to(DT)
            else:
                lbt = lb_src.load([pid_n * BN, 0]).to(DT).T
            acc = _lora_add(acc, lt, lbt, bias_ptr, offs_m, offs_n, n_mask, pid_n * BN, lora_scale, thr, seed,
                            seed_ptr, seed_in_mem, offset, K8, DT, HAS_BIAS, HAS_DROPOUT, DOT_PREC, BM, BN)
        else:
            acc = _lora_epilogue(acc, l_src, lb_src, bias_ptr, offs_m, m_mask, offs_n, n_mask, pid_n * BN, R,
                                 s_lm, s_lr, s_lbr, s_lbn, lora_scale, thr, seed, seed_ptr, seed_in_mem, offset, K8,
                                 DT, HAS_BIAS, HAS_DROPOUT, R_PAD, DOT_PREC, BM, BN)
        c_desc.store([pid_m * BM, pid_n * BN], acc.to(DT))


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
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, u_ptr, up_ptr, y_ptr,
    M, N, K, R, U_SPLITS,
    s_xm, s_xk, s_wn, s_wk, s_ar, s_ak, s_bn, s_br, s_um, s_ur, s_up, s_ym, s_yn,
    scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    U_GIVEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
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
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(DT)  # B^T tile (R_PAD, BN)
    if DOT_PREC == "ieee":  # fp32: own accumulator, scaled after the dot (see _output_gemm_kernel)
        acc += tl.dot(uacc, bt, input_precision=DOT_PREC) * scale
    else:
        acc = tl.dot(_mm(u.to(DT)), _mm(bt), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n.to(tl.int64)[None, :] * s_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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


# ------------------------------------------------------------------------------------------------------
# The sums of split partials (dA and dB: the fp32 partials of their M-chunks), both in one launch: o[i] =
# sum over s = 0 .. S-1 of p[s * n + i], in that order (deterministic), stored in o's dtype (the adapter's).
# Grid: blocks0 + blocks1 programs of BLOCK elements; the first blocks0 sum (p0, o0), the rest (p1, o1).
# Bytes: each partial read once, each output written once.
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _sum_block(p_ptr, o_ptr, n, S, pid, BLOCK: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ptrs = p_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _s in range(0, S):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += n
    tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(p0_ptr, o0_ptr, n0, S0, p1_ptr, o1_ptr, n1, S1, blocks0, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < blocks0:
        _sum_block(p0_ptr, o0_ptr, n0, S0, pid, BLOCK)
    else:
        _sum_block(p1_ptr, o1_ptr, n1, S1, pid - blocks0, BLOCK)
