"""CUDA/C++ backend: cuBLAS for the frozen GEMMs, fused CUDA kernels (csrc/) for the LoRA work around them.

The compiled extension ``lora_kernels._C`` registers ``torch.ops.lora_kernels_cuda.forward/backward``; it only
exists in builds made with a CUDA torch and nvcc (see setup.py). Same contract as every backend (see
``lora_kernels/backends/__init__.py``).
"""
from __future__ import annotations

import os

import torch

from lora_kernels import _extension

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


def is_available() -> tuple[bool, str]:
    """(True, description) when the extension is loaded and a CUDA device is present, else (False, reason)."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if not torch.cuda.is_available():
        return False, "no CUDA device (the extension is built)"
    return True, f"{_extension.summary()}, on {torch.cuda.get_device_name()}"


def _check_seed(p, seed) -> None:
    """The kernels of csrc/ take the dropout seed by value, as a kernel argument. Inside a CUDA graph that value
    would be baked into the graph and every replay would repeat one mask, so dropout under capture is refused
    (with p == 0 the seed is never read and capture is fine)."""
    if p > 0.0 and (isinstance(seed, torch.Tensor) or torch.cuda.is_current_stream_capturing()):
        raise RuntimeError(
            "lora_kernels: the cuda backend cannot run dropout inside a CUDA graph (torch.cuda.graph capture, or "
            "torch.compile with mode='reduce-overhead'): its kernels take the seed by value, so every replay would "
            "reuse one mask. Use backend='triton' or 'torch' (or backend=None, which picks one of them there), or "
            "dropout_p=0.")


def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    _check_seed(p, seed)
    y, u = _OPS[0](
        x, weight, bias, lora_A, lora_B, float(scaling), float(p), int(seed), int(offset)
    )
    return y, u


def backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    _check_seed(p, seed)
    dx, dA, dB = _OPS[1](
        dy, x, weight, lora_A, lora_B, u, float(scaling), float(p), int(seed), int(offset),
        bool(need_dx), bool(need_dA), bool(need_dB),
    )
    return (dx if need_dx else None, dA if need_dA else None, dB if need_dB else None)


def gemm_path(x, weight, bias=None) -> str:
    """Which GEMM a forward (and its p = 0 dx) with these 2-D inputs runs: "sm90" (the Hopper GEMM with the rank-r
    term in its K axis, csrc/gemm_sm90.h) or "cublas: <why not sm90>" (cuBLAS with the rank-r term written first)."""
    return torch.ops.lora_kernels_cuda.gemm_path(x, weight, bias)


def _linear_autograd(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    """y of the op, with its autograd node in C++ (``lora_kernels_cuda::lora_linear``): eager calls that need
    grads skip Python's autograd.Function, forward and backward. Same kernels and math as forward/backward."""
    _check_seed(p, seed)
    return _LINEAR(
        x, weight, bias, lora_A, lora_B, float(scaling), float(p), int(seed), int(offset))


# ops.lora_linear uses this when present; LORA_KERNELS_CPP_AUTOGRAD=0 falls back to the Python autograd.Function.
# An extension built before the op existed (a stale build) has no lora_linear: then the Python path too.
_LINEAR = (torch.ops.lora_kernels_cuda.lora_linear.default
           if _C is not None and hasattr(torch.ops.lora_kernels_cuda, "lora_linear") else None)
linear_autograd = (_linear_autograd if _LINEAR is not None and os.environ.get("LORA_KERNELS_CPP_AUTOGRAD", "1") != "0"
                   else None)
