"""The forward's shrink with dropout that makes its mask itself (csrc/shrink_drop.cu: one pass over x, no keep-bits
pass). GPU-only (skips elsewhere): where it runs and why not; y and the saved u against float64 with the contract's
mask (assert_cuda_forward: the tolerance rule, and a repeat gives the same bits), with the kernel on and off, on
shapes that exercise its edges: rows past a block's 16 or 32, K not a multiple of its 32-column steps, K splits, r
not a multiple of 8 and every n8-tile count up to r = 64, the three dtype pairs it takes; 64-bit seeds and offsets;
a device seed gives the bits of the same seed by value; the default takes r <= 32 (r <= 16 with fp32 adapters);
both row-block sizes (LORA_KERNELS_SHRINK_DROP_ROWS, in a subprocess); x through the cp.async ring
(set_shrink_drop_ring) gives the bits of plain loads."""
import os
import subprocess
import sys

import pytest
import torch

import lora_kernels

from conftest import HAS_CUDA, assert_cuda_forward

pytestmark = [
    pytest.mark.usefixtures("poisoned_outputs"),
    pytest.mark.skipif(not HAS_CUDA or "cuda" not in lora_kernels.available_backends(),
                       reason="needs the cuda backend on a GPU"),
    pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0),
                       reason="the kernel runs on mma.sync (sm_80+)"),
]

SEED, OFFSET = 2 ** 40 + 12345, 3 * 2 ** 32 + 17  # both words of the key and of the counter in play


@pytest.fixture
def cb():
    """The cuda backend with the small-M forward off (so that M <= 64 reaches the shrink too)."""
    from lora_kernels.backends import cuda_backend

    was = cuda_backend.set_small_m(False)
    try:
        yield cuda_backend
    finally:
        cuda_backend.set_small_m(was)


def _inputs(M, K, N, r, dtype, adapter_dtype):
    x = torch.randn(M, K, device="cuda").to(dtype)
    W = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    A = (torch.randn(r, K, device="cuda") / K ** 0.5).to(adapter_dtype)
    B = torch.randn(N, r, device="cuda").to(adapter_dtype)
    return x, W, b, A, B


SHAPES = [(1, 8, 16, 1), (17, 40, 24, 3), (65, 1000, 72, 5), (300, 72, 136, 16), (777, 264, 1000, 48),
          (2049, 1056, 520, 64), (130, 4104, 264, 33), (513, 8200, 256, 9), (4096, 4096, 256, 16),
          (1000, 2056, 264, 24)]
DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES, ids=["bf16-fp32", "bf16-bf16", "fp16-fp16"])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.6])
def test_forward_with_dropout_against_float64(cb, M, K, N, r, dtype, adapter_dtype, p):
    x, W, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype)
    was = cb.set_shrink_drop(1)  # wherever it runs (the default takes r <= 32, r <= 16 with fp32 adapters)
    try:
        assert cb.shrink_path(x, A, p) == "dropout"
        assert_cuda_forward(cb, x, W, b, A, B, 0.75, p, SEED, OFFSET)
        cb.set_shrink_drop(0)  # the keep bits and the shrink that reads them: the same contract
        assert cb.shrink_path(x, A, p) != "dropout"
        assert_cuda_forward(cb, x, W, b, A, B, 0.75, p, SEED, OFFSET)
    finally:
        cb.set_shrink_drop(was)


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES, ids=["bf16-fp32", "bf16-bf16", "fp16-fp16"])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("ring", [2, 4])
def test_ring_loads_give_the_same_bits(cb, M, K, N, r, dtype, adapter_dtype, ring):
    # x through the cp.async ring (steps ahead of the MMAs) against plain loads: the same sums in the same order, so
    # the same bits, and the contract against float64
    x, W, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype)
    was, was_ring = cb.set_shrink_drop(1), cb.set_shrink_drop_ring(0)
    try:
        assert cb.shrink_path(x, A, 0.1) == "dropout"
        y0, u0 = cb.forward(x, W, b, A, B, 0.75, 0.1, SEED, OFFSET)
        cb.set_shrink_drop_ring(ring)
        y1, u1 = cb.forward(x, W, b, A, B, 0.75, 0.1, SEED, OFFSET)
        assert torch.equal(u0, u1) and torch.equal(y0, y1)
        assert_cuda_forward(cb, x, W, b, A, B, 0.75, 0.1, SEED, OFFSET)
    finally:
        cb.set_shrink_drop(was)
        cb.set_shrink_drop_ring(was_ring)


