"""The sums of the backward's split partials (dA and dB), both in one launch."""
from __future__ import annotations

import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------------
# The sums of split partials (dA and dB: the fp32 partials of their M-chunks), both in one launch: o[i] =
# sum over s = 0 .. S-1 of p[s * n + i], stored in o's dtype (the adapter's). In split order (deterministic), as a
# compensated (Kahan) fp32 sum: each add's rounding error is carried into the next, so the error stays about one
# rounding of the result whatever the count. Why: at large M there are many splits (M = 65600: 1025 dy-pass blocks),
# and a plain running fp32 sum's error grows with their count, past the tolerance rule (2x torch's own float32 sum;
# tests/test_triton_plans.py); the measurements behind this are in bench/results/FINDINGS.md (Indices past 2^31
# elements). Where a sum overflows the compensation is dropped, so inf stays inf (not inf − inf).
# Grid: blocks0 + blocks1 programs of BLOCK elements; the first blocks0 sum (p0, o0), the rest (p1, o1).
# Bytes: each partial read once, each output written once; 4 adds per partial instead of 1, hidden by the loads.
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _sum_block(p_ptr, o_ptr, n, S, pid, BLOCK: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ptrs = p_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    comp = tl.zeros((BLOCK,), dtype=tl.float32)  # the rounding error acc carries, negated
    for _s in range(0, S):
        y = tl.load(ptrs, mask=mask, other=0.0) - comp
        t = acc + y
        comp = tl.where(t - t == 0.0, (t - acc) - y, 0.0)  # t - t != 0: t is inf or NaN
        acc = t
        ptrs += n
    tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(p0_ptr, o0_ptr, n0, S0, p1_ptr, o1_ptr, n1, S1, blocks0, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < blocks0:
        _sum_block(p0_ptr, o0_ptr, n0, S0, pid, BLOCK)
    else:
        _sum_block(p1_ptr, o1_ptr, n1, S1, pid - blocks0, BLOCK)
