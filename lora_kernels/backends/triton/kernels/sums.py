"""The sums of the backward's split partials (dA and dB), both in one launch."""
from __future__ import annotations

import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------------
# The sums of split partials (dA and dB: the fp32 partials of their M-chunks), both in one launch: o[i] =
# sum over s = 0 .. S-1 of p[s * n + i], stored in o's dtype (the adapter's). Two levels, in a fixed order
# (deterministic): the partials of each group of GROUP consecutive splits in split order, then the group sums in
# group order. Why: at large M there are many splits (M = 65600: 1025 dy-pass blocks), and one running fp32 sum's
# rounding error grows with their count (3.6x the chunked float32 GEMM's error in dB there, against 0.9x grouped).
# Grid: blocks0 + blocks1 programs of BLOCK elements; the first blocks0 sum (p0, o0), the rest (p1, o1).
# Bytes: each partial read once, each output written once.
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _sum_block(p_ptr, o_ptr, n, S, pid, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ptrs = p_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for g0 in range(0, S, GROUP):
        part = tl.zeros((BLOCK,), dtype=tl.float32)
        for _s in range(g0, tl.minimum(g0 + GROUP, S)):
            part += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += n
        acc += part
    tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(p0_ptr, o0_ptr, n0, S0, p1_ptr, o1_ptr, n1, S1, blocks0, BLOCK: tl.constexpr,
                         GROUP: tl.constexpr):
    pid = tl.program_id(0)
    if pid < blocks0:
        _sum_block(p0_ptr, o0_ptr, n0, S0, pid, BLOCK, GROUP)
    else:
        _sum_block(p1_ptr, o1_ptr, n1, S1, pid - blocks0, BLOCK, GROUP)
