"""Triton backend of the LoRA op (contract: ``lora_kernels/backends/__init__.py``).

Math (x: (M, K), W: (N, K), A: (r, K), B: (N, r), s = scaling, keep = dropout mask of (M, K), q = 1 - p):

    forward    u  = s/q * (keep * x) @ A^T                     _shrink_kernel      (M, r) fp32
               y  = x @ W^T + u @ B^T + b                      _gemm_lora_kernel   (M, N) x.dtype
               (M <= SMALL_M: both in one launch               _small_m_fwd_kernel)
    backward   g  = dy @ B            (and dB = dy^T @ u)      _g_db_kernel        (M, r) fp32, one pass over dy
               dx = dy @ W + keep * s/q * (g @ A)              _gemm_lora_kernel   (M, K) x.dtype
               dA = s/q * g^T @ (keep * x)                     _da_kernel          (r, K)
               dB = dy^T @ u                                   _g_db_kernel / _db_kernel

Cost (2-byte dtype, r << N, K): the two big GEMMs are 2*M*N*K FLOPs each and move about
2*(M*K + N*K + M*N) bytes (plus re-reads absorbed by L2 thanks to grouped tile order); the rank-r terms add
2*M*r*(N + K) FLOPs per pass and read x or dy once more (2*M*K or 2*M*N bytes), so the LoRA overhead is
an O(r/N + r/K) fraction of the FLOPs and roughly one extra read of the activations per pass.

Tiling: the big GEMMs tile the output (BM, BN) in grouped (swizzled) order and loop over K with BK; the
rank-r term is one more K-step of width R_PAD (r padded to a power of two >= 16 with masked loads) into the
same fp32 accumulator. When dropout is on, the dx LoRA term must be masked per element, so it is a separate
(BM, R_PAD) x (R_PAD, BN) dot in the epilogue with the mask regenerated for the output tile. The helper
kernels loop over the long dimension; every reduction is deterministic (no atomics): partials are written
to a buffer per M-chunk and summed with torch in a fixed order.

Main loop (measured, bench/results/gemm_probe_h200.md): on an H200 with triton 3.6 the best Triton main loop
(TMA descriptors, persistent, 128x256x64 tiles, with or without warp specialization) reached 590-610 TFLOP/s
against cuBLAS's 700-800 (0.74-0.86x), and the pointer-based kernel below 0.66-0.77x. Folding the rank-r step
into such a loop costs ~0%, but the loop itself loses 15-35%. So on GPUs the big frozen GEMM runs in cuBLAS
and the LoRA work is fused around it: ``_gemm_lora_kernel`` runs with zero main K-steps to write
``[keep *] lora_scale * l @ lb + bias`` (one write of the output), then ``c.addmm_(a, b)`` accumulates the
GEMM into it with beta = 1, reading c in cuBLAS's epilogue, which overlaps the compute-bound main loop.
Extra traffic per pass: one read of x (shrink) or dy (g, dB) and one write of the output.
``LORA_KERNELS_TRITON_MAINLOOP=triton`` selects the all-Triton main loop (used on CPU under the interpreter).

Precision policy: each product runs in the precision PyTorch uses for the same inputs, accumulation is fp32. The
big GEMMs and the rank-r expand into the 16-bit outputs cast their tiles to x's dtype. The adapter products (u, g,
dA, dB) do too when the adapters have x's dtype; with fp32 adapters on a 16-bit x (PEFT's default) they run as fp32
"ieee" dots (``_rank_f32``), since PyTorch computes them in fp32. fp32 inputs get full-fp32 dots (``input_precision="ieee"``) so that fp32 results meet
the same error bound as PyTorch's fp32 matmul (measured on H200: TF32 dots gave 1e-3..8e-3 max error on y
against PyTorch's 3e-7..9e-7, far outside the tolerance rule); ``LORA_KERNELS_TRITON_FP32_PRECISION=tf32`` opts
into TF32 for speed. The big GEMM on GPUs is cuBLAS, which follows ``torch.backends.cuda.matmul.allow_tf32``.

Dropout mask: Philox 4x32-10 via ``tl.philox`` generated inside the kernels (``_keep_mask``, one call per 8
columns), bit-identical to ``lora_kernels.philox.dropout_mask``; with p == 0 no mask code is compiled (constexpr HAS_DROPOUT).
"""
from __future__ import annotations

import functools
import operator

import torch

from .. import _config
from .._config import TritonKnobs
from ..philox import calls_per_row, keep_threshold

try:  # the module must import (for is_available) even where triton is missing
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc


def is_available() -> tuple[bool, str]:
    """(True, "") when Triton imports and there is a CUDA device or TRITON_INTERPRET=1."""
    if triton is None:
        return False, f"triton does not import: {_TRITON_IMPORT_ERROR!r}"
    if _config.TRITON_INTERPRET:
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, "no CUDA device and TRITON_INTERPRET != 1"


# Per-call scalar arguments of the kernels. Triton specializes an integer argument on its value class (== 1 becomes a
# constant, divisible by 16 an attribute, the 32- or 64-bit type follows the value) and compiles one kernel per class,
# so a seed drawn per call would compile new kernels now and then for the whole run. These arguments are excluded
# from specialization, and the integers among them carry a fixed type annotation (tl.int64 / tl.int32): one compiled
# kernel serves every value (tests/test_triton_specialization.py). Floats are never specialized; the scales are listed
# for the record.
_PER_CALL_SCALARS = ["scale", "lora_scale", "thr", "seed", "seed_in_mem", "offset"]