def test_device_seed_gives_the_seed_by_value(cb):
    x, W, b, A, B = _inputs(1000, 2056, 264, 16, torch.bfloat16, torch.float32)
    y, u = cb.forward(x, W, b, A, B, 0.5, 0.3, SEED, OFFSET)
    seed_t = torch.tensor(SEED, dtype=torch.int64, device="cuda")
    y2, u2 = cb.forward(x, W, b, A, B, 0.5, 0.3, seed_t, OFFSET)
    assert torch.equal(y, y2) and torch.equal(u, u2)
    y3, u3 = cb.forward(x, W, b, A, B, 0.5, 0.3, SEED + 1, OFFSET)  # another seed: another mask
    assert not torch.equal(u, u3)


def test_where_it_runs_and_why_not(cb):
    def path(M, K, r, p, dtype=torch.bfloat16, adapter_dtype=torch.float32):
        x = torch.randn(M, K, device="cuda").to(dtype)
        A = torch.randn(r, K, device="cuda").to(adapter_dtype)
        return cb.shrink_path(x, A, p)

    hopper = torch.cuda.get_device_capability() == (9, 0)  # the default's choice was measured there only
    for dt, adt in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)):
        assert (path(8192, 4096, 16, 0.1, dt, adt) == "dropout") == hopper
        assert (path(8192, 14336, 5, 0.05, dt, adt) == "dropout") == hopper
        # the default takes r <= 32 with 16-bit adapters, r <= 16 with fp32 ones (measured)
        assert (path(8192, 4096, 32, 0.1, dt, adt) == "dropout") == (hopper and adt != torch.float32)
        assert path(8192, 4096, 33, 0.1, dt, adt) != "dropout"
    assert path(8192, 4096, 16, 0.0) != "dropout"  # no mask: the other shrinks
    assert path(64, 1028, 16, 0.1) != "dropout"  # K % 8: no 16-byte rows
    assert path(64, 1024, 16, 0.1, torch.float16, torch.float32) != "dropout"  # fp32 adapters on fp16: FFMA
    was = cb.set_shrink_drop(1)
    try:
        assert path(8192, 4096, 64, 0.1) == "dropout"
        assert path(64, 1024, 65, 0.1) != "dropout"  # above r = 64
        cb.set_shrink_drop(0)
        assert path(8192, 4096, 16, 0.1) != "dropout"
    finally:
        cb.set_shrink_drop(was)


_ROWS_CHILD = r"""
import torch, lora_kernels
from lora_kernels.backends import cuda_backend as cb
from conftest import assert_cuda_forward
cb.set_small_m(False)
cb.set_shrink_drop(1)
torch.manual_seed(0)
for M, K, N, r, adt in ((33, 1000, 72, 16, torch.float32), (777, 2056, 264, 8, torch.bfloat16),
                        (300, 264, 136, 30, torch.float32)):
    x = torch.randn(M, K, device="cuda").bfloat16()
    W = (torch.randn(N, K, device="cuda") / K ** 0.5).bfloat16()
    A = (torch.randn(r, K, device="cuda") / K ** 0.5).to(adt)
    B = torch.randn(N, r, device="cuda").to(adt)
    assert cb.shrink_path(x, A, 0.2) == "dropout"
    assert_cuda_forward(cb, x, W, None, A, B, 2.0, 0.2, 99, 5)
print("ok")
"""


@pytest.mark.parametrize("rows", ["16", "32"])
def test_both_row_blocks(rows):
    env = dict(os.environ, LORA_KERNELS_SHRINK_DROP_ROWS=rows)
    here = os.path.dirname(os.path.abspath(__file__))
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(lora_kernels.__file__)))  # this process's build
    env["PYTHONPATH"] = os.pathsep.join([here, package_root, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _ROWS_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]
