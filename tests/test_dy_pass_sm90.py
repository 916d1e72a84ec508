"""The streaming passes on Hopper (csrc/stream_sm90.cuh on wgmma): the backward's dy pass (dy_pass_sm90.cu: g = dy B
and the dB partials, one read of dy) and dA pass (dA_sm90.cu), the forward's shrink (shrink_sm90.cu; both read x once,
masked by the keep bits).
GPU-only (skips elsewhere): the benchmarked shapes take them, the fallback says why, and backward grads through them
meet the float64 tolerance rule on shapes that exercise their edges (partial row and column tiles, uneven column
groups, several r-chunks, the bf16x3 pieces of fp32 adapters, dropout) and are deterministic."""
import math

import pytest
import torch

import lora_kernels

from conftest import HAS_CUDA, assert_cuda_backend_deterministic
from test_contract import run_and_check

pytestmark = [
    pytest.mark.usefixtures("poisoned_outputs"),
    pytest.mark.skipif(not HAS_CUDA or "cuda" not in lora_kernels.available_backends(),
                       reason="needs the cuda backend on a GPU"),
    pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() != (9, 0),
                       reason="the wgmma dy pass runs on compute capability 9.0 only"),
]


def _dy_path(M, N, r, dtype=torch.bfloat16, adapter_dtype=torch.float32):
    from lora_kernels.backends import cuda_backend

    dy = torch.randn(M, N, device="cuda").to(dtype)
    B = torch.randn(N, r, device="cuda").to(adapter_dtype)
    return cuda_backend.dy_path(dy, B)


@pytest.mark.parametrize("N", [4096, 1024, 14336])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
@pytest.mark.parametrize("r", [16, 64])
def test_benchmarked_shapes_take_the_sm90_dy_pass(N, dtype, adapter_dtype, r):
    # the Llama-3-8B layer widths the benchmark's backward reads dy of
    assert _dy_path(8192, N, r, dtype, adapter_dtype) == "sm90"


def _x_pass_path(which, M, K, r, p, dtype=torch.bfloat16, adapter_dtype=torch.float32):
    """cuda_backend.dA_path or shrink_path (`which`) for a fresh x (M, K) and lora_A (r, K)."""
    from lora_kernels.backends import cuda_backend

    x = torch.randn(M, K, device="cuda").to(dtype)
    A = torch.randn(r, K, device="cuda").to(adapter_dtype)
    return getattr(cuda_backend, f"{which}_path")(x, A, p)


def _dA_path(*args):
    return _x_pass_path("dA", *args)


def _shrink_path(*args):
    return _x_pass_path("shrink", *args)


@pytest.mark.parametrize("K", [4096, 14336])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_benchmarked_shapes_take_the_sm90_dA_pass_and_shrink(K, dtype, adapter_dtype, r, p):
    # dA runs the wgmma kernel with dropout too (it masks x by the keep bits); with dropout the shrink makes its mask
    # itself at r <= 32, r <= 16 with fp32 adapters (csrc/shrink_drop.cu); above, and with that kernel off, the
    # choices below it (csrc/shrink_sm90.cu: with dropout at r <= 16 and 16-bit adapters the mma.sync kernel, measured
    # faster)
    from lora_kernels.backends import cuda_backend

    assert _dA_path(8192, K, r, p, dtype, adapter_dtype) == "sm90"
    assert _shrink_path(8192, K, r, p, dtype, adapter_dtype) == ("dropout" if p > 0 and r <= 16 else "sm90")
    assert _shrink_path(8192, K, 32, p, dtype, adapter_dtype) == (
        "dropout" if p > 0 and adapter_dtype != torch.float32 else "sm90")
    was = cuda_backend.set_shrink_drop(0)
    try:
        assert _shrink_path(8192, K, r, p, dtype, adapter_dtype) == (
            "sm90" if p == 0 or r > 16 or adapter_dtype == torch.float32
            else "mma.sync: dropout at r <= 16 with 16-bit adapters: the mma.sync kernel masks faster (measured)")
    finally:
        cuda_backend.set_shrink_drop(was)


def test_shrink_fallback_says_why():
    from lora_kernels.backends import cuda_backend

    assert _shrink_path(64, 128, 16, 0.0).startswith("mma.sync: K below the pass's column tiles")
    assert _shrink_path(64, 1028, 16, 0.1).startswith("mma.sync: K must be a multiple of 8")
    assert _shrink_path(64, 1024, 16, 0.1, torch.float16, torch.float32).startswith("mma.sync: x and the adapters")
    for dt, adt in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
        assert _shrink_path(64, 1024, 16, 0.1, dt, adt) == "dropout"
    assert _shrink_path(64, 1024, 17, 0.1) == "sm90"  # with fp32 adapters the dropout shrink takes r <= 16
    assert _shrink_path(64, 1024, 17, 0.1, torch.bfloat16, torch.bfloat16) == "dropout"
    assert _shrink_path(64, 1024, 33, 0.1, torch.bfloat16, torch.bfloat16) == "sm90"
    was = cuda_backend.set_shrink_drop(0)
    try:
        assert _shrink_path(64, 1024, 16, 0.1, torch.bfloat16, torch.bfloat16).startswith(
            "mma.sync: dropout at r <= 16")
        assert _shrink_path(64, 1024, 16, 0.1) == "sm90"  # fp32 adapters on bf16 x
        assert _shrink_path(64, 1024, 17, 0.1) == "sm90"
    finally:
        cuda_backend.set_shrink_drop(was)


