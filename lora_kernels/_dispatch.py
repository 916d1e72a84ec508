"""Backend selection: the one place that decides which backend runs a call."""
from __future__ import annotations

import functools
import importlib
import warnings

from . import _config

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {
    "torch": "lora_kernels.backends.torch_ref",
    "triton": "lora_kernels.backends.triton",
    "cuda": "lora_kernels.backends.cuda_backend",
}
# Order tried by backend=None/"auto" for CUDA tensors (fastest first); CPU tensors always get "torch".
# cuda before triton: the same kernel time at M >= 2048, but far less host time per call (a C++ binding and autograd
# node, no Triton launch path), which decides training steps. Triton stays the default where the extension is not
# built.
AUTO_ORDER_CUDA = ("cuda", "triton", "torch")
# Backends whose kernels can read the dropout seed from device memory (a 0-d int64 tensor), which CUDA graphs need
# (see lora_kernels/ops.py): all of them (the cuda backend's kernels take a seed pointer, csrc/lora_kernels.cuh).
# Under graph capture or torch.compile with dropout, backend=None picks the first of AUTO_ORDER_CUDA among these.
DEVICE_SEED_BACKENDS = ("torch", "triton", "cuda")


@functools.cache
def _load(name: str):
    """(module or None, reason) for a backend; never raises."""
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # an optional backend may fail to import (no triton, no extension)
        return None, f"import failed: {type(e).__name__}: {e}"
    try:
        ok, reason = mod.is_available()
    except Exception as e:
        return None, f"availability check failed: {type(e).__name__}: {e}"
    return (mod if ok else None), reason


def backend_status() -> dict[str, str]:
    """Every backend with 'ok: ...' or the reason it is unavailable here."""
    out = {}
    for name in BACKENDS:
        mod, reason = _load(name)
        out[name] = ("ok: " if mod is not None else "unavailable: ") + reason
    return out


def available_backends() -> list[str]:
    """The backends that can run on this machine."""
    return [name for name in BACKENDS if _load(name)[0] is not None]


def _check_device(name: str, device_type: str) -> None:
    if name == "torch":
        return
    if device_type == "cuda":
        return
    if name == "triton" and _config.TRITON_INTERPRET and device_type == "cpu":
        return  # Triton's interpreter runs kernels on CPU tensors
    raise RuntimeError(
        f"lora_kernels: backend '{name}' needs CUDA tensors, but x is on '{device_type}' "
        f"(use backend='torch' or None for CPU tensors)"
    )


def _warn_no_cuda_backend(chosen: str) -> None:
    """Auto picked another backend for CUDA tensors because the extension is missing or stale: say so (once per
    process, as _resolve_name() is cached), unless the build skipped it on request."""
    reason = _load("cuda")[1]
    if "LORA_KERNELS_SKIP_CUDA_BUILD=1" not in reason:
        warnings.warn(f"lora_kernels: the cuda backend is unavailable ({reason}); CUDA tensors run on the "
                      f"{chosen} backend", RuntimeWarning, stacklevel=5)


def check_name(requested) -> None:
    """Raises ValueError unless ``requested`` names a backend (or is None / 'auto'): for the places that take a
    backend before any call runs (LoRALinear, patch_peft), so that a typo fails there and not at the first forward."""
    if requested not in (None, "auto") and requested not in BACKENDS:
        raise ValueError(f"lora_kernels: unknown backend {requested!r}; choose from {BACKENDS}, None or 'auto'")


def resolve(requested, device_type: str, float64: bool = False, device_seed: bool = False) -> str:
    """Name of the backend that runs a call with `requested` (None/'auto'/name) on a `device_type` tensor.
    `device_seed`: the call's dropout seed lives on the device (CUDA graph capture, torch.compile); auto then picks
    only among DEVICE_SEED_BACKENDS. None and 'auto' take LORA_KERNELS_BACKEND when it is set, read on every call
    (lora_kernels/_config.py)."""
    if requested in (None, "auto"):
        requested = _config.backend() or "auto"
    return _resolve_name(requested, device_type, float64, device_seed)


@functools.lru_cache(maxsize=64)
def _resolve_name(requested, device_type: str, float64: bool, device_seed: bool) -> str:
    """resolve() once the environment is read: a pure function of its arguments and of which backends load."""
    if requested == "auto":
        if device_type != "cuda" or float64:
            return "torch"
        for name in AUTO_ORDER_CUDA:
            if (not device_seed or name in DEVICE_SEED_BACKENDS) and _load(name)[0] is not None:
                if name != "cuda" and not device_seed:
                    _warn_no_cuda_backend(name)
                return name
        return "torch"
    check_name(requested)
    mod, reason = _load(requested)
    if mod is None:
        raise RuntimeError(f"lora_kernels: backend '{requested}' is not available here: {reason}")
    _check_device(requested, device_type)
    if float64 and requested != "torch":
        raise RuntimeError(f"lora_kernels: backend '{requested}' does not support float64; use backend='torch'")
    return requested


def eager_entry(requested, op="linear_entry"):
    """The C++ entry that runs a whole eager call of ``op`` (``linear_entry``: lora_linear, csrc/lora_autograd.h;
    ``dora_entry``: dora_linear, csrc/dora_autograd.h) on the backend that calls with ``requested``
    (None/'auto'/name) on CUDA tensors run on, where that backend has one (the cuda backend), else None. The entry
    itself declines the calls it does not take (CPU tensors among them)."""
    if requested in (None, "auto"):
        requested = _config.backend() or "auto"
    mod = _entry_backend(requested)
    return None if mod is None else getattr(mod, op, None)  # read per call: tests switch it off


def call_entry(requested, op, *args):
    """A whole eager call through ``eager_entry(requested, op)``: its output, or None where there is no entry, the
    entry declines the call, or an argument is of another kind than the op's schema (TypeError, or the dispatcher's
    "Expected a value of type" RuntimeError): the Python path's checks then name the argument."""
    entry = eager_entry(requested, op)
    if entry is None:
        return None
    try:
        return entry(*args)
    except (TypeError, OverflowError):  # OverflowError: an int scaling past float's range
        return None
    except RuntimeError as e:
        if "Expected a value of type" in str(e):
            return None
        raise


@functools.lru_cache(maxsize=8)
def _entry_backend(requested):
    if requested not in ("auto", "cuda"):  # auto: cuda comes first in AUTO_ORDER_CUDA
        return None
    mod = _load("cuda")[0]
    return mod if getattr(mod, "linear_entry", None) is not None else None


def get(name: str):
    """The backend module for a resolved name."""
    return _load(name)[0]
