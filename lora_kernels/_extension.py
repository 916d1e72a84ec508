"""The CUDA extension ``lora_kernels._C``: was it built, for which torch and CUDA, and may this process load it.

setup.py records the build in ``lora_kernels/_build_info.py``. An extension compiled for another torch (or CUDA)
may fail to load, or load and misbehave, so it is only imported when the recorded versions equal the running
torch's; otherwise the cuda backend is unavailable with a reason that says what to do, and ``import lora_kernels``
warns (``warn_if_stale``).
"""
from __future__ import annotations

import functools
import glob
import os

import torch

REBUILD = "rebuild it against this torch (in the lora_kernels source folder: pip install .)"


@functools.lru_cache(maxsize=None)
def build_info():
    """The generated _build_info module, or None where lora_kernels was not built by setup.py (a source checkout)."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


def _so_present() -> bool:
    return bool(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.*")))


def problem() -> str | None:
    """Why ``lora_kernels._C`` must not be imported here ('not built (why)', or built for another torch/CUDA), or
    None when it may be."""
    info = build_info()
    if info is None:
        if _so_present():
            return None  # built by an older setup.py that kept no record: the import itself decides
        return ("not built (this lora_kernels was not installed by pip, so nothing was compiled: "
                "pip install . builds it where torch has CUDA and nvcc is found)")
    if not info.CUDA_EXTENSION_BUILT:
        return f"not built ({info.NOT_BUILT_REASON})"
    if info.TORCH_VERSION != torch.__version__ or info.TORCH_CUDA_VERSION != torch.version.cuda:
        return (f"built for torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA_VERSION or 'none'}), but this is torch "
                f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}); {REBUILD}")
    return None


def stale() -> bool:
    """Whether an extension was built, but for another torch or CUDA than the running one."""
    info = build_info()
    return info is not None and bool(info.CUDA_EXTENSION_BUILT) and problem() is not None


def summary() -> str:
    """One line for people: what was built and against what."""
    info = build_info()
    p = problem()
    if p is not None:
        return f"CUDA extension {p}"
    if info is None:
        return "CUDA extension present (built without a build record; its torch version is not checked)"
    return f"CUDA extension built for torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA_VERSION})"
