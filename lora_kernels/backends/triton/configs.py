"""What each Triton launch runs with: tile shapes, pipeline stages, the autotune candidates and their shared-memory
budget, the M splits of the reductions, the dot precision, and the SM count they are sized by. Every function here
is a pure function of its arguments (the memoized ones are called on every launch)."""
from __future__ import annotations

import functools

import torch
import triton

from ..._config import TritonKnobs
from .kernels import _output_gemm_kernel, _small_m_kernel

_HOPPER_SMEM = 227 * 1024  # dynamic shared memory per block of an H100 / H200 (and B200)
_SMEM_HEADROOM = 27 * 1024  # kept free of a config's estimate for triton's own buffers (layout conversions)


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a constexpr function whose host call costs microseconds)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _r_pad(r: int) -> int:
    """The rank as the kernels tile it: a power of two >= 16 (tl.dot's smallest dimension), loads masked to r."""
    return max(16, _next_pow2(r))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or _HOPPER_SMEM)


def _smem_per_block(device: torch.device) -> int:
    """Dynamic shared memory a block may use on a device (227 KB on an H100 / H200, 163 KB on an A100, 99 KB on
    sm_86 / sm_89 and sm_120): the budget of the pipelines and configs below, which are sized for a Hopper block
    and shrink to fit smaller ones (an H100's for CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return _smem_optin(device.index if device.index is not None else torch.cuda.current_device())
    return _HOPPER_SMEM


def _max_smem(smem: int) -> int:
    """Bytes of shared memory a config's estimate may reach on a block of ``smem`` bytes (200 KB on Hopper)."""
    return smem - _SMEM_HEADROOM


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


# ----------------------------------------------------------------------------------------------------- precision
def _dot_precision(dtype: torch.dtype, kn: TritonKnobs) -> str:
    return kn.fp32_prec if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _rank_f32(x, *adapters) -> bool:
    """fp32 adapters on a 16-bit x: the adapter products (u, g, dA, dB) then run in fp32 (bf16x3 or "ieee" dots,
    kernels._rank_dot), as PyTorch computes them for such inputs; rounding u, g, A or B to x's dtype would break
    the tolerance rule."""
    return x.dtype != torch.float32 and any(a.dtype == torch.float32 for a in adapters)


# ------------------------------------------------------------------------------ rank-r helper passes (M-tiled)
@functools.lru_cache(maxsize=1024)
def _helper_tiles(M: int, r_pad: int, kn: TritonKnobs):
    """(BM, BN/BK, num_warps) for the rank-r helper kernels."""
    if kn.interpret:
        return 16, 32, 4
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bn = 64 if r_pad >= 128 else 128
    return bm, bn, (8 if r_pad >= 128 else 4)


@functools.lru_cache(maxsize=1024)
def _stages(bytes_per_stage: int, kn: TritonKnobs, smem: int = _HOPPER_SMEM) -> int:
    """Software-pipeline depth for a helper kernel: at most 3 stages within ~160 KB of shared memory (less on a
    device with smaller blocks: ``smem`` bytes per block)."""
    if kn.interpret:
        return 1
    return max(1, min(3, min(160 * 1024, _max_smem(smem)) // max(bytes_per_stage, 1)))


def _splits(M: int, BM: int, n_blocks: int, device) -> tuple[int, int]:
    """(number of M-chunks, rows per chunk) so that n_blocks * chunks fills the GPU about twice."""
    m_blocks = _cdiv(M, BM)
    want = max(1, (2 * _num_sms(device) + n_blocks - 1) // max(n_blocks, 1))
    s = max(1, min(m_blocks, want))
    per = _cdiv(m_blocks, s) * BM
    return _cdiv(M, per), per


# ----------------------------------------------------------------------------------- the output GEMM (expand, dx)
@functools.lru_cache(maxsize=None)
def _gemm_configs(small_m: bool, elt: int, r_pad: int, smem: int = _HOPPER_SMEM):
    """Autotune candidates of the all-Triton GEMM (LORA_KERNELS_TRITON_MAINLOOP=triton) that fit in shared memory;
    the first one is the fixed config when tuning is off."""
    if small_m:
        shapes = [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 64, 4, 4),
                  (64, 64, 64, 4, 4), (64, 128, 64, 4, 3)]
    else:
        shapes = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                  (256, 128, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4)]
    configs = []
    for bm, bn, bk, warps, stages in shapes:
        need = stages * (bm * bk + bk * bn) * elt
        need_epi = (bm + bn) * r_pad * elt
        if max(need, need_epi) > _max_smem(smem):
            continue
        configs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps,
                                     num_stages=stages))
    if not configs:
        configs.append(triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=2))
    return configs


@functools.lru_cache(maxsize=None)
def _tuned_gemm(small_m: bool, elt: int, r_pad: int, smem: int = _HOPPER_SMEM):
    return triton.autotune(
        configs=_gemm_configs(small_m, elt, r_pad, smem),
        key=["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_DROPOUT", "R_PAD", "DOT_PREC"],
    )(_output_gemm_kernel)


