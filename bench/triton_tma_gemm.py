"""Probe kernel (not used by the package): Hopper (sm_90) main GEMM persistent, TMA-fed, with the LoRA rank-r step folded in.

Math (same as ``_gemm_lora_kernel`` in triton_backend.py):

    C = a @ b + [keep *] lora_scale * (l @ lb) + bias
      forward:  a = x (M, K), b = W^T (W is (N, K), read through a [BN, BK] descriptor and transposed)
      dx:       a = dy (M, N), b = W (N, K) read through a [BK, BN] descriptor

Tiling: one program per SM walks output tiles (BM, BN) in grouped order; the main loop streams a and b tiles
through the tensor-memory accelerator (TMA descriptors; out-of-bounds rows and columns are zero-filled on load
and clipped on store, so ragged M, N, K need no masks) into wgmma; the rank-r step (width R_PAD) and the bias
are added to the fp32 accumulator in the epilogue, which stores the tile once through TMA.

Launch: descriptors need 16-byte aligned row strides (K and N multiples of 8 for 2-byte dtypes); callers
check ``usable()`` and otherwise use the pointer-based kernel.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older triton
    TensorDescriptor = None

from lora_kernels.backends.triton_backend import _keep_mask


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _gemm_lora_tma_kernel(
    a_desc, b_desc, c_desc, l_ptr, lb_ptr, bias_ptr,
    M, N, K, R,
    s_lm, s_lr, s_lbr, s_lbn,
    lora_scale, p, seed, offset, K4,
    B_TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    DT = c_desc.dtype
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_pid_m * num_pid_n
    rr = tl.arange(0, R_PAD)
    r_mask = rr < R
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BK
            a = a_desc.load([om, ok])
            if B_TRANS:
                b = b_desc.load([on, ok]).T
            else:
                b = b_desc.load([ok, on])
            acc = tl.dot(a, b, acc)

        # epilogue: rank-r step, bias, one store
        offs_m = om + tl.arange(0, BM)
        offs_n = on + tl.arange(0, BN)
        m_mask = offs_m < M
        n_mask = offs_n < N
        lt = tl.load(l_ptr + offs_m.to(tl.int64)[:, None] * s_lm + rr[None, :] * s_lr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        lbt = tl.load(lb_ptr + rr[:, None] * s_lbr + offs_n.to(tl.int64)[None, :] * s_lbn,
                      mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(DT)
        if HAS_DROPOUT:
            lo = tl.dot(lt.to(DT), lbt)
            keep = _keep_mask(seed, offset, offs_m, on, K4, p, BM, BN)
            acc += tl.where(keep, lo * lora_scale, tl.zeros_like(lo))
        else:
            acc = tl.dot((lt * lora_scale).to(DT), lbt, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        c_desc.store([om, on], acc.to(DT))


def usable(*tensors: torch.Tensor) -> bool:
    """True on sm_90+ with 2-byte dtypes and TMA-compatible (16-byte aligned) 2-D tensors."""
    if TensorDescriptor is None or os.environ.get("LORA_KERNELS_TRITON_TMA", "1") == "0":
        return False
    t0 = tensors[0]
    if not t0.is_cuda or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1:
            return False
        if (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(M: int, N: int):
    """Tile config: large tiles for large M, narrow-M tiles for decode-size calls."""
    if M <= 64:
        return dict(BM=64, BN=128, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    return dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3)


def gemm_lora(a, b, b_trans, l, l_strides, lb, lb_strides, bias, c, R, R_PAD, lora_scale, p, seed, offset, K4,
              config=None, warp_specialize=False):
    """c = a @ (b^T if b_trans else b) + [keep *] lora_scale * l @ lb + bias, on the current stream."""
    M, K = a.shape
    N = c.shape[1]
    cfg = dict(config or _config(M, N))
    BM, BN, BK = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    group_m = cfg.pop("GROUP_M")
    a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(b, [BN, BK] if b_trans else [BK, BN])
    c_desc = TensorDescriptor.from_tensor(c, [BM, BN])
    num_sms = _num_sms(a.device.index or 0)
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    grid = (min(num_sms, tiles),)
    _gemm_lora_tma_kernel[grid](
        a_desc, b_desc, c_desc, l, lb, bias if bias is not None else c,
        M, N, K, R, l_strides[0], l_strides[1], lb_strides[0], lb_strides[1],
        float(lora_scale), float(p), seed, offset, K4,
        B_TRANS=b_trans, HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, R_PAD=R_PAD,
        BM=BM, BN=BN, BK=BK, GROUP_M=group_m, NUM_SMS=min(num_sms, tiles), WARP_SPECIALIZE=warp_specialize,
        **cfg,
    )
    return c
