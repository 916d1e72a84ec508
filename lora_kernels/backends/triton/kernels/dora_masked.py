"""DoRA's dropout pass: out = base + where(keep, a_keep·t, a_drop·t), keep the contract's Philox mask."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import _keep_mask, _load_seed


# The per-call scalars (the seed, the counter offset of a row chunk, the threshold, the scales) are not
# specialized and have fixed types, so one compiled kernel serves every value (as common._PER_CALL_SCALARS does for
# the LoRA kernels).
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
