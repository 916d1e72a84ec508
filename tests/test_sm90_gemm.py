"""The cuda backend's sm_90 path (csrc/gemm_sm90.*): on a compute-capability-9.0 GPU with 16-bit x, the frozen GEMM and
the rank-r expand run as one CUTLASS GEMM whose last K-tiles come from (s·u, B) (forward) or (s·g, A) (dx at p = 0);
with dropout, dx's GEMM runs the (s/(1-p)·g, A) K-tiles first and masks them with the keep bits. GPU-only (skips
elsewhere): the path is the one taken where it should be (and is what the benchmarks time), it falls back with a
reason where it cannot run, and its outputs and grads meet the float64 tolerance rule."""
import math

import pytest
import torch

import lora_kernels

from conftest import HAS_CUDA, assert_cuda_backend_deterministic, assert_errors_within, err, rounding_floor
from test_contract import run_and_check

pytestmark = [
    pytest.mark.usefixtures("poisoned_outputs"),
    pytest.mark.skipif(not HAS_CUDA or "cuda" not in lora_kernels.available_backends(),
                       reason="needs the cuda backend on a GPU"),
]


def _hopper():
    return HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)


def _path(M, K, N, dtype=torch.bfloat16, bias=False):
    from lora_kernels.backends import cuda_backend

    x = torch.randn(M, K, device="cuda").to(dtype)
    W = torch.randn(N, K, device="cuda").to(dtype)
    b = torch.randn(N, device="cuda").to(dtype) if bias else None
    return cuda_backend.gemm_path(x, W, b)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_benchmarked_shapes_take_the_sm90_path(K, N, dtype):
    # The benchmark's Llama-3-8B layer shapes (forward x W^T and dx = dy W alike): the fused GEMM, not cuBLAS.
    assert _path(64, K, N, dtype) == "sm90"
    assert _path(64, N, K, dtype, bias=True) == "sm90"


def _layer_inputs(M, K, N, r, dtype, adapter_dtype):
    """Fresh x (M, K), W (N, K) in dtype and lora_A (r, K), lora_B (N, r) in adapter_dtype, for the path queries."""
    x = torch.randn(M, K, device="cuda").to(dtype)
    W = torch.randn(N, K, device="cuda").to(dtype)
    A = torch.randn(r, K, device="cuda").to(adapter_dtype)
    B = torch.randn(N, r, device="cuda").to(adapter_dtype)
    return x, W, A, B


