"""The reference backend: plain PyTorch, float32 accumulation. It defines what every backend computes and is
the fallback on any device (CPU included). See ``lora_kernels/backends/__init__.py`` for the contract."""
from __future__ import annotations

import torch

from ..philox import dropout_mask


def is_available():
    return True, "pure PyTorch, any device"


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: float32, or float64 for float64 inputs (gradcheck)."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _keep(x: torch.Tensor, p: float, seed: int, offset: int):
    """The contract's keep-mask for x, or None without dropout."""
    return None if p == 0.0 else dropout_mask(seed, offset, x.shape, p, device=x.device)


def _dropped(t: torch.Tensor, keep, p: float) -> torch.Tensor:
    """Inverted dropout: t * keep / (1 - p)."""
    return t if keep is None else t * keep / (1.0 - p)


def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    x32 = _acc(x)
    u = scaling * (_dropped(x32, _keep(x, p, seed, offset), p) @ _acc(lora_A).t())  # (M, r)
    y = x32 @ _acc(weight).t() + u @ _acc(lora_B).t()
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype), u


def backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    dy32 = _acc(dy)
    g = dy32 @ _acc(lora_B)  # (M, r)
    keep = _keep(x, p, seed, offset) if (need_dx or need_dA) else None  # generated once for dx and dA
    dx = dA = dB = None
    if need_dx:
        lora_dx = _dropped(scaling * (g @ _acc(lora_A)), keep, p)
        dx = (dy32 @ _acc(weight) + lora_dx).to(x.dtype)
    if need_dA:
        dA = (scaling * (g.t() @ _dropped(_acc(x), keep, p))).to(lora_A.dtype)
    if need_dB:
        dB = (dy32.t() @ u).to(lora_B.dtype)
    return dx, dA, dB
