"""The tile math every LoRA Triton kernel shares: dot operands, index blocks, the precision of the adapter products,
and dropout (the seed, the keep-mask of a tile, its application). The passes that use it are the other files of this
package; what each computes is in the backend's docstring (``lora_kernels/backends/triton/__init__.py``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .... import _config

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
def _split2(v, DT: tl.constexpr):
    """fp32 v as two pieces in the 16-bit DT, v = p0 + p1 to about 16 significant bits: p0 = v rounded toward zero,
    p1 = the residual rounded. The products of two such splits' pieces (_rank_expand) add up to an fp32-class product
    where one cast would carry DT's rounding of both operands. Every piece has v's sign (hence toward zero,
    as _bf16x3): a zero p1 of a nonzero v becomes v's sign times a value below DT's rounding of anything but the
    tiniest products (2^-126 in bf16, fp16's smallest subnormal 2^-24), and an infinite v gives (v, that), so that
    inf times the pieces sums to inf, as inf times v, not to inf - inf or inf * 0 = NaN."""
    if DT == tl.bfloat16:
        tiny = tl.where(v < 0, -1.1754943508222875e-38, 1.1754943508222875e-38)
    else:
        tiny = tl.where(v < 0, -5.960464477539063e-08, 5.960464477539063e-08)
    p0 = v.to(DT)  # to nearest; one step back toward zero where that rounded away (16-bit sign-magnitude: bits - 1)
    p0 = tl.where(tl.abs(p0.to(tl.float32)) > tl.abs(v), (p0.to(tl.int16, bitcast=True) - 1).to(DT, bitcast=True), p0)
    r1 = tl.where(tl.abs(v) < float("inf"), v - p0.to(tl.float32), 0.0)
    p1 = tl.where((r1 == 0) & (v != 0), tiny, r1).to(DT)
    return p0, p1


@triton.jit
def _rank_expand(l, lb, acc, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """acc + l @ lb for the expand's and dx's rank-r term: l (u or g) fp32, lb (B or A) as stored, acc fp32 or
    None; DT the output's dtype (fp32: one dot in DOT_PREC). 16-bit adapters: l rounded to DT, one MMA, as
    PyTorch rounds u and g there. fp32 adapters (PEFT's default), where PyTorch keeps the term in fp32, with SPLIT
    (passes that round the output once): both operands split (_split2), one dot over the four products of pieces (a
    K-step of 4r against the main loop's K), so that the term carries no rounding of its own; rounded, u and B added
    DT's error at the term's scale twice over, 1.7x PyTorch's error in y where the adapter's rows are 4x W's, and a
    DoRA model's magnitude grads past the tolerance rule (tests/test_triton_backend.py). Without SPLIT (the cuBLAS
    main loop's prefill, which writes the term in DT for cuBLAS to add to: two roundings either way) both are
    rounded: the split measured 5-19% slower forwards there at r = 64 (FINDINGS, DoRA)."""
    if SPLIT and lb.dtype == tl.float32 and DT != tl.float32:
        l0, l1 = _split2(l, DT)
        b0, b1 = _split2(lb, DT)
        BM_: tl.constexpr = l.shape[0]
        R_: tl.constexpr = l.shape[1]
        BN_: tl.constexpr = lb.shape[1]
        # (l0 + l1)(b0 + b1) as one dot of K = 4 R: element (j, i, k) of the K axis pairs l's piece i with b's
        # piece k at rank j. One wgmma chain, as the 16-bit term: three dots chained into the accumulator made
        # ptxas serialise every wgmma of the TMA kernel (C7515, "non wgmma instructions defining accumulator
        # registers ... between start and end of the pipeline stage").
        lp = tl.join(l0, l1)  # (BM, R, 2): [m, j, i]
        lk = tl.reshape(tl.join(lp, lp), (BM_, 4 * R_))  # [m, (j, i, k)] = l_i[m, j]
        bp = tl.permute(tl.join(b0, b1), (0, 2, 1))  # (R, 2, BN): [j, k, n]
        bk = tl.reshape(tl.permute(tl.join(bp, bp), (0, 3, 1, 2)), (4 * R_, BN_))  # [(j, i, k), n] = b_k[j, n]
        acc = tl.dot(_mm(lk), _mm(bk), acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(_mm(l.to(DT)), _mm(lb.to(DT)), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _col_scale_bias(acc, cs_ptr, bias_ptr, offs_n, n_mask, COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc (fp32, (BM, BN)) times the column scale cs[offs_n] (COL_SCALE), then plus bias[offs_n] (HAS_BIAS), in
    fp32: DoRA's y = c ⊙ z + b before its one rounding (the output passes' epilogues, the scale pass)."""
    if COL_SCALE:
        acc = acc * tl.load(cs_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc


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