def _dx_path(M, K, N, r, p, dtype=torch.bfloat16, adapter_dtype=torch.float32):
    from lora_kernels.backends import cuda_backend

    return cuda_backend.dx_path(*_layer_inputs(M, K, N, r, dtype, adapter_dtype), p)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_benchmarked_shapes_take_the_sm90_dx_path(K, N, adapter_dtype):
    # dx of the benchmarked shapes: the rank-r term inside the GEMM, masked there with dropout (no dx kernel, no
    # cuBLAS beta = 1)
    assert _dx_path(2048, K, N, 16, 0.0, adapter_dtype=adapter_dtype) == "sm90"
    assert _dx_path(2048, K, N, 64, 0.1, adapter_dtype=adapter_dtype) == "sm90 masked"
    # decoding-size batches: the small-M Hopper kernel with 16-bit adapters (csrc/small_m_sm90.cu), else cuBLAS
    # (csrc/lora_kernels.cuh, kSmallMBackwardRows; fp32 adapters take the Hopper kernel only with
    # LORA_KERNELS_SMALL_M_SM90_FP32=1)
    small = _dx_path(64, K, N, 16, 0.0, adapter_dtype=adapter_dtype)
    if adapter_dtype == torch.bfloat16:
        assert small == "small_m sm90", small
    else:
        assert small.startswith("cublas: M <= kSmallMBackwardRows"), small


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
def test_masked_dx_fallback_says_why():
    # the keep bits' rows must be 16-byte aligned for TMA: K % 128
    assert _dx_path(8, 200, 64, 4, 0.1).startswith("cublas: keep bits need N a multiple of 128")
    assert _dx_path(128, 200, 64, 4, 0.0) == "sm90"


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
def test_fallback_says_why():
    assert _path(8, 36, 64).startswith("cublas: K and N must be multiples of 8")
    assert _path(8, 64, 36).startswith("cublas: K and N must be multiples of 8")
    assert _path(8, 64, 64, torch.float32).startswith("cublas: x is not float16 or bfloat16")


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, None])
@pytest.mark.parametrize("lead,K,N,r", [((1,), 64, 8, 1), ((7,), 200, 136, 16), ((3, 100), 520, 1024, 64),
                                         ((300,), 4096, 264, 100), ((129,), 72, 4096, 256),
                                         ((5, 77), 384, 200, 8), ((131,), 1024, 72, 256), ((257,), 128, 136, 64),
                                         ((70,), 1024, 256, 32), ((90,), 256, 520, 120)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_sm90_path_against_float64(dtype, adapter_dtype, lead, K, N, r, p):
    # K, N multiples of 8 but not of the 64/128 tile; r from 1 to 256 (1 to 4 extension K-tiles, the last one's
    # 16-deep steps past r skipped: 1 of 4 multiplied at r = 1, 8, 16, 2 at r = 32, 3 at r = 100, 120); fp32 adapters
    # (PEFT's default) and 16-bit ones. With dropout and K % 128 == 0 (384, 1024, 128, 4096) the dx GEMM masks its
    # extension with the keep bits (1 to 4 extension K-tiles before the mask, M not a multiple of the 128-row tile);
    # other K fall back to the dx kernel and cuBLAS.
    # The small-M forward (M <= 64, tests/test_small_m.py) is switched off so that small M runs this path too.
    from lora_kernels.backends import cuda_backend

    assert _path(1, K, N, dtype) == "sm90"
    # the path of this shape at M = 128 (M <= 64 takes cuBLAS for dx: kSmallMBackwardRows)
    dx_path = _dx_path(128, K, N, r, p, dtype, adapter_dtype or dtype)
    if p == 0:
        assert dx_path == "sm90"
    elif dtype == torch.float16 and adapter_dtype == torch.float32:  # the streaming passes' FFMA kernels: no bits
        assert dx_path.startswith("cublas: no keep bits")
    elif K % 128:
        assert dx_path.startswith("cublas: keep bits need N a multiple of 128")
    else:
        assert dx_path == "sm90 masked"
    previous = cuda_backend.set_small_m(False)
    try:
        run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=p, adapter_dtype=adapter_dtype)
    finally:
        cuda_backend.set_small_m(previous)


@pytest.fixture
def dA_in_gemm():
    """dA inside the dx GEMM wherever it can run (set_dA_in_gemm(1): r up to 64)."""
    from lora_kernels.backends import cuda_backend

    previous = cuda_backend.set_dA_in_gemm(1)
    yield
    cuda_backend.set_dA_in_gemm(previous)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
def test_dA_in_gemm_where_it_runs():
    """dA joins the dx GEMM only where set_dA_in_gemm(1) asks for it (it measured slower than the dA pass): with
    adapters in x's dtype up to r = 64 (one extension K-tile), with or without dropout; by default and with (0)
    nowhere."""
    from lora_kernels.backends import cuda_backend

    bf, h = torch.bfloat16, torch.float16
    assert _dx_path(2048, 4096, 4096, 32, 0.0, adapter_dtype=bf) == "sm90"
    assert _dx_path(2048, 4096, 4096, 16, 0.1, adapter_dtype=bf) == "sm90 masked"
    previous = cuda_backend.set_dA_in_gemm(1)
    try:
        assert _dx_path(2048, 4096, 4096, 32, 0.0, adapter_dtype=bf) == "sm90 + dA"
        assert _dx_path(2048, 4096, 1024, 1, 0.0, dtype=h, adapter_dtype=h) == "sm90 + dA"
        assert _dx_path(2048, 4096, 4096, 64, 0.0, adapter_dtype=bf) == "sm90 + dA"
        assert _dx_path(2048, 4096, 4096, 65, 0.0, adapter_dtype=bf) == "sm90"  # two extension K-tiles
        assert _dx_path(2048, 4096, 4096, 16, 0.0) == "sm90"
        assert _dx_path(2048, 4096, 4096, 16, 0.1, adapter_dtype=bf) == "sm90 masked + dA"
        assert _dx_path(2048, 4096, 4096, 16, 0.1) == "sm90 masked"
        cuda_backend.set_dA_in_gemm(0)
        assert _dx_path(2048, 4096, 4096, 16, 0.0, adapter_dtype=bf) == "sm90"
    finally:
        cuda_backend.set_dA_in_gemm(previous)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.usefixtures("dA_in_gemm")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,K,N,r", [((300,), 200, 136, 7), ((129,), 4096, 1024, 40), ((1000,), 2056, 2048, 16),
                                         ((4, 257), 2048, 4096, 64), ((65,), 1032, 264, 24), ((2, 700), 520, 2104, 1)])