if triton is not None:
    # The interpreter (TRITON_INTERPRET=1) miscomputes bf16 arithmetic: tl.dot on bf16 operands, and inf * 0 (it
    # gives 0). There, bf16 operands are widened to fp32: exact, and so are the products of two bf16 values in fp32,
    # so a dot still equals a bf16 MMA with fp32 accumulation. Compiled kernels are unchanged (the constant is False
    # and its branches are not compiled).
    _WIDEN_BF16 = tl.constexpr(_config.TRITON_INTERPRET)

    @triton.jit
    def _mm(t):
        """A tl.dot operand: `t` itself, or under the interpreter a bf16 `t` widened to fp32."""
        if _WIDEN_BF16:
            if t.dtype == tl.bfloat16:
                t = t.to(tl.float32)
        return t

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
    # Dropout mask
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

    # ------------------------------------------------------------------------------------------------------
    # u = s/q * dropout_mask(x) @ A^T     (grid: (M blocks, K splits); loops over its K range; x read once)
    # With several K splits (small M: too few M blocks to fill the GPU), split s writes its partial sum to
    # u[s] of an (S, M, r) buffer, summed afterwards in a fixed order.
    # ------------------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=_PER_CALL_SCALARS)
    def _shrink_kernel(
        x_ptr, a_ptr, u_ptr,
        M, K, R, K_PER_SPLIT,
        s_xm, s_xk, s_ar, s_ak, s_us, s_um, s_ur,
        scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
        HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr, RANK_F32: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr,
    ):
        DT = x_ptr.dtype.element_ty
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_m = pid * BM + tl.arange(0, BM)
        m_mask = offs_m < M
        rk = tl.arange(0, BK)
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
        k_start = pid_s * K_PER_SPLIT  # a multiple of BK (so of 8, as the mask's column groups need)
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + (k_start + rk)[None, :].to(tl.int64) * s_xk
        a_ptrs = a_ptr + rr[None, :] * s_ar + (k_start + rk)[:, None].to(tl.int64) * s_ak  # A^T tile (BK, R_PAD)
        acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
        if HAS_DROPOUT:
            seed = _load_seed(seed, seed_ptr, seed_in_mem)
        for k0 in range(k_start, k_end, BK):
            k_mask = (k0 + rk) < k_end
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _keep_mask(seed, offset, offs_m, k0, K8, thr, BM, BK)
                xt = _apply_keep(xt, keep)
            at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if RANK_F32:
                acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(_mm(xt), _mm(at.to(DT)), acc, input_precision=DOT_PREC)
            x_ptrs += BK * s_xk
            a_ptrs += BK * s_ak
        acc = acc * scale
        u_ptrs = u_ptr + pid_s.to(tl.int64) * s_us + offs_m.to(tl.int64)[:, None] * s_um + rr[None, :] * s_ur
        tl.store(u_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])

    # ------------------------------------------------------------------------------------------------------
    # C = a @ b + [keep *] lora_scale * (l @ lb) + bias
    #   forward: a = x, b = W^T (strides swapped), l = u, lb = B^T, lora_scale = 1, bias
    #   dx:      a = dy, b = W,                    l = g, lb = A,   lora_scale = s/q, keep mask
    # ------------------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=_PER_CALL_SCALARS)
    def _gemm_lora_kernel(
        a_ptr, b_ptr, l_ptr, lb_ptr, bias_ptr, c_ptr,
        M, N, K, R,
        s_am, s_ak, s_bk, s_bn, s_lm, s_lr, s_lbr, s_lbn, s_cm, s_cn,
        lora_scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
        M_BUCKET,
        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        DT = a_ptr.dtype.element_ty
        # grouped tile order: GROUP_M row-blocks sweep the N blocks together (b tiles stay in L2)
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_mask = offs_m < M
        n_mask = offs_n < N
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

        # rank-r step (width R_PAD, masked to R)
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
        lt = tl.load(l_ptr + offs_m.to(tl.int64)[:, None] * s_lm + rr[None, :] * s_lr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        lbt = tl.load(lb_ptr + rr[:, None] * s_lbr + offs_n.to(tl.int64)[None, :] * s_lbn,
                      mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(DT)
        if HAS_DROPOUT:
            lo = tl.dot(_mm(lt.to(DT)), _mm(lbt), input_precision=DOT_PREC)
            seed = _load_seed(seed, seed_ptr, seed_in_mem)
            keep = _keep_mask(seed, offset, offs_m, pid_n * BN, K8, thr, BM, BN)
            acc += lo * lora_scale * keep.to(tl.float32)  # as the reference: NaN/inf times a dropped 0 is NaN
        elif DOT_PREC == "ieee":
            # fp32 outputs: the rank-r sum gets its own accumulator. Folded into the main one, its r small terms
            # are each rounded against the large x W^T partial (measured on H200 at r=256: 4.6x torch's error).
            # The scale multiplies the dot's result: Triton's combine pass rewrites `acc + dot(a, b, 0)` into
            # `dot(a, b, acc)`, which would fold the sum back into the main accumulator.
            acc += tl.dot(lt, lbt, input_precision=DOT_PREC) * lora_scale
        else:  # 16-bit outputs: one more K-step into the same accumulator (output rounding dominates)
            acc = tl.dot(_mm((lt * lora_scale).to(DT)), _mm(lbt), acc, input_precision=DOT_PREC)

        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += bias[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * s_cm + offs_n.to(tl.int64)[None, :] * s_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

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
    def _small_m_fwd_kernel(
        x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, u_ptr, up_ptr, y_ptr,
        M, N, K, R, U_SPLITS,
        s_xm, s_xk, s_wn, s_wk, s_ar, s_ak, s_bn, s_br, s_um, s_ur, s_up, s_ym, s_yn,
        scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
        U_GIVEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        DT = x_ptr.dtype.element_ty
        pid_n = tl.program_id(0)
        offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_mask = offs_m < M
        n_mask = offs_n < N
        rk = tl.arange(0, BK)
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
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
        if DOT_PREC == "ieee":  # fp32: own accumulator, scaled after the dot (see _gemm_lora_kernel)
            acc += tl.dot(uacc, bt, input_precision=DOT_PREC) * scale
        else:
            acc = tl.dot(_mm(u.to(DT)), _mm(bt), acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n.to(tl.int64)[None, :] * s_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    # ------------------------------------------------------------------------------------------------------
    # g = dy @ B (grid: M blocks; loops over N) and, if NEED_DB, per-M-block partials of dB = dy^T @ u
    # written to dbp[pid_m] (summed with torch afterwards): one pass over dy.
    # ------------------------------------------------------------------------------------------------------
    @triton.jit
    def _g_db_kernel(
        dy_ptr, b_ptr, u_ptr, g_ptr, dbp_ptr,
        M, N, R,
        s_dm, s_dn, s_bn, s_br, s_um, s_ur, s_gm, s_gr, s_pp, s_pn, s_pr,
        NEED_DB: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr, RANK_F32: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr,
    ):
        DT = dy_ptr.dtype.element_ty
        CT = tl.float32 if RANK_F32 else DT  # operand type of the rank-r products
        PREC: tl.constexpr = "ieee" if RANK_F32 else DOT_PREC
        pid = tl.program_id(0)
        offs_m = pid * BM + tl.arange(0, BM)
        m_mask = offs_m < M
        rn = tl.arange(0, BN)
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
        dy_ptrs = dy_ptr + offs_m.to(tl.int64)[:, None] * s_dm + rn[None, :] * s_dn
        b_ptrs = b_ptr + rn[:, None] * s_bn + rr[None, :] * s_br
        if NEED_DB:
            ut = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * s_um + rr[None, :] * s_ur,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(CT)
        acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
        for n0 in range(0, N, BN):
            n_mask = (n0 + rn) < N
            dyt = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(CT)
            bt = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(CT)
            acc = tl.dot(_mm(dyt), _mm(bt), acc, input_precision=PREC)
            if NEED_DB:
                part = tl.dot(_mm(tl.trans(dyt)), _mm(ut), input_precision=PREC)  # (BN, R_PAD)
                p_ptrs = dbp_ptr + pid * s_pp + (n0 + rn).to(tl.int64)[:, None] * s_pn + rr[None, :] * s_pr
                tl.store(p_ptrs, part, mask=n_mask[:, None] & r_mask[None, :])
            dy_ptrs += BN * s_dn
            b_ptrs += BN * s_bn
        g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * s_gm + rr[None, :] * s_gr
        tl.store(g_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])

    # ------------------------------------------------------------------------------------------------------
    # dB partials = dy^T @ u over an M-chunk  (grid: (N blocks, M splits); loops over the chunk)
    # ------------------------------------------------------------------------------------------------------
    @triton.jit
    def _db_kernel(
        dy_ptr, u_ptr, dbp_ptr,
        M, N, R, M_PER_SPLIT,
        s_dm, s_dn, s_um, s_ur, s_pp, s_pn, s_pr,
        R_PAD: tl.constexpr, DOT_PREC: tl.constexpr, RANK_F32: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr,
    ):
        DT = dy_ptr.dtype.element_ty
        CT = tl.float32 if RANK_F32 else DT
        PREC: tl.constexpr = "ieee" if RANK_F32 else DOT_PREC
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_mask = offs_n < N
        rm = tl.arange(0, BM)
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
        acc = tl.zeros((BN, R_PAD), dtype=tl.float32)
        m_start = pid_s * M_PER_SPLIT
        m_end = tl.minimum(m_start + M_PER_SPLIT, M)
        for m0 in range(m_start, m_end, BM):
            offs_m = m0 + rm
            m_mask = offs_m < m_end
            dyt = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * s_dm + offs_n[None, :] * s_dn,
                          mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(CT)
            ut = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * s_um + rr[None, :] * s_ur,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(CT)
            acc = tl.dot(_mm(tl.trans(dyt)), _mm(ut), acc, input_precision=PREC)
        p_ptrs = dbp_ptr + pid_s * s_pp + offs_n.to(tl.int64)[:, None] * s_pn + rr[None, :] * s_pr
        tl.store(p_ptrs, acc, mask=n_mask[:, None] & r_mask[None, :])

    # ------------------------------------------------------------------------------------------------------
    # dA partials = s/q * g^T @ (keep * x) over an M-chunk  (grid: (K blocks, M splits); x read once)
    # ------------------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=_PER_CALL_SCALARS)
    def _da_kernel(
        g_ptr, x_ptr, dap_ptr,
        M, K, R, M_PER_SPLIT,
        s_gm, s_gr, s_xm, s_xk, s_pp, s_pr, s_pk,
        scale, thr: tl.int32, seed: tl.int64, seed_ptr, seed_in_mem: tl.int32, offset: tl.int64, K8,
        HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr, RANK_F32: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr,
    ):
        DT = x_ptr.dtype.element_ty
        CT = tl.float32 if RANK_F32 else DT
        PREC: tl.constexpr = "ieee" if RANK_F32 else DOT_PREC
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_k = pid_k * BK + tl.arange(0, BK)
        k_mask = offs_k < K
        rm = tl.arange(0, BM)
        rr = tl.arange(0, R_PAD)
        r_mask = rr < R
        acc = tl.zeros((R_PAD, BK), dtype=tl.float32)
        m_start = pid_s * M_PER_SPLIT
        m_end = tl.minimum(m_start + M_PER_SPLIT, M)
        if HAS_DROPOUT:
            seed = _load_seed(seed, seed_ptr, seed_in_mem)
        for m0 in range(m_start, m_end, BM):
            offs_m = m0 + rm
            m_mask = offs_m < m_end
            gt = tl.load(g_ptr + offs_m.to(tl.int64)[None, :] * s_gm + rr[:, None] * s_gr,
                         mask=r_mask[:, None] & m_mask[None, :], other=0.0).to(CT)  # (R_PAD, BM)
            xt = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + offs_k[None, :] * s_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _keep_mask(seed, offset, offs_m, pid_k * BK, K8, thr, BM, BK)
                xt = _apply_keep(xt, keep)
            acc = tl.dot(_mm(gt), _mm(xt.to(CT)), acc, input_precision=PREC)
        acc = acc * scale
        p_ptrs = dap_ptr + pid_s * s_pp + rr[:, None] * s_pr + offs_k.to(tl.int64)[None, :] * s_pk
        tl.store(p_ptrs, acc, mask=r_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------------
_MAX_SMEM = 200 * 1024  # bytes of shared memory a config may plan for (H100 has 227 KB per block)
# dB is fused into the g pass (per-M-block fp32 partials, written then read back by the sum) when the partial
# buffer is at most this fraction of dy's bytes, i.e. when it costs no more than the second read of dy that
# the separate _db_kernel pass would. Tests set it to 0 / inf to exercise both paths.
_FUSE_DB_PARTIAL_RATIO = 0.5


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a constexpr function whose host call costs microseconds)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _r_pad(r: int) -> int:
    return max(16, _next_pow2(r))


def _dot_precision(dtype: torch.dtype, kn: TritonKnobs) -> str:
    return kn.fp32_prec if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _rank_f32(x, *adapters) -> bool:
    """fp32 adapters on a 16-bit x: the adapter products (u, g, dA, dB) then run in fp32 ("ieee" dots), as
    PyTorch computes them for such inputs; rounding u, g, A or B to x's dtype would break the tolerance rule."""
    return x.dtype != torch.float32 and any(a.dtype == torch.float32 for a in adapters)


# Autotuned configs by problem key. The first call of a key runs triton's autotuner; later calls launch the JIT
# kernel with the chosen config directly, skipping the autotuner's per-call work (tens of microseconds of host
# time per launch, measured on the H200 machine: bench/host_profile.py).
_TUNED: dict = {}


def _launch_tuned(key, tuner, kernel, grid, args, meta):
    """kernel[grid(config kwargs)](*args, **meta, **config): the tuned config for `key`, tuning on first use."""
    cfg = _TUNED.get(key)
    if cfg is None:  # the autotuner benchmarks the configs, then runs the best one: that is this call's launch
        tuner[grid](*args, **meta)
        _TUNED[key] = tuner.best_config
        return
    _launch(kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})


# ----------------------------------------------------------------------------------------------------------
# Launching. Triton's JITFunction.run costs 10-40 us of host time per launch (measured on a CPU with the launcher
# stubbed: 28 us with triton 3.9, 38 us with 3.6, for the ~30 arguments of these kernels): it reads its knobs, binds
# and specializes every argument, and builds a cache key string, before the driver launch itself (under 1 us of
# Python). A LoRA forward+backward makes five or six launches, so that was most of the backend's host time.
#
# _launch keeps, per launch site, the CompiledKernel the JIT chose on the first launch, and relaunches it directly
# through its launcher, with the arguments in the order the JIT passes them. The cache key holds everything the JIT
# specializes on: the kernel, the device, the keyword arguments (constexprs and launch options), and every argument
# except the per-call scalars (_PER_CALL_SCALARS: do_not_specialize with fixed types), with integers by value and
# tensors by dtype and 16-byte alignment; so a key always maps to the binary the JIT would pick. While a launch hook
# is installed (profilers do that) every launch takes the JIT's path. LORA_KERNELS_TRITON_FAST_LAUNCH=0 turns this off; it is on only for the triton
# versions whose launcher convention was checked (3.6 to 3.9); tests/test_triton_fast_launch.py checks that both
# paths launch the same binary with the same arguments.
# ----------------------------------------------------------------------------------------------------------
def _fast_launch_enabled() -> bool:
    if triton is None or not _config.TRITON_FAST_LAUNCH:
        return False
    try:
        version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (3, 6) <= version <= (3, 9)


_FAST_LAUNCH = _fast_launch_enabled()
_LAUNCHED: dict = {}  # launch key -> CompiledKernel
_MAX_LAUNCHED = 4096  # distinct launch keys kept (one per shape, dtype and config); beyond that the table restarts


_LAYOUTS: dict = {}  # id(kernel) -> its argument layout for the fast path (kernels are module globals, never freed)


def _arg_layout(kernel, args: tuple):
    """How _launch reads a kernel's arguments: (number of runtime parameters, getter of the integer arguments that
    select the binary, positions of the tensor arguments, names of the constexpr parameters); None when the kernel
    does not fit the fast path (a constexpr before a runtime parameter, or a runtime argument that is neither a
    tensor nor a number). Built from the first launch: every call site passes the same kinds at each position."""
    layout = _LAYOUTS.get(id(kernel), False)
    if layout is not False:
        return layout
    params = kernel.params
    n_runtime = sum(not p.is_constexpr for p in params)
    layout = None
    if not any(p.is_constexpr for p in params[:n_runtime]) and len(args) == n_runtime:
        tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        ints = tuple(i for i, a in enumerate(args) if i not in tensors and params[i].name not in _PER_CALL_SCALARS)
        if all(isinstance(args[i], int) for i in ints) and len(ints) >= 2:
            layout = (n_runtime, operator.itemgetter(*ints), tensors, tuple(p.name for p in params[n_runtime:]))
    _LAYOUTS[id(kernel)] = layout
    return layout


def _launch_hooks_set() -> bool:
    """Whether a launch hook is installed (triton keeps them in knobs.runtime as HookChains, empty by default)."""
    runtime = triton.knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


_JIT_FUNCTION = triton.runtime.JITFunction if triton is not None else None
_DRIVER = triton.runtime.driver if triton is not None else None


def _launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """kernel[grid](*args, **kwargs): runtime arguments positionally, constexprs and options by keyword."""
    layout = _arg_layout(kernel, args) if _FAST_LAUNCH and isinstance(kernel, _JIT_FUNCTION) else None
    if layout is None or len(args) != layout[0]:
        kernel[grid](*args, **kwargs)
        return
    driver = _DRIVER.active
    dev = driver.get_current_device()
    try:
        key = (id(kernel), dev, tuple(kwargs.items()), layout[1](args),
               tuple([(args[i].dtype, args[i].data_ptr() % 16 == 0) for i in layout[2]]))
        compiled = _LAUNCHED.get(key)
    except (AttributeError, TypeError):  # an argument of another kind than at the first launch: the JIT's path
        compiled = key = None
    if compiled is None or _launch_hooks_set():
        compiled = kernel[grid](*args, **kwargs)  # the JIT's path: compiles on first use, then launches
        if key is not None and getattr(compiled, "function", None) is not None:
            if len(_LAUNCHED) >= _MAX_LAUNCHED:
                _LAUNCHED.clear()
            _LAUNCHED[key] = compiled
        return
    g0 = grid[0]
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(g0, g1, g2, driver.get_current_stream(dev), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *[kwargs[n] for n in layout[3]])


def _seed_arg(seed: int) -> int:
    """The 64-bit seed as a signed int64 with the same bits (for kernels that take the seed by value only)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s


def _seed_args(seed, like: torch.Tensor) -> tuple:
    """The kernels' (seed, seed_ptr, seed_in_mem) for a seed given as an int (passed by value: the 64 bits as a signed
    int64; ``like``, an input of the launch, fills the unused pointer) or as a 0-d int64 tensor on the device (read by
    the kernels at run time, through the pointer cast back to int64). The seed tensor is passed viewed in like's
    dtype, so that both forms give the kernel the same signature and select the same compiled binary: a CUDA graph
    captured after eager calls compiles nothing."""
    if isinstance(seed, torch.Tensor):
        return 0, seed.reshape(1).view(like.dtype), 1
    return _seed_arg(seed), like, 0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _gemm_configs(small_m: bool, elt: int, r_pad: int):
    if small_m:
        shapes = [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 64, 4, 4),
                  (64, 64, 64, 4, 4), (64, 128, 64, 4, 3)]
    else:
        shapes = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                  (256, 128, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4)]
    configs = []
    for bm, bn, bk, warps, stages in shapes:
        smem = stages * (bm * bk + bk * bn) * elt
        smem_epi = (bm + bn) * r_pad * elt
        if max(smem, smem_epi) > _MAX_SMEM:
            continue
        configs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps,
                                     num_stages=stages))
    if not configs:
        configs.append(triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=2))
    return configs


@functools.lru_cache(maxsize=None)
def _tuned_gemm(small_m: bool, elt: int, r_pad: int):
    return triton.autotune(
        configs=_gemm_configs(small_m, elt, r_pad),
        key=["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_DROPOUT", "R_PAD", "DOT_PREC"],
    )(_gemm_lora_kernel)


@functools.lru_cache(maxsize=None)
def _prefill_config(r_pad: int):
    """The fixed tile of the cuBLAS-mode prefill (no main K-steps): 128x128, halved in M for r_pad >= 128 so the
    (BM, R_PAD) operand stays in registers."""
    return triton.Config({"BM": 128 if r_pad < 128 else 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8,
                         num_stages=1)


SMALL_M = 64  # forward calls with M <= SMALL_M take the one-launch path (_small_m_fwd_kernel)


def _small_m_smem(bm: int, bn: int, bk: int, stages: int, elt: int, a_elt: int, r_pad: int, u_given: bool) -> int:
    """Shared-memory estimate of a _small_m_fwd_kernel config: `stages` buffers of the pipelined x, W^T and (unless
    u is given) A^T tiles, plus the epilogue's u and B^T tiles; 30% headroom for layout-conversion scratch.
    Checked against triton's own allocation for sm_90 (tests/test_triton_backend.py::test_small_m_configs_fit:
    the actual use stays under the estimate; over a wider sample it was at most 0.77 of it with triton 3.6)."""
    per_stage = bm * bk * elt + bk * bn * elt + (0 if u_given else bk * r_pad * a_elt)
    rest = r_pad * bn * max(elt, a_elt) + bm * r_pad * 4
    return int(1.3 * (stages * per_stage + rest))


def _small_m_configs(bm: int, elt: int, a_elt: int, r_pad: int, u_given: bool):
    shapes = [(32, 256, 4, 4), (16, 256, 4, 4), (64, 128, 4, 4), (32, 128, 4, 4), (64, 256, 8, 3), (16, 512, 4, 3),
              (32, 64, 4, 3), (16, 64, 4, 2)]
    configs = [triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
               for bn, bk, warps, stages in shapes
               if _small_m_smem(bm, bn, bk, stages, elt, a_elt, r_pad, u_given) <= _MAX_SMEM]
    return configs or [triton.Config({"BN": 16, "BK": 32}, num_warps=4, num_stages=1)]


@functools.lru_cache(maxsize=None)
def _tuned_small_m(bm: int, elt: int, a_elt: int, r_pad: int, u_given: bool):
    return triton.autotune(configs=_small_m_configs(bm, elt, a_elt, r_pad, u_given),
                           key=["N", "K", "HAS_BIAS", "HAS_DROPOUT", "R_PAD", "DOT_PREC", "U_GIVEN", "BM"],
                           )(_small_m_fwd_kernel)


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments, called on every launch
def _small_m_heuristic(N: int, bm: int, elt: int, a_elt: int, r_pad: int, u_given: bool, sms: int) -> dict:
    """BN as large as possible while the grid still covers every SM (the shape is bound by the read of W), then
    the deepest K tile and pipeline that fit in shared memory (bytes in flight per SM decide the read rate)."""
    bn = 64 if _cdiv(N, 64) >= sms else (32 if _cdiv(N, 32) >= sms else 16)
    for bk, stages in ((256, 4), (256, 3), (128, 4), (128, 3), (64, 3), (64, 2), (32, 2), (32, 1)):
        if _small_m_smem(bm, bn, bk, stages, elt, a_elt, r_pad, u_given) <= _MAX_SMEM:
            break
    return {"BN": bn, "BK": bk, "num_warps": 4, "num_stages": stages}


def _launch_shrink(x, lora_A, u, scale, p, seed, offset, kn: TritonKnobs, split_k: bool):
    """u (M, r) = scale * (keep * x) @ A^T. With split_k, K is split so that about two programs per SM run
    (small M has too few M blocks to fill the GPU): the splits' fp32 partial sums go to an (S, M, r) buffer for
    the caller to add up. Returns (buffer, S); with S == 1 the buffer is u, already complete."""
    M, K = x.shape
    R = lora_A.shape[0]
    r_pad = _r_pad(R)
    BM, BK, warps = _helper_tiles(M, r_pad, kn)
    m_blocks, k_blocks = _cdiv(M, BM), _cdiv(K, BK)
    splits = 1
    if split_k:
        want = 2 if kn.interpret else 2 * _num_sms(x.device)
        splits = max(1, min(k_blocks, want // m_blocks))
    k_per_split = _cdiv(k_blocks, splits) * BK
    splits = _cdiv(K, k_per_split)
    out = u if splits == 1 else torch.empty((splits, M, R), dtype=torch.float32, device=x.device)
    s_us = 0 if splits == 1 else out.stride(0)
    seed_v, seed_p, seed_in_mem = _seed_args(seed, x)
    _launch(_shrink_kernel, (m_blocks, splits), (
        x, lora_A, out, M, K, R, k_per_split,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s_us, out.stride(-2), out.stride(-1),
        scale, keep_threshold(p), seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(K)),
        dict(HAS_DROPOUT=p > 0.0, R_PAD=r_pad, DOT_PREC=_dot_precision(x.dtype, kn), RANK_F32=_rank_f32(x, lora_A),
             BM=BM, BK=BK, num_warps=warps,
             num_stages=_stages(BM * BK * x.element_size() + BK * r_pad * lora_A.element_size(), kn)))
    return out, splits


def _forward_small_m(x, weight, bias, lora_A, lora_B, u, y, scale, p, seed, offset, kn: TritonKnobs):
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    r_pad = _r_pad(R)
    bm = max(16, _next_pow2(M))
    # Recomputing u in every program is free at small rank without dropout; otherwise u comes first (see kernel).
    # fp32 adapters on a 16-bit x: u comes from the shrink, which computes it in fp32.
    u_given = p > 0.0 or r_pad >= 64 or _rank_f32(x, lora_A)
    up, u_splits = u, 1
    if u_given:  # the partial sums are added up by the kernel below
        up, u_splits = _launch_shrink(x, lora_A, u, scale, p, seed, offset, kn, split_k=True)
        scale = 1.0
    seed_v, seed_p, seed_in_mem = _seed_args(seed, x)
    args = (x, weight, lora_A, lora_B, bias if bias is not None else y, u, up, y, M, N, K, R, u_splits,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1), M * R, y.stride(0), y.stride(1),
            scale, keep_threshold(p), seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(K))
    dot_prec = _dot_precision(x.dtype, kn)
    meta = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, R_PAD=r_pad, DOT_PREC=dot_prec,
                U_GIVEN=u_given, BM=bm)
    grid = lambda cfg: (_cdiv(N, cfg["BN"]), _cdiv(M, bm))  # noqa: E731
    elt, a_elt = x.element_size(), lora_A.element_size()
    if kn.interpret:
        _launch(_small_m_fwd_kernel, grid({"BN": 32}), args, dict(meta, BN=32, BK=32))
    elif not kn.autotune:
        cfg = _small_m_heuristic(N, bm, elt, a_elt, r_pad, u_given, _num_sms(x.device))
        _launch(_small_m_fwd_kernel, grid(cfg), args, {**meta, **cfg})
    else:
        key = ("small_m", bm, N, K, bias is not None, p > 0.0, r_pad, dot_prec, u_given, x.dtype, weight.dtype,
               lora_A.dtype, lora_B.dtype)
        _launch_tuned(key, _tuned_small_m(bm, elt, a_elt, r_pad, u_given), _small_m_fwd_kernel, grid, args, meta)


def _launch_gemm(a, b_strides, b, b_mat, l, lb_strides, lb, bias, c, N, K, R, lora_scale, p, seed, offset,
                 kn: TritonKnobs):
    """c (M, N) = a (M, K) @ b[k, n] + [keep] * lora_scale * l (M, R) @ lb[r, n] + bias.

    With the cuBLAS main loop, the kernel runs with no main K-steps (it writes the rank-r term and the bias) and
    cuBLAS then accumulates a @ b_mat into c with beta = 1 (c.addmm_), reading c in its epilogue.
    """
    M = a.shape[0]
    cublas = kn.cublas and a.is_cuda
    if cublas:
        K = 0
    r_pad = _r_pad(R)
    has_bias = bias is not None
    has_dropout = p > 0.0
    m_bucket = min(_next_pow2(M), 4096)
    seed_v, seed_p, seed_in_mem = _seed_args(seed, a)
    args = (a, b, l, lb, bias if has_bias else c, c, M, N, K, R,
            a.stride(0), a.stride(1), b_strides[0], b_strides[1], l.stride(0), l.stride(1),
            lb_strides[0], lb_strides[1], c.stride(0), c.stride(1),
            float(lora_scale), keep_threshold(p), seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(N), m_bucket)
    dot_prec = _dot_precision(a.dtype, kn)
    meta = dict(HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PREC=dot_prec)
    grid = lambda cfg: (_cdiv(M, cfg["BM"]) * _cdiv(N, cfg["BN"]),)  # noqa: E731
    if kn.interpret:
        cfg = dict(BM=16, BN=32, BK=32, GROUP_M=4)
        _launch(_gemm_lora_kernel, grid(cfg), args, {**meta, **cfg})
    elif cublas:
        # No main K-steps: a memory-bound write of c (plus the rank-r dot and, with dropout, the mask). One fixed
        # tile serves every shape (measured on H100 at 8192x4096: 28 us, ~2.4 TB/s); tuning main-loop tiles for
        # it would only cost compile time on each new shape.
        cfg = _prefill_config(r_pad)
        _launch(_gemm_lora_kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})
    elif not kn.autotune:  # first config, no tuning (GPU tests)
        cfg = _gemm_configs(M <= 64, a.element_size(), r_pad)[0]
        _launch(_gemm_lora_kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})
    else:
        key = ("gemm", M <= 64, m_bucket, N, K, has_bias, has_dropout, r_pad, dot_prec, a.dtype, b.dtype, l.dtype,
               lb.dtype)
        _launch_tuned(key, _tuned_gemm(M <= 64, a.element_size(), r_pad), _gemm_lora_kernel, grid, args, meta)
    if cublas:
        c.addmm_(a, b_mat)


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments, called on every launch
def _helper_tiles(M: int, r_pad: int, kn: TritonKnobs):
    """(BM, BN/BK, num_warps) for the rank-r helper kernels."""
    if kn.interpret:
        return 16, 32, 4
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bn = 64 if r_pad >= 128 else 128
    return bm, bn, (8 if r_pad >= 128 else 4)


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments, called on every launch
def _stages(bytes_per_stage: int, kn: TritonKnobs) -> int:
    """Software-pipeline depth for a helper kernel: at most 3 stages within ~160 KB of shared memory."""
    if kn.interpret:
        return 1
    return max(1, min(3, (160 * 1024) // max(bytes_per_stage, 1)))


def _splits(M: int, BM: int, n_blocks: int, device) -> tuple[int, int]:
    """(number of M-chunks, rows per chunk) so that n_blocks * chunks fills the GPU about twice."""
    m_blocks = _cdiv(M, BM)
    want = max(1, (2 * _num_sms(device) + n_blocks - 1) // max(n_blocks, 1))
    s = max(1, min(m_blocks, want))
    per = _cdiv(m_blocks, s) * BM
    return _cdiv(M, per), per


def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    kn = _config.triton_knobs()
    u = torch.empty((M, R), dtype=torch.float32, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, u
    if M <= SMALL_M and K > 0 and N > 0:
        _forward_small_m(x, weight, bias, lora_A, lora_B, u, y, float(scaling) / (1.0 - float(p)), p, seed, offset, kn)
        return y, u
    if K == 0:
        u.zero_()
    else:
        _launch_shrink(x, lora_A, u, float(scaling) / (1.0 - float(p)), p, seed, offset, kn, split_k=False)  # 1 split
    if N == 0:
        return y, u
    # y = x @ W^T + u @ B^T + b: b operand W^T[k, n] = W[n, k]; lb operand B^T[r, n] = B[n, r]
    _launch_gemm(x, (weight.stride(1), weight.stride(0)), weight, weight.t(), u, (lora_B.stride(1), lora_B.stride(0)),
                 lora_B, bias, y, N, K, R, 1.0, 0.0, seed, offset, kn)
    return y, u


def _partials(S: int, rows: int, cols: int, device) -> tuple:
    """(buffer, its 3 strides) for S fp32 partial sums of a (rows, cols) result that a kernel writes at
    pid * stride0: an (S, rows, cols) tensor, or with S == 1 the (rows, cols) result itself (no sum, no view)."""
    if S == 1:
        buf = torch.empty((rows, cols), dtype=torch.float32, device=device)
        return buf, (0, cols, 1)
    buf = torch.empty((S, rows, cols), dtype=torch.float32, device=device)
    return buf, (rows * cols, cols, 1)


def _sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum of the fp32 partials of ``_partials`` over the split dim (fixed order: deterministic), in `dtype`."""
    out = part.sum(0) if part.dim() == 3 else part
    return out if dtype == torch.float32 else out.to(dtype)


def backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    dev = x.device
    dx = torch.empty((M, K), dtype=x.dtype, device=dev) if need_dx else None
    dA = dB = None
    if M == 0 or N == 0 or K == 0:
        if need_dx:
            dx.zero_()
        if need_dA:
            dA = torch.zeros((R, K), dtype=lora_A.dtype, device=dev)
        if need_dB:
            dB = torch.zeros((N, R), dtype=lora_B.dtype, device=dev)
        return dx, dA, dB

    kn = _config.triton_knobs()
    r_pad = _r_pad(R)
    prec = _dot_precision(x.dtype, kn)
    rank_f32 = _rank_f32(x, lora_A, lora_B)
    BM, BN, warps = _helper_tiles(M, r_pad, kn)
    need_g = need_dx or need_dA
    scale = float(scaling) / (1.0 - float(p))
    seed_v, seed_p, seed_in_mem = _seed_args(seed, x)

    g = None
    if need_g:
        g = torch.empty((M, R), dtype=torch.float32, device=dev)
        m_blocks = _cdiv(M, BM)
        # fuse dB into the g pass when the per-M-block partial buffer is small next to dy (2r/BM of it)
        fuse_db = need_dB and m_blocks * N * R * 4 <= _FUSE_DB_PARTIAL_RATIO * M * N * dy.element_size()
        dbp, dbp_s = _partials(m_blocks, N, R, dev) if fuse_db else (g, (0, 0, 0))
        _launch(_g_db_kernel, (m_blocks,), (
            dy, lora_B, u, g, dbp, M, N, R,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1),
            g.stride(0), g.stride(1), *dbp_s),
            dict(NEED_DB=fuse_db, R_PAD=r_pad, DOT_PREC=prec, RANK_F32=rank_f32, BM=BM, BN=BN, num_warps=warps,
                 num_stages=_stages(BM * BN * dy.element_size() * (2 if fuse_db else 1)
                                    + BN * r_pad * lora_B.element_size() + (BM * r_pad * 4 if fuse_db else 0), kn)))
        if fuse_db:
            dB = _sum_partials(dbp, lora_B.dtype)
    if need_dB and dB is None:
        n_blocks = _cdiv(N, BN)
        S, per = _splits(M, BM, n_blocks, dev)
        dbp, dbp_s = _partials(S, N, R, dev)
        _launch(_db_kernel, (n_blocks, S), (
            dy, u, dbp, M, N, R, per,
            dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), *dbp_s),
            dict(R_PAD=r_pad, DOT_PREC=prec, RANK_F32=rank_f32, BM=BM, BN=BN, num_warps=warps,
                 num_stages=_stages(BM * BN * dy.element_size() + BM * r_pad * 4, kn)))
        dB = _sum_partials(dbp, lora_B.dtype)

    if need_dA:
        k_blocks = _cdiv(K, BN)
        S, per = _splits(M, BM, k_blocks, dev)
        dap, dap_s = _partials(S, R, K, dev)
        _launch(_da_kernel, (k_blocks, S), (
            g, x, dap, M, K, R, per,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1), *dap_s,
            scale, keep_threshold(p), seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(K)),
            dict(HAS_DROPOUT=p > 0.0, R_PAD=r_pad, DOT_PREC=prec, RANK_F32=rank_f32, BM=BM, BK=BN, num_warps=warps,
                 num_stages=_stages(BM * BN * x.element_size() + BM * r_pad * 4, kn)))
        dA = _sum_partials(dap, lora_A.dtype)

    if need_dx:
        # dx = dy @ W + keep * s/q * (g @ A): b operand W[n, k] (rows = reduction dim n); lb operand A[r, k]
        _launch_gemm(dy, (weight.stride(0), weight.stride(1)), weight, weight, g, (lora_A.stride(0), lora_A.stride(1)),
                     lora_A, None, dx, K, N, R, scale, p, seed, offset, kn)
    return dx, dA, dB