@functools.lru_cache(maxsize=None)
def _rank_term_config(r_pad: int):
    """The fixed tile of the output kernel when cuBLAS runs the main loop (no main K-steps, a memory-bound write of
    the output): 128x128, halved in M for r_pad >= 128 so the (BM, R_PAD) operand stays in registers."""
    return triton.Config({"BM": 128 if r_pad < 128 else 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8,
                         num_stages=1)


# The TMA persistent output kernel (LORA_KERNELS_TRITON_MAINLOOP=tma). The tiles are those of the best
# tma_persistent configs of bench/dev/triton_gemm_probe.py on an H200 (triton 3.6): 128x256x64, 3 stages, 8 warps,
# and 128x128x64, 4 stages, 4 warps where 128x256 tiles would fill the GPU less than about twice (the probe picked
# 128x256 at 256 such tiles, 1.9 waves on 132 SMs, and 128x128 at 64: the threshold is 1.5 waves). Both flatten
# the tile and K loops. With dropout the epilogue holds a second fp32 (BM, BN) tile (the masked rank-r product) and
# the mask: 128x128 tiles on 8 warps.
# Shared memory, all live at once in the flattened loop (the next tile's loads are in flight during the epilogue):
# `stages` buffers of the a and b tiles, the output tile staged for its TMA store (whole, or C_SPLIT = 2 halves one
# after the other: half the buffer), the epilogue's rank-r operands and, with dropout, an fp32 (BM, BN)
# layout-conversion scratch, plus 1 KB for the barriers. The rank-r operands: (BM, R_PAD) fp32 and (R_PAD, BN)
# 16-bit; with fp32 adapters the (R_PAD, BN) fp32 tile and the split's operands of K = 4 R_PAD (kernels._rank_expand),
# measured at 6 R_PAD (BM + BN) + R_PAD BN bytes more than the 16-bit term's (triton 3.9 and 3.6 for sm_90, 2-4
# stages, 128x128 and 128x256 tiles, r_pad 16 and 32; at 64 the pipeliner buffers the fp32 tile per stage too, and
# fp32 adapters there keep the cuBLAS main loop: _TMA_MAX_R_PAD_F32). Where the estimate exceeds the 227 KB of a
# Hopper block, the same tile is tried with the output in halves, then the other tile, then shallower pipelines,
# then smaller tiles: with fp32 adapters at r_pad = 16 the 128x256 tile keeps its 3 stages with the output in halves
# (224 KB; whole, 256 KB). tests/test_triton_tma_mainloop.py compiles every pick for sm_90 and checks what triton
# allocates against this estimate and the limit. Ranks above _TMA_MAX_R_PAD do not take the TMA kernel (at 128 the
# compiled kernels outgrow the estimate: the rank-r operands crowd out the pipeline). None of this is autotuned
# (LORA_KERNELS_TRITON_AUTOTUNE does not apply).
_TMA_SMEM = _HOPPER_SMEM  # devices with smaller blocks do not take the TMA kernel (launch._tma_unsupported)
_TMA_MAX_R_PAD = 64
_TMA_MAX_R_PAD_F32 = 32  # fp32 adapters on 16-bit x (the split's operands, above)
# The default main loop (LORA_KERNELS_TRITON_MAINLOOP=auto) takes the TMA kernel up to this padded rank, and not for
# the masked dx (dropout). Measured in the layer (bench/suite/targets.py, M = 8192, bf16 adapters, H200, session 29,
# GPU time over the cuBLAS floor, TMA against cuBLAS main loop, shapes 4096->4096 / ->1024 / ->14336 / 14336->4096):
# r = 16, p = 0 faster on every shape, twice (forward 1.108 / 1.298 / 1.062 / 1.075 against 1.139 / 1.361 / 1.092 /
# 1.083, forward+backward 1.182 / 1.496 / 1.118 / 1.114 against 1.216 / 1.715 / 1.139 / 1.132); r = 16, p = 0.1
# forward faster (1.201 / 1.639 / 1.095 / 1.191 against 1.222 / 1.732 / 1.130 / 1.194) but forward+backward slower
# with the mask in the TMA kernel's epilogue (1.537 / 2.106 / 1.366 / 1.467 against 1.366 / 2.208 / 1.183 / 1.308);
# r = 32 and 64 slower in the forward (r = 32: 1.242 / 1.401 / 1.148 / 1.115 against 1.157 / 1.383 / 1.105 / 1.086).
_TMA_AUTO_MAX_R_PAD = 16
# The element-wise DoRA passes' (BM, BN) tile on a GPU (kernels/dora_*.py; the scale pass after a cuBLAS main
# loop in forward_scaled too): one fixed tile near the memory bandwidth.
_ELEMENTWISE_TILES = (32, 128)
_TMA_INTERPRET = dict(BM=32, BN=32, BK=32, GROUP_M=2, FLATTEN=True, C_SPLIT=1, num_warps=4, num_stages=2)


def _tma_smem(bm: int, bn: int, bk: int, stages: int, elt: int, r_pad: int, lb_elt: int,
              has_dropout: bool, c_split: int = 1) -> int:
    if lb_elt == 4:  # fp32 adapters: the fp32 (R_PAD, BN) tile and the split's K = 4 R_PAD operands (above)
        rank = bm * r_pad * 4 + 6 * r_pad * (bm + bn) + r_pad * bn
    else:
        rank = bm * r_pad * 4 + r_pad * bn * lb_elt
    return (stages * (bm + bn) * bk * elt + bm * bn * elt // c_split + rank + (bm * bn * 4 if has_dropout else 0)
            + 1024)


@functools.lru_cache(maxsize=1024)
def _tma_config(M: int, N: int, elt: int, r_pad: int, lb_elt: int, has_dropout: bool, sms: int,
                interpret: bool) -> dict:
    """The tile, pipeline and warps of _output_gemm_tma_kernel for an (M, N) output (elt: bytes per element of the
    inputs, lb_elt: of the (R, N) adapter operand): constexprs and launch options as keywords (FLATTEN among
    them)."""
    if interpret:
        return dict(_TMA_INTERPRET)
    wide = (128, 256, 64, 3, 8)
    narrow = (128, 128, 64, 4, 4)
    if has_dropout:
        order = [(128, 128, 64, 4, 8)]
    elif 2 * _cdiv(M, 128) * _cdiv(N, 256) < 3 * sms:  # under 1.5 waves of 128x256 tiles
        order = [narrow, wide]
    else:
        order = [wide, narrow]
    # each tile at its own depth first, then shallower pipelines, then smaller tiles
    tries = order + [(bm, bn, bk, st, w) for bm, bn, bk, stages, w in order for st in range(stages - 1, 1, -1)]
    for bm, bn, bk, stages, warps in tries + [(64, 128, 64, 3, 4), (64, 64, 64, 2, 4)]:
        for c_split in (1, 2):  # the output stored whole, else in halves, before a shallower pipeline
            if _tma_smem(bm, bn, bk, stages, elt, r_pad, lb_elt, has_dropout, c_split) <= _TMA_SMEM:
                return dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, FLATTEN=True, C_SPLIT=c_split, num_warps=warps,
                            num_stages=stages)
    return dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, FLATTEN=True, C_SPLIT=2, num_warps=warps, num_stages=stages)


