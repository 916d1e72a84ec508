"""The reference backend: plain PyTorch, float32 accumulation. It defines what every backend computes and is
the fallback on any device (CPU included). See ``lora_kernels/backends/__init__.py`` for the contract."""
from __future__ import annotations

import torch

from ..philox import dropout_mask


def is_available():
    return True, "pure PyTorch, any device"


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of a call: float32, or float64 for a float64 x (adapters may be float32 then)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _keep(x: torch.Tensor, p: float, seed: int, offset: int):
    """The contract's keep-mask for x, or None without dropout (on 'meta' only its shape: no values to compute)."""
    if p == 0.0:
        return None
    if x.device.type == "meta":
        return torch.empty(x.shape, dtype=torch.bool, device="meta")
    return dropout_mask(seed, offset, x.shape, p, device=x.device)


def _dropped(t: torch.Tensor, keep, p: float) -> torch.Tensor:
    """Inverted dropout: t * keep / (1 - p)."""
    return t if keep is None else t * keep / (1.0 - p)


def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    acc = _acc_dtype(x)
    x32 = x.to(acc)
    u = scaling * (_dropped(x32, _keep(x, p, seed, offset), p) @ lora_A.to(acc).t())  # (M, r)
    y = x32 @ weight.to(acc).t() + u @ lora_B.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), u


def backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    acc = _acc_dtype(x)
    dy32 = dy.to(acc)
    g = dy32 @ lora_B.to(acc)  # (M, r)
    keep = _keep(x, p, seed, offset) if (need_dx or need_dA) else None  # generated once for dx and dA
    dx = dA = dB = None
    if need_dx:
        lora_dx = _dropped(scaling * (g @ lora_A.to(acc)), keep, p)
        dx = (dy32 @ weight.to(acc) + lora_dx).to(x.dtype)
    if need_dA:
        dA = (scaling * (g.t() @ _dropped(x.to(acc), keep, p))).to(lora_A.dtype)
    if need_dB:
        dB = (dy32.t() @ u.to(acc)).to(lora_B.dtype)
    return dx, dA, dB
