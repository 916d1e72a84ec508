"""The dropout mask of the contract: Philox 4x32-10, the generator behind Triton's ``tl.rand``.

Element (m, k) of an (M, K) input uses counter ``c = offset + m * ceil(K/4) + k // 4`` (c0 = low 32 bits,
c1 = high 32 bits, c2 = c3 = 0), key = (seed low 32 bits, seed high 32 bits), and output word ``k % 4``.
The word becomes a uniform float as ``tl.rand`` does it (bitcast to int32, negative x -> ~x, times
4.6566127342e-10 in float32), and the element is kept iff that uniform >= p (p as float32).

One Philox call serves four neighbouring elements of a row, so a kernel pays a quarter of a call per element,
and a row's counters do not depend on how a kernel tiles it. This module is the reference; every backend must
reproduce it bit for bit.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
N_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) & 0xFFFFFFFF for a 32-bit constant a and uint32 values b held in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part = a_hi * b  # < 2**48
    lo_part = a_lo * b  # < 2**48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _M32
    return hi, lo


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor) -> list[torch.Tensor]:
    """Philox 4x32-10 on counters (c0, c1, 0, 0) with a 64-bit key; uint32 words held in int64 tensors."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _M32, (k1 + KEY_B) & _M32
    return [c0, c1, c2, c3]


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64 tensor) -> float32 uniforms in [0, 1), exactly as ``tl.rand``."""
    x = torch.where(words >= 2**31, words - 2**32, words)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def dropout_uniforms(seed: int, offset: int, shape: tuple[int, int], device=None) -> torch.Tensor:
    """The float32 uniforms of the contract for an (M, K) input."""
    M, K = shape
    K4 = (K + 3) // 4
    rows = torch.arange(M, dtype=torch.int64, device=device).unsqueeze(1)
    cols = torch.arange(K4, dtype=torch.int64, device=device).unsqueeze(0)
    counter = offset + rows * K4 + cols  # (M, K4)
    words = philox4x32(int(seed), counter & _M32, (counter >> 32) & _M32)
    u = torch.stack([uniform_from_words(w) for w in words], dim=-1)  # (M, K4, 4)
    return u.reshape(M, K4 * 4)[:, :K]


def dropout_mask(seed: int, offset: int, shape, p: float, device=None) -> torch.Tensor:
    """The keep-mask (bool, shape (M, K)) every backend uses for this (seed, offset) and drop probability p.

    ``shape`` may be (..., K): the leading dims are flattened to M, as the op flattens its input, and the mask
    comes back in the given shape.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("dropout_mask: shape must have at least one dim (..., K)")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_mask: p must be in [0, 1), got {p}")
    K = shape[-1]
    M = 1
    for s in shape[:-1]:
        M *= s
    if p == 0.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    u = dropout_uniforms(seed, offset, (M, K), device=device)
    return (u >= torch.tensor(p, dtype=torch.float32)).reshape(shape)
