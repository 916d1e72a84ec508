"""CUDA/C++ backend: cuBLAS for the frozen GEMMs, fused CUDA kernels (csrc/) for the LoRA work around them.

The compiled extension ``lora_kernels._C`` registers ``torch.ops.lora_kernels_cuda.forward/backward``; it only
exists in builds made with a CUDA torch and nvcc (see setup.py). Same contract as every backend (see
``lora_kernels/backends/__init__.py``).
"""
from __future__ import annotations

import torch

from lora_kernels import _config, _extension

# An extension that was not built, or was built for another torch or CUDA, is not imported (see _extension).
_C = None
_IMPORT_ERROR: str | None = _extension.problem()
if _IMPORT_ERROR is None:
    try:
        from lora_kernels import _C  # noqa: F401  (importing registers the ops)
    except Exception as e:  # ImportError, or an OSError from a library mismatch
        _IMPORT_ERROR = f"built, but importing lora_kernels._C failed ({type(e).__name__}: {e}); {_extension.REBUILD}"


# The ops' overloads, looked up once: calling an OpOverload skips the packet's overload resolution on every call.
_OPS = (torch.ops.lora_kernels_cuda.forward.default, torch.ops.lora_kernels_cuda.backward.default) if _C is not None else None
# An extension compiled from older sources than this Python code (its ops take no device seed) is not used.
if _OPS is not None and "seed_t" not in [a.name for a in _OPS[0]._schema.arguments]:
    _IMPORT_ERROR, _OPS = f"built from older sources (its ops take no device seed); {_extension.REBUILD}", None


