"""The dropout mask of the contract: Philox 4x32-10 (the generator behind Triton's ``tl.philox``), 16 bits per element.

Element (m, k) of an (M, K) input uses counter ``c = offset + m * ceil(K/8) + k // 8`` (c0 = low 32 bits,
c1 = high 32 bits, c2 = c3 = 0), key = (seed low 32 bits, seed high 32 bits), output word ``(k % 8) // 2``, and of
that word the low 16 bits for even k, the high 16 bits for odd k. The element is kept iff those 16 bits, as an
integer h in [0, 65536), satisfy ``h >= ceil(p * 65536)`` with p rounded to float32 first; equivalently
``h / 65536 >= p`` in float32, where both sides are exact. The keep probability is therefore
``1 - ceil(65536 p) / 65536``, within 1/65536 of ``1 - p`` (p = 0.1 keeps 0.899994 instead of 0.9).

One Philox call serves eight neighbouring elements of a row: a Philox call costs about 100 integer instructions,
which made the mask the largest part of a masked pass when a call served only four elements (31-bit uniforms). A
row's counters do not depend on how a kernel tiles it. This module is the reference; every backend must reproduce
it bit for bit.
"""
from __future__ import annotations

import functools
import math
import struct

import torch

_M32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
N_ROUNDS = 10
ELEMS_PER_CALL = 8  # 4 words x 2 halves


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) & 0xFFFFFFFF for a 32-bit constant a and uint32 values b held in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part = a_hi * b  # < 2**48
    lo_part = a_lo * b  # < 2**48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _M32
    return hi, lo


def philox4x32(seed, c0: torch.Tensor, c1: torch.Tensor) -> list[torch.Tensor]:
    """Philox 4x32-10 on counters (c0, c1, 0, 0) with a 64-bit key; uint32 words held in int64 tensors.

    ``seed`` is a Python int or a 0-d int64 tensor (the same 64 bits give the same words). The tensor form keeps the
    key on its device: no host read, so it can run inside a CUDA graph whose replays refill the seed tensor."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=c0.device, dtype=torch.int64)  # & and >> on int64 give the two's-complement words
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _M32, (k1 + KEY_B) & _M32
    return [c0, c1, c2, c3]


@functools.lru_cache(maxsize=64)
def keep_threshold(p: float) -> int:
    """ceil(p * 65536) with p rounded to float32 first: an element is kept iff its 16 bits are >= this."""
    p32 = struct.unpack("f", struct.pack("f", float(p)))[0]
    return int(math.ceil(p32 * 65536.0))  # exact: p32 * 2**16 is a float64 without rounding


def calls_per_row(K: int) -> int:
    """Philox counters one row of K elements uses (the row stride of the counter): ceil(K / 8)."""
    return (K + ELEMS_PER_CALL - 1) // ELEMS_PER_CALL


def dropout_bits(seed, offset: int, shape: tuple[int, int], device=None) -> torch.Tensor:
    """The 16-bit random values (int64 tensor, in [0, 65536)) of the contract for an (M, K) input. ``seed``: an int,
    or a 0-d int64 tensor (read on its device; ``device`` defaults to the seed's)."""
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
    else:
        seed = int(seed)
    M, K = shape
    K8 = calls_per_row(K)
    rows = torch.arange(M, dtype=torch.int64, device=device).unsqueeze(1)
    cols = torch.arange(K8, dtype=torch.int64, device=device).unsqueeze(0)
    counter = offset + rows * K8 + cols  # (M, K8)
    words = philox4x32(seed, counter & _M32, (counter >> 32) & _M32)
    halves = [h for w in words for h in (w & 0xFFFF, w >> 16)]  # element 2 * word + half
    return torch.stack(halves, dim=-1).reshape(M, K8 * ELEMS_PER_CALL)[:, :K]


def dropout_mask(seed, offset: int, shape, p: float, device=None) -> torch.Tensor:
    """The keep-mask (bool, shape (M, K)) every backend uses for this (seed, offset) and drop probability p.

    ``shape`` may be (..., K): the leading dims are flattened to M, as the op flattens its input, and the mask
    comes back in the given shape. ``seed`` is an int or a 0-d int64 tensor holding the same 64 bits (a device
    tensor is read on the device, without a host sync; the mask is then on that device unless ``device`` says).
    """
    if isinstance(seed, torch.Tensor) and device is None:
        device = seed.device
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
    return (dropout_bits(seed, offset, (M, K), device=device) >= keep_threshold(p)).reshape(shape)