# --------------------------------------------------------------------------------- the one-launch small-M forward
def _small_m_smem(bm: int, bn: int, bk: int, stages: int, elt: int, a_elt: int, r_pad: int, u_given: bool) -> int:
    """Shared-memory estimate of a _small_m_kernel config: `stages` buffers of the pipelined x, W^T and (unless
    u is given) A^T tiles, plus the epilogue's u and B^T tiles; 30% headroom for layout-conversion scratch.
    tests/test_triton_backend.py::test_small_m_configs_fit checks that triton's own allocation for sm_90 stays
    under it."""
    per_stage = bm * bk * elt + bk * bn * elt + (0 if u_given else bk * r_pad * a_elt)
    rest = r_pad * bn * max(elt, a_elt) + bm * r_pad * 4
    return int(1.3 * (stages * per_stage + rest))


def _small_m_configs(bm: int, elt: int, a_elt: int, r_pad: int, u_given: bool, smem: int = _HOPPER_SMEM):
    shapes = [(32, 256, 4, 4), (16, 256, 4, 4), (64, 128, 4, 4), (32, 128, 4, 4), (64, 256, 8, 3), (16, 512, 4, 3),
              (32, 64, 4, 3), (16, 64, 4, 2)]
    configs = [triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
               for bn, bk, warps, stages in shapes
               if _small_m_smem(bm, bn, bk, stages, elt, a_elt, r_pad, u_given) <= _max_smem(smem)]
    return configs or [triton.Config({"BN": 16, "BK": 32}, num_warps=4, num_stages=1)]


@functools.lru_cache(maxsize=None)
def _tuned_small_m(bm: int, elt: int, a_elt: int, r_pad: int, u_given: bool, smem: int = _HOPPER_SMEM):
    return triton.autotune(configs=_small_m_configs(bm, elt, a_elt, r_pad, u_given, smem),
                           key=["N", "K", "HAS_BIAS", "HAS_DROPOUT", "R_PAD", "DOT_PREC", "U_GIVEN", "BM"],
                           )(_small_m_kernel)


@functools.lru_cache(maxsize=1024)
def _small_m_heuristic(N: int, bm: int, elt: int, a_elt: int, r_pad: int, u_given: bool, sms: int,
                       smem: int = _HOPPER_SMEM) -> dict:
    """BN as large as possible while the grid still covers every SM (the shape is bound by the read of W), then
    the deepest K tile and pipeline that fit in shared memory (bytes in flight per SM decide the read rate)."""
    bn = 64 if _cdiv(N, 64) >= sms else (32 if _cdiv(N, 32) >= sms else 16)
    for bk, stages in ((256, 4), (256, 3), (128, 4), (128, 3), (64, 3), (64, 2), (32, 2), (32, 1)):
        if _small_m_smem(bm, bn, bk, stages, elt, a_elt, r_pad, u_given) <= _max_smem(smem):
            break
    return {"BN": bn, "BK": bk, "num_warps": 4, "num_stages": stages}