def is_available() -> tuple[bool, str]:
    """(True, description) when the extension is loaded and a CUDA device is present, else (False, reason)."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if not torch.cuda.is_available():
        return False, "no CUDA device (the extension is built)"
    return True, f"{_extension.summary()}, on {torch.cuda.get_device_name()}"


def _seed_args(p, seed):
    """(seed int, seed tensor or None) as the ops take them. A device seed (a 0-d int64 tensor on x's device: CUDA graph
    capture and torch.compile, see lora_kernels/ops.py) goes to the kernels as a pointer that they read when they run,
    so every replay of a graph uses the value its replay drew. An int seed is a kernel argument: under capture it
    would be baked into the graph and every replay would repeat one mask, so dropout with an int seed under capture
    is refused (with p == 0 the seed is never read and capture is fine)."""
    if isinstance(seed, torch.Tensor):
        return 0, (seed if p > 0.0 else None)
    if p > 0.0 and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "lora_kernels: the cuda backend got a dropout seed by value inside a CUDA graph capture: every replay "
            "would reuse one mask. Pass the seed as a 0-d int64 tensor on the device (lora_kernels.lora_linear does "
            "so under capture and torch.compile).")
    return int(seed), None


def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    seed_i, seed_t = _seed_args(p, seed)
    return _OPS[0](x, weight, bias, lora_A, lora_B, float(scaling), float(p), seed_i, int(offset), seed_t)


def _forward_scaled(x, weight, bias, lora_A, lora_B, col_scale, scaling, p, seed, offset):
    """(y, u) of forward with a per-column scale c (N,) float32: y = c ⊙ (x Wᵀ + s·u Bᵀ) + bias (DoRA's column
    scale; the fused sm_90 forward applies it with the bias in its epilogue, the other paths in one pass over y)."""
    seed_i, seed_t = _seed_args(p, seed)
    return _FORWARD_SCALED(x, weight, bias, lora_A, lora_B, col_scale, float(scaling), float(p), seed_i, int(offset),
                           seed_t)


# An extension built before forward_scaled existed has none: DoRA then scales y in a pass of its own.
_FORWARD_SCALED = (torch.ops.lora_kernels_cuda.forward_scaled.default
                   if _OPS is not None and hasattr(torch.ops.lora_kernels_cuda, "forward_scaled") else None)
forward_scaled = _forward_scaled if _FORWARD_SCALED is not None else None


def backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    seed_i, seed_t = _seed_args(p, seed)
    dx, dA, dB = _OPS[1](
        dy, x, weight, lora_A, lora_B, u, float(scaling), float(p), seed_i, int(offset),
        bool(need_dx), bool(need_dA), bool(need_dB), seed_t,
    )
    return (dx if need_dx else None, dA if need_dA else None, dB if need_dB else None)


def _backward_dx_from(dy, x, weight, lora_A, lora_B, u, dx_from, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    """backward with dx's frozen product taken from ``dx_from`` (M, N) instead of dy: dx = dx_from W + s·(dy B) A,
    dA and dB from dy (DoRA at p = 0: dx_from = g ⊙ dy, B = g ⊙ B: every grad in one call, one pass over dy)."""
    seed_i, seed_t = _seed_args(p, seed)
    dx, dA, dB = _BACKWARD_DX_FROM(
        dy, x, weight, lora_A, lora_B, u, dx_from, float(scaling), float(p), seed_i, int(offset),
        bool(need_dx), bool(need_dA), bool(need_dB), seed_t,
    )
    return (dx if need_dx else None, dA if need_dA else None, dB if need_dB else None)


_BACKWARD_DX_FROM = (torch.ops.lora_kernels_cuda.backward_dx_from.default
                     if _OPS is not None and hasattr(torch.ops.lora_kernels_cuda, "backward_dx_from") else None)
backward_dx_from = _backward_dx_from if _BACKWARD_DX_FROM is not None else None


def gemm_path(x, weight, bias=None) -> str:
    """Which GEMM a forward (and its p = 0 dx) with these 2-D inputs runs: "sm90" (the Hopper GEMM with the rank-r
    term in its K axis, csrc/gemm_sm90.h) or "cublas: <why not sm90>" (cuBLAS with the rank-r term written first)."""
    return torch.ops.lora_kernels_cuda.gemm_path(x, weight, bias)


def dx_path(x, weight, lora_A, lora_B, p=0.0) -> str:
    """Which GEMM dx of a backward with these 2-D inputs runs: "small_m sm90" (M <= 64 on Hopper, p = 0: the small-M
    kernel transposed makes dx and s·g in one launch, and one more launch makes dA and dB), "sm90" (the rank-r term
    in the GEMM's K axis), "sm90 + dA" (and dA's product inside the same GEMM, set_dA_in_gemm),
    "sm90 masked" (with dropout: the term's K-tiles first, masked by the keep bits inside the GEMM, then dy W) or
    "cublas: <why not sm90>" (the dx kernel writes the masked term, cuBLAS accumulates dy W into it)."""
    return torch.ops.lora_kernels_cuda.dx_path(x, weight, lora_A, lora_B, float(p))


def dy_path(dy, lora_B) -> str:
    """Which kernel the backward's dy pass (g = dy B and dB = dyᵀ u in one read of dy) runs for a 2-D dy (M, N):
    "sm90" (wgmma, csrc/dy_pass_sm90.cu) or "mma.sync: <why not sm90>" (csrc/dy_pass.cu)."""
    return torch.ops.lora_kernels_cuda.dy_path(dy, lora_B)


def shrink_path(x, lora_A, p=0.0) -> str:
    """Which kernel a forward's shrink (u = s/(1-p) · (keep ⊙ x) Aᵀ, one read of x) runs for a 2-D x (M, K) where the
    forward is neither the small-M nor the fused one: "dropout" (p > 0: the mask made in the pass, no keep bits,
    csrc/shrink_drop.cu), else "sm90" (wgmma, csrc/shrink_sm90.cu) or "mma.sync: <why not sm90>" (csrc/shrink.cu)."""
    return torch.ops.lora_kernels_cuda.shrink_path(x, lora_A, float(p))


def dA_path(x, lora_A, p=0.0) -> str:
    """Which kernel the backward's dA pass (dA = s/(1-p) · gᵀ (keep ⊙ x), one read of x) runs for a 2-D x (M, K):
    "sm90" (wgmma, csrc/dA_sm90.cu) or "mma.sync: <why not sm90>" (csrc/dA.cu)."""
    return torch.ops.lora_kernels_cuda.dA_path(x, lora_A, float(p))


def dA_beside_blocks(x, weight, lora_A, lora_B, p=0.0) -> int:
    """The SMs the backward's dA pass takes beside the dx GEMM for these 2-D inputs (csrc/dA_sm90.cu: the GEMM's
    grid leaves them free and dA streams x there while the GEMM runs); 0 where dA runs after the GEMM."""
    return int(torch.ops.lora_kernels_cuda.dA_beside_blocks(x, weight, lora_A, lora_B, float(p)))


def dA_gemm_splits(x, weight, lora_A, lora_B, p=0.0) -> int:
    """The token ranges of the backward's dA GEMM for these 2-D inputs (csrc/dA_gemm_sm90.cu: dA = (s·g)ᵀ x on
    CUTLASS's TMA + WGMMA kernel after the dx GEMM, each range's fp32 partial summed by a reduce; p = 0, r a multiple
    of 8, adapters in x's dtype or fp32 ones on bf16 x as three bf16 pieces of s·g); 0 where dA runs otherwise (the
    dA pass, beside the dx GEMM or after it, or inside the dx GEMM)."""
    return int(torch.ops.lora_kernels_cuda.dA_gemm_splits(x, weight, lora_A, lora_B, float(p)))


def set_dA_gemm(mode: int) -> int:
    """Sets the dA GEMM (dA_gemm_splits) for this process: -1 (the default) or 1, wherever it can run: s·g's
    columns (r, or 3r with fp32 adapters) up to 192; 0 never (the dA pass). LORA_KERNELS_DA_GEMM=0 or 1 starts the
    process there. Returns the previous mode. For tests and A/B timing."""
    return int(torch.ops.lora_kernels_cuda.set_dA_gemm(int(mode)))


def set_fused_split(mode: int) -> int:
    """Sets the fused forward's split variant for this process (csrc/fused_fwd_sm90.h): clusters of two 128 x 256
    tiles that share u's K-tiles through distributed shared memory, in place of lead tiles. -1 the default (16-bit
    adapters read as they are, p = 0, the wide tile, N <= 1024), 0 never, 1 wherever it can run
    (LORA_KERNELS_FUSED_SPLIT=0 or 1 starts the process there). Returns the previous mode. For tests and A/B timing."""
    return int(torch.ops.lora_kernels_cuda.set_fused_split(int(mode)))


def set_dA_beside(mode: int) -> int:
    """Sets dA beside the dx GEMM for this process: -1 the cost model's choice (the default), 0 never, n > 0 n SMs
    wherever the sm_90 dx GEMM and dA run (LORA_KERNELS_DA_BESIDE starts the process so). Returns the previous
    setting. For tests of both orders and A/B timing."""
    return int(torch.ops.lora_kernels_cuda.set_dA_beside(int(mode)))


def set_dA_in_gemm(mode: int) -> int:
    """Sets dA inside the dx GEMM for this process (csrc/gemm_sm90.h, da_x: x read by the GEMM, row-block partials
    summed by a reduce, in place of the dA pass): -1 (the default) and 0 never, 1 wherever it can run (adapters in
    x's dtype, r <= 64, with or without dropout; LORA_KERNELS_DA_IN_GEMM=1 starts the process there). Opt-in: it
    measured slower than the dA pass (session 60). Returns the previous mode. For tests and A/B timing."""
    return int(torch.ops.lora_kernels_cuda.set_dA_in_gemm(int(mode)))


def forward_path(x, weight, bias, lora_A, lora_B, p=0.0) -> str:
    """Which path a forward with these 2-D inputs takes: "small_m" (M <= 64: the whole forward in one launch,
    csrc/small_m.cu; "small_m sm90" where that launch is the Hopper wgmma kernel, csrc/small_m_sm90.cu), "sm90 fused lead (small_m: <why not>)" or "sm90 fused (...)" (the shrink inside the GEMM,
    computed by lead tiles or by u tiles, csrc/fused_fwd_sm90.h), or
    gemm_path's answer followed by " (fused: <why not>) (small_m: <why not>)"."""
    return torch.ops.lora_kernels_cuda.forward_path(x, weight, bias, lora_A, lora_B, float(p))


def set_small_m(enabled: bool) -> bool:
    """Switches the small-M forward on or off for this process (LORA_KERNELS_SMALL_M=0 starts it off); returns the
    previous setting. For tests of the other paths at small M and A/B timing."""
    return torch.ops.lora_kernels_cuda.set_small_m(bool(enabled))


def set_small_m_sm90(enabled: bool) -> bool:
    """Switches the small-M forward's Hopper kernel (csrc/small_m_sm90.cu) on or off for this process
    (LORA_KERNELS_SMALL_M_SM90=0 starts it off); off, the small-M forward runs its mma.sync kernels. Returns the
    previous setting. For tests of both kernels and A/B timing."""
    return torch.ops.lora_kernels_cuda.set_small_m_sm90(bool(enabled))


def set_small_m_sm90_dx(enabled: bool) -> bool:
    """Switches the small-M backward's Hopper dx kernel (csrc/small_m_sm90.cu, transposed, then dA and dB in
    csrc/small_m_grads.cu) on or off for this process (LORA_KERNELS_SMALL_M_SM90_DX=0 starts it off); off, a small-M
    backward runs the dy pass, dx and dA kernels with cuBLAS. Returns the previous setting. For tests of both paths
    and A/B timing."""
    return torch.ops.lora_kernels_cuda.set_small_m_sm90_dx(bool(enabled))


def set_shrink_drop(mode: int) -> int:
    """Sets the mode of the forward's shrink with dropout that makes its mask itself, in one pass over x
    (csrc/shrink_drop.cu) for this process: -1 the default (where it measured faster than the keep-bits pass plus
    the shrink that reads them), 0 off, 1 wherever it runs; LORA_KERNELS_SHRINK_DROP=0 or 1 starts the process there.
    Returns the previous mode. For tests of the paths and A/B timing."""
    return int(torch.ops.lora_kernels_cuda.set_shrink_drop(int(mode)))


def set_shrink_drop_ring(stages: int) -> int:
    """Sets how that shrink loads x for this process: -1 the default (a ring of 2 steps above r = 16 with 16-bit
    adapters, else plain loads: csrc/plans.cuh, sd_ring), 0 plain loads (one 32-column step in flight per warp), 2 or
    4 a cp.async ring of that many steps per warp (LORA_KERNELS_SHRINK_DROP_RING starts the process there). Returns
    the previous setting. For tests of both forms and A/B timing."""
    return int(torch.ops.lora_kernels_cuda.set_shrink_drop_ring(int(stages)))


def set_fused_forward(mode: int) -> int:
    """Sets the fused sm_90 forward's mode for this process (csrc/fused_fwd_sm90.h): -1 the default (p = 0 only; u
    computed by each row block's first output tiles, the lead tiles, or by u tiles where the lead tiles do not fit the
    output's tile columns), 1 u tiles only (with dropout they mask their copy of x from the keep bits),
    2 lead tiles only (with dropout: fp32 adapters on bf16 x, masking x's copy in registers), 0 off (the shrink +
    GEMM path); LORA_KERNELS_FUSED_FWD=1, 2 or 0 starts the process in that mode. Returns the previous mode. For
    tests of the paths and A/B timing."""
    return int(torch.ops.lora_kernels_cuda.set_fused_forward(int(mode)))


def _linear_autograd(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    """y of the op, with its autograd node in C++ (``lora_kernels_cuda::lora_linear``): eager calls that need
    grads skip Python's autograd.Function, forward and backward. Same kernels and math as forward/backward."""
    seed_i, seed_t = _seed_args(p, seed)
    return _LINEAR(x, weight, bias, lora_A, lora_B, float(scaling), float(p), seed_i, int(offset), seed_t)


# ops.lora_linear uses this when present; LORA_KERNELS_CPP_AUTOGRAD=0 falls back to the Python autograd.Function.
# An extension built before the op existed (a stale build) has no lora_linear: then the Python path too.
_LINEAR = (torch.ops.lora_kernels_cuda.lora_linear.default
           if _OPS is not None and hasattr(torch.ops.lora_kernels_cuda, "lora_linear") else None)
linear_autograd = (_linear_autograd if _LINEAR is not None and _config.CPP_AUTOGRAD
                   else None)

# lora_linear's whole eager call in C++ (``lora_kernels_cuda::linear_entry``, csrc/lora_autograd.h): the checks, the
# seed, the reshapes and the autograd routing of ops.lora_linear without Python, for the calls it takes; it returns
# None for the others, which ops.lora_linear then runs itself. Off with LORA_KERNELS_CPP_AUTOGRAD=0, like the node.
linear_entry = (torch.ops.lora_kernels_cuda.linear_entry.default
                if linear_autograd is not None and hasattr(torch.ops.lora_kernels_cuda, "linear_entry") else None)

# dora_linear's whole eager call in C++ (``lora_kernels_cuda::dora_entry``, csrc/dora_autograd.h): the norm, the
# forward (with dropout: by row chunks, as lora_kernels/dora.py), and an autograd node whose backward runs no Python;
# None for the calls it declines, which lora_kernels/dora.py then runs itself. Off with LORA_KERNELS_CPP_AUTOGRAD=0.
dora_entry = (torch.ops.lora_kernels_cuda.dora_entry.default
              if linear_autograd is not None and hasattr(torch.ops.lora_kernels_cuda, "dora_entry") else None)


def clear_dora_cache() -> None:
    """Forget the C++ entry's cached ‖W_n‖² (lora_kernels.dora.clear_weight_norm_cache calls it)."""
    if _OPS is not None and hasattr(torch.ops.lora_kernels_cuda, "dora_clear_cache"):
        torch.ops.lora_kernels_cuda.dora_clear_cache()