def test_dA_pass_fallback_says_why():
    assert _dA_path(64, 128, 16, 0.0).startswith("mma.sync: K below the pass's column tiles")
    assert _dA_path(64, 1028, 16, 0.1).startswith("mma.sync: K must be a multiple of 8")
    assert _dA_path(64, 1024, 16, 0.1, torch.float16, torch.float32).startswith("mma.sync: x and the adapters take")
    assert _dA_path(64, 1024, 16, 0.1).startswith("mma.sync: M <= kSmallMBackwardRows")
    assert _dA_path(65, 1024, 16, 0.1) == "sm90"
    assert _dA_path(128, 1024, 17, 0.1) == "sm90"
    assert _dA_path(64, 1024, 17, 0.0).startswith("mma.sync: M <= kSmallMBackwardRows")
    assert _dA_path(64, 1028, 17, 0.1).startswith("mma.sync: K must be a multiple of 8")
    # with dropout at r <= 16 dA's ring is 6 stages deep: 5 column tiles of 64 at least
    assert _dA_path(256, 256, 16, 0.0) == "sm90"
    assert _dA_path(256, 256, 16, 0.1).startswith("mma.sync: K below the pass's column tiles")
    assert _dA_path(256, 264, 16, 0.1) == "sm90"


def test_dy_pass_fallback_says_why():
    assert _dy_path(64, 128, 16).startswith("mma.sync: N below the pass's column tiles")
    assert _dy_path(64, 1028, 16).startswith("mma.sync: N must be a multiple of 8")
    assert _dy_path(64, 1024, 16, torch.float16, torch.float32).startswith("mma.sync: dy and the adapters take")
    assert _dy_path(64, 1024, 16).startswith("mma.sync: M <= kSmallMBackwardRows")
    assert _dy_path(65, 1024, 16) == "sm90"


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, None),
                                                 (torch.float16, None)])
@pytest.mark.parametrize("lead,K,N,r", [((777,), 264, 1000, 48), ((3, 61), 136, 200, 5), ((1,), 520, 4096, 16),
                                         ((2049,), 1000, 520, 64), ((130,), 2056, 2056, 100), ((300,), 72, 136, 8),
                                         ((513,), 1056, 1000, 48), ((257,), 1056, 264, 16), ((1500,), 1000, 520, 5)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_sm90_dy_pass_against_float64(dtype, adapter_dtype, lead, K, N, r, p):
    # M with a partial 128-row tile, N and K with a partial 64-column tile (1000, 200, 520, 2056, 264, 136), uneven
    # column groups, r not a multiple of 16 and above one r-chunk (48, 64 and 100: two to seven chunks of 16, 32 or
    # 64); K = 72 keeps dA on its mma.sync kernel beside the wgmma dy pass, and K = 136 with dropout at r = 5 (dA's
    # deeper ring needs 5 column tiles there); r = 16 and 5 at K = 1056 and 1000 run that 6-stage ring with dropout. With dropout, K % 32 == 0 (1056, its last
    # column tile half full) has the loader stage the keep bits (of dA and of the shrink); the other K have the
    # masking warpgroup read them from global memory.
    # (M <= 64 runs the mma.sync kernels: csrc/lora_kernels.cuh, kSmallMBackwardRows)
    M = math.prod(lead)
    small = M <= 64
    assert _dy_path(M, N, r, dtype, adapter_dtype or dtype) == (
        "mma.sync: M <= kSmallMBackwardRows (64): the mma.sync kernel is faster" if small else "sm90")
    # dA with dropout masks x itself at every rank; the shrink with dropout makes its mask itself at r <= 32 (r <= 16
    # with fp32 adapters; K % 8 == 0 here), and otherwise runs on wgmma, as dA does
    shrink_drop = p > 0 and r <= (16 if adapter_dtype == torch.float32 else 32)
    # the passes need stages - 1 column tiles of 64: 3 (4 stages), dA with dropout 5 where its side operand is at
    # most 48 wide (6 stages: r <= 16, or r <= 32 at one piece; fp32 adapters on bf16 x take three)
    pieces = 3 if adapter_dtype == torch.float32 else 1
    dA_deep = p > 0 and (r <= 16 or (r <= 32 and pieces == 1))
    shrink = _shrink_path(M, K, r, p, dtype, adapter_dtype or dtype)
    if shrink_drop:
        assert shrink == "dropout", shrink
    checks = [(_dA_path(M, K, r, p, dtype, adapter_dtype or dtype), small, 257 if dA_deep else 129)]
    if not shrink_drop:
        checks.append((shrink, False, 129))
    for path, small_m, min_k in checks:
        if K < min_k:
            assert path.startswith("mma.sync: K below the pass's column tiles"), path
        elif small_m:
            assert path.startswith("mma.sync: M <= kSmallMBackwardRows"), path
        else:
            assert path.startswith("sm90"), path
    run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=p, adapter_dtype=adapter_dtype)


def test_sm90_dy_pass_is_deterministic():
    assert _dy_path(1500, 3000, 24) == "sm90"
    assert_cuda_backend_deterministic(1500, 256, 3000, 24)