def test_dA_in_gemm_against_float64(dtype, lead, K, N, r):
    # dA from the dx GEMM's own K-tiles, through the public op against float64: both of its tiles (128 x 128
    # ping-pong, and 128 x 256 cooperative where the GEMM's K and N reach 2048), Ax's widths NP = 16, 32 and 64
    # (r = 1, 7, 16; 24; 40, 64), M not a multiple of the 128-row block (the last block's rows past M), x's K not a
    # multiple of the 64-column chunk (the columns past K). The small-M forward is off so that M = 65 runs this path.
    from lora_kernels.backends import cuda_backend

    assert _dx_path(math.prod(lead), K, N, r, 0.0, dtype, dtype) == "sm90 + dA"
    previous = cuda_backend.set_small_m(False)
    try:
        run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=0.0, adapter_dtype=dtype)
    finally:
        cuda_backend.set_small_m(previous)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.usefixtures("dA_in_gemm")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,K,N,r,p", [((300,), 384, 136, 7, 0.1), ((129,), 4096, 1024, 40, 0.3),
                                           ((1000,), 2048, 2056, 16, 0.05), ((2, 700), 512, 2104, 64, 0.5)])
def test_dA_in_gemm_with_dropout_against_float64(dtype, lead, K, N, r, p):
    # with dropout the masked dx GEMM masks x's chunks by the keep bits in shared memory before dA's products: the
    # contract's mask (regenerated by the backward), both tiles, NP = 16, 64, K a multiple of 128 (the bits' rows)
    from lora_kernels.backends import cuda_backend

    assert _dx_path(math.prod(lead), K, N, r, p, dtype, dtype) == "sm90 masked + dA"
    previous = cuda_backend.set_small_m(False)
    try:
        run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=p, adapter_dtype=dtype)
    finally:
        cuda_backend.set_small_m(previous)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.usefixtures("dA_in_gemm")
@pytest.mark.parametrize("K,N", [(2048, 2048), (1000, 1024)])
def test_dA_in_gemm_is_deterministic(K, N):
    # each partial element is written by one tile and the reduce sums them in a fixed order: the same bits twice
    M, r = 1333, 32
    assert _dx_path(M, K, N, r, 0.0, adapter_dtype=torch.bfloat16) == "sm90 + dA"
    assert_cuda_backend_deterministic(M, K, N, r, adapter_dtype=torch.bfloat16)


def _dA_gemm_splits(M, K, N, r, p, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16):
    from lora_kernels.backends import cuda_backend

    return cuda_backend.dA_gemm_splits(*_layer_inputs(M, K, N, r, dtype, adapter_dtype), p)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
def test_dA_gemm_where_it_runs():
    """dA as a GEMM of its own (csrc/dA_gemm_sm90.cu) at p = 0, r a multiple of 8, s·g's columns up to 192 (r with
    adapters in x's dtype, 3r with fp32 adapters on bf16 x: its three bf16 pieces), where dA runs after the sm_90 dx
    GEMM: the benchmarked shapes in token ranges that fill one wave of 128-column tiles (4 at K = 4096 on 132 SMs with
    one 64-wide tile of s·g, 1 at K = 14336), past 16384 tokens in ranges of at most 16384; not where dA runs beside
    the GEMM (4096 -> 1024, r = 16, the cost model's pick), nor with fp32 adapters on fp16 x, dropout, r = 7 or 200, M
    whose divisors give less than half a wave (or no ranges that short), nor when switched off."""
    from lora_kernels.backends import cuda_backend

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bf, h = torch.bfloat16, torch.float16
    want = max(1, sms // 32)
    assert _dA_gemm_splits(8192, 4096, 4096, 16, 0.0) == want
    assert _dA_gemm_splits(8192, 4096, 4096, 64, 0.0, h, h) == want
    assert _dA_gemm_splits(8192, 4096, 1024, 64, 0.0) == want
    assert _dA_gemm_splits(8192, 14336, 4096, 64, 0.0) == 1
    assert _dA_gemm_splits(8192, 4096, 1024, 16, 0.0) == 0  # beside the dx GEMM
    assert _dA_gemm_splits(8192, 4096, 4096, 16, 0.0, adapter_dtype=torch.float32) == want
    assert _dA_gemm_splits(8192, 4096, 4096, 64, 0.0, adapter_dtype=torch.float32) == max(1, sms // 96)
    assert _dA_gemm_splits(8192, 4096, 4096, 72, 0.0) == max(1, sms // 64)
    assert _dA_gemm_splits(8192, 4096, 4096, 200, 0.0) == 0  # over 192 columns
    assert _dA_gemm_splits(8192, 4096, 4096, 16, 0.0, h, torch.float32) == 0  # fp32 adapters on fp16: the pass
    assert _dA_gemm_splits(8192, 4096, 4096, 16, 0.1) == 0
    assert _dA_gemm_splits(8192, 4096, 4096, 7, 0.0) == 0
    assert _dA_gemm_splits(8191, 4096, 4096, 16, 0.0) == 0  # a prime: one range, 32 blocks
    # past 16384 tokens, ranges of at most 16384 (the fp32 running sum's rounding), however few a wave wants
    for M, K in ((65600, 4096), (40000, 14336)):
        splits = _dA_gemm_splits(M, K, 4096, 64, 0.0)
        assert splits > 0 and M % splits == 0 and M // splits <= 16384, (M, K, splits)
    assert _dA_gemm_splits(2 * 32771, 4096, 4096, 64, 0.0) == 0  # 32771 a prime: no range that short, the pass
    assert _dA_gemm_splits(64, 4096, 4096, 16, 0.0) == 0  # dx on the small-M kernel
    previous = cuda_backend.set_dA_gemm(0)
    try:
        assert _dA_gemm_splits(8192, 4096, 4096, 16, 0.0) == 0
        assert _dA_gemm_splits(8192, 4096, 4096, 64, 0.0, adapter_dtype=torch.float32) == 0
        cuda_backend.set_dA_gemm(1)  # the same as the default
        assert _dA_gemm_splits(8192, 4096, 4096, 64, 0.0, adapter_dtype=torch.float32) == max(1, sms // 96)
        assert _dA_gemm_splits(8192, 4096, 4096, 16, 0.0) == want
    finally:
        cuda_backend.set_dA_gemm(previous)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("dtype,adapter_dtype,lead,K,N,r",
                         [(torch.bfloat16, torch.float32, (1000,), 2056, 2048, 24),
                          (torch.bfloat16, torch.float32, (4, 257), 2048, 4096, 64),
                          (torch.bfloat16, torch.float32, (2048,), 4096, 1024, 40),
                          (torch.bfloat16, torch.bfloat16, (1400,), 4096, 1024, 72),
                          (torch.float16, torch.float16, (3, 300), 520, 264, 128),
                          (torch.bfloat16, torch.bfloat16, (130,), 14336, 200, 192)])
def test_dA_gemm_wide_against_float64(dtype, adapter_dtype, lead, K, N, r):
    # s·g over one 64-wide tile, 2 or 3 tiles of V's columns per x tile, taken one after another in the tile order
    # (fp32 adapters' three pieces of r = 24, 40, 64; r = 72, 128, 192). The same float64 check and three calls in a
    # row as test_dA_gemm_against_float64.
    assert _dA_gemm_splits(math.prod(lead), K, N, r, 0.0, dtype, adapter_dtype) > 0
    for _ in range(3):
        run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=0.0, adapter_dtype=adapter_dtype)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
def test_dA_gemm_sums_a_long_token_range_as_the_pass_does():
    """One token range of 16384 tokens, the longest the dA GEMM takes (K = 16384: x's 128 tiles fill a wave alone),
    fp32 adapters (s·g's exact bf16x3 pieces): the dA GEMM's dA against float64 within 2x the dA pass's error
    (set_dA_gemm(0), the same call otherwise) + the result's rounding. The pass adds every 64-token product in fp32;
    a GEMM that summed the whole range in the tensor cores' accumulator had about 100x its error over 65600 tokens
    (session 62), and the dA GEMM now adds each K-tile's sum into an fp32 accumulator (csrc/dA_gemm_sm90.cu, Sums)."""
    from lora_kernels.backends import cuda_backend

    M, K, N, r, s = 16384, 16384, 256, 16, 0.5
    x, W, A0, B = _layer_inputs(M, K, N, r, torch.bfloat16, torch.float32)
    assert cuda_backend.dA_gemm_splits(x, W, A0, B, 0.0) == 1
    dy = torch.randn(M, N, device="cuda").bfloat16()

    def dA_of(mode):
        previous = cuda_backend.set_dA_gemm(mode)
        try:
            A = A0.clone().requires_grad_()
            # dx asked for too: the dA GEMM runs after the dx GEMM, whose pack writes s·g
            y = lora_kernels.lora_linear(x.detach().requires_grad_(), W, None, A, B, s, backend="cuda")
            y.backward(dy)
            return A.grad
        finally:
            cuda_backend.set_dA_gemm(previous)

    dA_gemm, dA_pass = dA_of(-1), dA_of(0)
    v = s * (dy.double() @ B.double())  # (M, r)
    ref = torch.zeros(r, K, device="cuda", dtype=torch.float64)
    for i in range(0, M, 4096):
        ref += v[i:i + 4096].T @ x[i:i + 4096].double()
    e, e0 = err(dA_gemm, ref), err(dA_pass, ref)
    assert_errors_within("dA (GEMM against the pass)", e, e0, rounding_floor(torch.float32, ref.abs().max().item()))


_DA_GEMM_SHAPES = [((1000,), 2056, 2048, 16), ((4, 257), 2048, 4096, 64), ((3, 300), 520, 264, 8),
                   ((1400,), 4096, 1024, 40), ((2, 1536), 1032, 4096, 24), ((130,), 14336, 200, 56)]


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("dtype,adapter_dtype,lead,K,N,r",
                         [(dt, dt, *c) for dt in (torch.bfloat16, torch.float16) for c in _DA_GEMM_SHAPES]
                         + [(torch.bfloat16, torch.float32, *c) for c in _DA_GEMM_SHAPES if c[3] <= 16]
                         + [(torch.bfloat16, torch.float32, (2048,), 4096, 1024, 16)])
def test_dA_gemm_against_float64(dtype, adapter_dtype, lead, K, N, r):
    # dA on its own GEMM after the dx GEMM, through the public op against float64 (poisoned outputs: a partial element
    # the kernel fails to write shows): K not a multiple of the 128-column tile (2056, 520, 1032: the last tile's
    # columns past K) nor of 64, r below the 64-wide tile (8 to 56: V's columns past r), token ranges that are not
    # multiples of the 64-token K-tile (1000 / 5 = 200, 1028 / 4 = 257, 900 / 12 = 75), one range (K = 14336), 3-D x.
    # Three calls in a row with fresh inputs: a GEMM that read the previous call's vx from the reused workspace fails.
    # fp32 adapters (bf16 x): the pack's three pieces of s·g, each piece's product a partial of its own, at r = 8 and
    # 16 (the larger ranks in test_dA_gemm_wide_against_float64); at 2048 x 4096 -> 1024 four ranges of 512 tokens.
    M = math.prod(lead)
    assert _dA_gemm_splits(M, K, N, r, 0.0, dtype, adapter_dtype) > 0
    for _ in range(3):
        run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=0.0, adapter_dtype=adapter_dtype)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
def test_dA_gemm_is_deterministic():
    # each partial element is written by one block and the reduce sums them in a fixed order: the same bits twice
    M, K, N, r = 4096, 2048, 1024, 32
    assert _dA_gemm_splits(M, K, N, r, 0.0) > 1
    assert_cuda_backend_deterministic(M, K, N, r, adapter_dtype=torch.bfloat16)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_extension_tiles_read_this_calls_pack(p):
    # The dx GEMM may start under its pack launch (programmatic dependent launch, csrc/gemm_sm90.cuh) and must wait
    # for it before it reads (s g). With one main K-tile (N = 64) and 8192 rows of (s g) to pack, it reaches the
    # extension at once: a missing or misplaced wait reads the previous call's (s g) from the reused workspace.
    # Three calls in a row, fresh inputs each time, each against float64.
    assert _dx_path(8192, 1024, 64, 64, p) == ("sm90" if p == 0 else "sm90 masked")
    for _ in range(3):
        run_and_check("cuda", "cuda", torch.bfloat16, (8192,), 1024, 64, 64, bias=False, p=p,
                      adapter_dtype=torch.float32)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_wide_tile_below_n_2048(adapter_dtype):
    # The 128 x 256 tile where N < 2048 but its tiles fill 1.5 waves (csrc/gemm_sm90.cu): the forward with dropout
    # (the shrink + K-extended GEMM path) and its backward, a partial last tile column (N = 1000), against float64.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = 128 * -(-3 * sms // 8)
    run_and_check("cuda", "cuda", torch.bfloat16, (rows + 5,), 2048, 1000, 16, bias=True, p=0.1,
                  adapter_dtype=adapter_dtype)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
def test_sm90_path_is_deterministic():
    assert_cuda_backend_deterministic(333, 1024, 512, 16)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("adapter_dtype", [torch.float32, None])
@pytest.mark.parametrize("lead,K,N,r,blocks", [((1000,), 1024, 384, 16, 2), ((1000,), 4096, 136, 16, 12),
                                                ((3, 300), 1024, 256, 40, 12), ((520,), 640, 1024, 64, 24)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dA_beside_the_dx_gemm_against_float64(adapter_dtype, lead, K, N, r, blocks, p):
    # dA launched beside the dx GEMM (csrc/dA_sm90.cu): the GEMM's grid leaves `blocks` SMs free, dA starts there
    # once the GEMM's blocks have waited for the pack, reads x and g (never the GEMM's output) and waits for the
    # GEMM at its end; its partials live past the GEMM's (vx, ax) in the workspace. Forced on here (the cost model
    # takes it only at large M): r = 40 and 64 stage g's pieces in a prep launch before the GEMM, r = 16 does not.
    # Three calls in a row with fresh inputs, each against float64: a dA that read a stale g, or partials that
    # overwrote (vx, ax) under the GEMM, fails.
    from lora_kernels.backends import cuda_backend

    previous = cuda_backend.set_dA_beside(blocks)
    try:
        M = math.prod(lead)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(r, K, device="cuda", dtype=adapter_dtype or torch.bfloat16)
        B = torch.randn(N, r, device="cuda", dtype=adapter_dtype or torch.bfloat16)
        assert cuda_backend.dA_beside_blocks(x, W, A, B, p) == blocks
        for _ in range(3):
            run_and_check("cuda", "cuda", torch.bfloat16, lead, K, N, r, bias=True, p=p, adapter_dtype=adapter_dtype)
    finally:
        cuda_backend.set_dA_beside(previous)


@pytest.mark.skipif(not _hopper(), reason="the sm_90 GEMM runs on compute capability 9.0 only")
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_dA_beside_is_chosen_where_the_gemm_is_short(adapter_dtype):
    # The cost model takes dA beside the dx GEMM at 8192 x 4096 -> 1024, r = 16, p = 0 (the dx GEMM 4x shorter than at
    # -> 4096, dA the same read of x: measured faster there, session 50); never at M = 64 (dx on cuBLAS there), nor
    # when switched off.
    from lora_kernels.backends import cuda_backend

    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 4096, device="cuda", dtype=adapter_dtype)
    B = torch.randn(1024, 16, device="cuda", dtype=adapter_dtype)
    assert cuda_backend.dA_beside_blocks(x, W, A, B, 0.0) > 0
    assert cuda_backend.dA_beside_blocks(x[:64], W, A, B, 0.0) == 0
    previous = cuda_backend.set_dA_beside(0)
    try:
        assert cuda_backend.dA_beside_blocks(x, W, A, B, 0.0) == 0
    finally:
        cuda_backend.set_dA_beside(previous)
