"""The cuda backend's fused forward on Hopper (csrc/fused_fwd_sm90.*): one GEMM launch (after a small prep launch, none
where the lead tiles read 16-bit adapters as they are) in which u = s·x Aᵀ is computed by each row block's lead tiles
(output tiles that also multiply their x tiles by lora_A's pieces) or by u tiles of their own, and whose output tiles
add bf16(u) Bᵀ as one more K-tile. GPU-only (skips elsewhere): the path is taken where it should be (by default at p
= 0: lead tiles, u tiles where the lead tiles do not fit the output's tile columns; at p > 0 the shrink + GEMM path),
says why where it is not, and its y, saved u and grads meet the float64 tolerance rule on odd shapes (M not a
multiple of the 128-row tile, an odd number of output tile columns, K not a multiple of the 64-wide K tile, every
u-column split) in both variants, and in the lead tiles' wide form (128 x 256 tiles, cooperative schedule) where the
sm_90 GEMM takes that tile."""

import pytest
import torch

import lora_kernels

from conftest import (HAS_CUDA, SM90_TILE_FORCED, WIDE_TILE, assert_cuda_backend_deterministic,
                      assert_cuda_forward)
from test_contract import run_and_check

pytestmark = [
    pytest.mark.usefixtures("poisoned_outputs"),
    pytest.mark.skipif(not HAS_CUDA or "cuda" not in lora_kernels.available_backends(),
                       reason="needs the cuda backend on a GPU"),
    pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() != (9, 0),
                       reason="the fused forward runs on compute capability 9.0 only"),
]

S = 0.75


def _cb():
    from lora_kernels.backends import cuda_backend

    return cuda_backend


@pytest.fixture
def fused_lead():
    """The lead-tile kernel (mode 2): u computed by each row block's first output tiles (ceil(r / 8) of them for fp32
    adapters on bf16; for 16-bit adapters ceil(r / 8) where they fit the output's tile columns, else ceil(r / 32))."""
    previous = _cb().set_fused_forward(2)
    yield
    _cb().set_fused_forward(previous)


@pytest.fixture
def fused_on():
    """The u-tile kernel (mode 1): u computed by 2 u tiles per row block (the default takes the lead tiles)."""
    previous = _cb().set_fused_forward(1)
    yield
    _cb().set_fused_forward(previous)


def _inputs(M, K, N, r, dtype, adapter_dtype, bias):
    def rn(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, device="cuda") * std).to(dt)

    return (rn(M, K), rn(N, K, std=K ** -0.5), rn(N) if bias else None, rn(r, K, dt=adapter_dtype, std=K ** -0.5),
            rn(N, r, dt=adapter_dtype, std=r ** -0.5))


def _path(M, K, N, r, p=0.0, dtype=torch.bfloat16, adapter_dtype=torch.float32):
    x, W, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype, True)
    return _cb().forward_path(x, W, b, A, B, p)


@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_benchmarked_shapes_take_the_default_path(K, N, adapter_dtype):
    # what bench/suite and targets.py time at p = 0: the lead-tile kernel at every lead-tile count (r = 64 with fp32
    # adapters' 8 u columns per lead tile makes 8 per row block, which fit the output's tile columns here); at p > 0
    # the shrink + GEMM path
    lead = "sm90 fused lead ("
    for r in (16, 32, 64):
        got = _path(256, K, N, r, adapter_dtype=adapter_dtype)
        assert got.startswith(lead), (K, N, r)
        # the lead tiles' tile: 128 x 256 cooperative where the sm_90 GEMM takes it (K and N >= 2048; at M = 256
        # never below N = 2048)
        if not SM90_TILE_FORCED:
            assert got.endswith(WIDE_TILE) == (K >= 2048 and N >= 2048), (K, N, r, got)
        assert _path(256, K, N, r, dtype=torch.float16, adapter_dtype=torch.float16).startswith(lead), (K, N, r)
        assert "(fused: dropout (the fused kernel's masking is slower" in _path(256, K, N, r, p=0.1), (K, N, r)


def test_fused_forward_mode_switch():
    cb = _cb()
    previous = cb.set_fused_forward(0)
    try:
        assert "(fused: off (LORA_KERNELS_FUSED_FWD=0 or set_fused_forward))" in _path(256, 512, 512, 32)
        assert cb.set_fused_forward(1) == 0
        assert _path(256, 512, 512, 16).startswith("sm90 fused (")
        assert cb.set_fused_forward(-1) == 1
        assert _path(256, 512, 512, 17).startswith("sm90 fused lead (")
        assert _path(256, 512, 1024, 33).startswith("sm90 fused lead (")  # fp32 adapters: 5 lead tiles in 8 columns
        assert _path(256, 512, 512, 33).startswith("sm90 fused (")  # 5 lead tiles do not fit 4 columns: u tiles
        assert _path(256, 512, 512, 64, adapter_dtype=torch.bfloat16).startswith("sm90 fused lead (")  # 2 lead tiles
        # the default's fallback: 3 lead tiles (fp32 adapters, r = 24) do not fit 2 output tile columns, u tiles do
        assert _path(256, 512, 136, 24).startswith("sm90 fused (")
        assert cb.set_fused_forward(2) == -1
        assert "(fused: lead tiles: fewer output tile columns than lead tiles" in _path(256, 512, 136, 24)
        assert _path(256, 512, 1024, 64).startswith("sm90 fused lead (")  # 8 lead tiles in 8 tile columns
    finally:
        cb.set_fused_forward(previous)


@pytest.mark.usefixtures("fused_on")
def test_fused_forward_fallback_says_why():
    assert _path(256, 4096, 4096, 16, p=0.1).startswith("sm90 fused (")  # mode 1: the u tiles mask x
    assert "(fused: r above 64)" in _path(256, 512, 512, 65)
    assert "(fused: K and N must be multiples of 8" in _path(256, 516, 512, 16)
    assert "(fused: lora_A must have x's dtype, or be fp32 on bf16 x)" in _path(
        256, 512, 512, 16, dtype=torch.float16, adapter_dtype=torch.float32)
    assert "(fused: x is not float16 or bfloat16)" in _path(256, 512, 512, 16, dtype=torch.float32)


def _check_forward(M, K, N, r, dtype, adapter_dtype, bias, path="sm90 fused ("):
    cb = _cb()
    x, W, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype, bias)
    assert cb.forward_path(x, W, b, A, B, 0.0).startswith(path)
    assert_cuda_forward(cb, x, W, b, A, B, S)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
@pytest.mark.parametrize("M,K,N,r", [(65, 64, 8, 1), (300, 200, 136, 16), (1000, 520, 1032, 17), (129, 4096, 264, 33),
                                     (257, 72, 4096, 64), (777, 1024, 72, 48), (8192, 4096, 1024, 16),
                                     (2048, 4096, 4096, 64), (4099, 1000, 392, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("fused_on")
def test_fused_forward_against_float64(dtype, adapter_dtype, M, K, N, r, bias):
    # every u-column split (r <= 16, 32, 64 with 1 or 3 pieces), partial tiles in M, N and K, an odd number of
    # output tile columns (the scheduler's padding tile), many row blocks waiting on their u tiles
    _check_forward(M, K, N, r, dtype, adapter_dtype, bias)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("lead,K,N,r", [((3, 100), 520, 1024, 64), ((300,), 4096, 264, 16), ((5, 77), 384, 200, 8)])
@pytest.mark.usefixtures("fused_on")
def test_fused_forward_op_grads(dtype, adapter_dtype, lead, K, N, r):
    # the public op end to end: the fused forward's saved u feeds the backward
    run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=0.0, adapter_dtype=adapter_dtype)


@pytest.mark.parametrize("mode,adapter_dtype,launches", [(-1, torch.float32, 2), (1, torch.float32, 2),
                                                          (1, torch.bfloat16, 2), (-1, torch.bfloat16, 1)])
def test_fused_forward_launches(mode, adapter_dtype, launches):
    """The forward at p = 0 launches the prep and the fused GEMM, no shrink, pack or cuBLAS kernel (default mode:
    lead tiles; mode 1: u tiles); the lead tiles with bf16 adapters read lora_A and lora_B as they are: the fused GEMM
    alone."""
    x, W, b, A, B = _inputs(1024, 4096, 4096, 16, torch.bfloat16, adapter_dtype, True)
    previous = _cb().set_fused_forward(mode)
    try:
        assert (" one launch" in _cb().forward_path(x, W, b, A, B, 0.0)) == (launches == 1)
        kernels = _kernels_of_one_forward(x, W, b, A, B)
    finally:
        _cb().set_fused_forward(previous)
    assert len(kernels) == launches and "FusedFwd" in kernels[-1], kernels
    assert launches == 1 or "fused_prep" in kernels[0], kernels


def _misaligned(t):
    """A copy of t whose data starts 2 bytes past a 16-byte boundary (the prep path's operands)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def test_one_launch_where_the_adapters_can_be_read_as_they_are():
    """The forward without the prep launch: lead tiles, both adapters in x's dtype, r a multiple of 8, both 16-byte
    aligned; forward_path says " one launch" there and nowhere else."""
    one = " one launch"
    assert one in _path(256, 512, 512, 16, adapter_dtype=torch.bfloat16)
    assert one in _path(256, 512, 512, 64, dtype=torch.float16, adapter_dtype=torch.float16)
    assert one not in _path(256, 512, 512, 16)  # fp32 adapters: A's bf16x3 pieces
    assert one not in _path(256, 512, 512, 12, adapter_dtype=torch.bfloat16)  # lora_B's rows of 24 bytes
    x, W, b, A, B = _inputs(256, 512, 512, 16, torch.bfloat16, torch.bfloat16, True)
    cb = _cb()
    assert one not in cb.forward_path(x, W, b, _misaligned(A), B, 0.0)
    assert one not in cb.forward_path(x, W, b, A, _misaligned(B), 0.0)
    assert one not in cb.forward_path(x, W, b, A, B.float(), 0.0)  # lora_B not in x's dtype: the prep casts it
    previous = cb.set_fused_forward(1)
    try:
        assert one not in cb.forward_path(x, W, b, A, B, 0.0)  # the u tiles
    finally:
        cb.set_fused_forward(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", [(4099, 1000, 392, 8), (300, 200, 136, 16), (1000, 520, 1032, 24),
                                     (129, 4096, 264, 48), (8192, 2048, 2056, 64), (1000, 2056, 4096, 32),
                                     (65, 64, 72, 16), (300, 520, 136, 48)])
def test_one_launch_matches_the_prep_path(dtype, M, K, N, r):
    """Without the prep the lead tiles read lora_A and lora_B themselves (TMA's zeros past r) and count in the
    stream's ready counters: the same bits as with the prep (misaligned copies of the adapters take that path), for
    fresh inputs on every call, so a counter left unreset by the call before would let a tile read the last call's
    u. Both tile variants (the wide one from K, N >= 2048), partial tiles in M, N and K, lead tiles of 8 u columns
    (r up to 64) and of 32 (r = 48 on 2 tile columns)."""
    cb = _cb()
    small_m = cb.set_small_m(False)
    try:
        for _ in range(3):
            x, W, b, A, B = _inputs(M, K, N, r, dtype, dtype, True)
            assert " one launch" in cb.forward_path(x, W, b, A, B, 0.0)
            y, u = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
            y_prep, u_prep = cb.forward(x, W, b, _misaligned(A), _misaligned(B), S, 0.0, 0, 0)
            assert torch.equal(y, y_prep) and torch.equal(u, u_prep)
        assert_cuda_forward(cb, x, W, b, A, B, S)
    finally:
        cb.set_small_m(small_m)


def test_one_launch_on_two_streams_and_in_a_graph():
    """Each stream has its own ready counters: calls interleaved on two streams, then a captured graph replayed with
    new inputs, give the eager call's bits."""
    cb = _cb()
    x, W, b, A, B = _inputs(2048, 2048, 2048, 16, torch.bfloat16, torch.bfloat16, True)
    assert " one launch" in cb.forward_path(x, W, b, A, B, 0.0)
    _assert_streams_and_graph(cb, x, W, b, A, B)


def _assert_streams_and_graph(cb, x, W, b, A, B, p=0.0):
    """Forwards of 4 new x's interleaved on two streams, then a captured graph replayed with them, give the eager
    calls' bits (with dropout p: the same seed and offset every call; a device seed, which capture needs)."""
    seed = torch.tensor(7, dtype=torch.int64, device=x.device) if p > 0 else 7
    xs = [torch.randn_like(x) for _ in range(4)]
    want = [cb.forward(xi, W, b, A, B, S, p, seed, 3)[0] for xi in xs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    got = [None] * len(xs)
    for i, xi in enumerate(xs):
        with torch.cuda.stream(streams[i % 2]):
            got[i] = cb.forward(xi, W, b, A, B, S, p, seed, 3)[0]
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cb.forward(static_x, W, b, A, B, S, p, seed, 3)  # warm-up off the default stream, as torch's graph docs ask
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = cb.forward(static_x, W, b, A, B, S, p, seed, 3)[0]
    for xi, w in zip(xs, want):
        static_x.copy_(xi)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, w)


def _kernels_of_one_forward(x, W, b, A, B):
    with torch.no_grad():
        for _ in range(2):
            lora_kernels.lora_linear(x, W, b, A, B, S, backend="cuda")
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            lora_kernels.lora_linear(x, W, b, A, B, S, backend="cuda")
            torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
@pytest.mark.parametrize("M,K,N,r,p,offset", [(300, 200, 136, 16, 0.1, 0), (1000, 520, 1032, 33, 0.3, 12345),
                                              (129, 4096, 264, 64, 0.5, 7), (4099, 1000, 392, 8, 0.05, 0),
                                              (65, 72, 8, 1, 0.9, 3)])
@pytest.mark.usefixtures("fused_on")
def test_fused_forward_dropout_against_float64(dtype, adapter_dtype, M, K, N, r, p, offset):
    # the u tiles mask their copy of each x tile with the contract's mask (64-bit seed, counter offset; rows of the
    # last row block past M and K's partial 8-groups and tiles); y's base GEMM reads the unmasked x
    cb = _cb()
    x, W, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype, True)
    assert cb.forward_path(x, W, b, A, B, p).startswith("sm90 fused (")
    assert_cuda_forward(cb, x, W, b, A, B, S, p=p, seed=(1 << 40) + 987654321, offset=offset)


@pytest.mark.parametrize("mode,r", [(1, 64), (2, 16)])
def test_fused_forward_dropout_device_seed_and_grads(mode, r):
    """A device seed (0-d int64 tensor, read by the kernel) gives the mask of the same 64 bits by value; the public
    op's grads with the fused forward's u at p > 0 (the backward regenerates the mask) meet the rule. Mode 1: the u
    tiles; mode 2: the lead tiles (r = 16: 2 of them per row block)."""
    cb = _cb()
    previous = cb.set_fused_forward(mode)
    try:
        x, W, b, A, B = _inputs(777, 1024, 520, 24, torch.bfloat16, torch.float32, True)
        assert cb.forward_path(x, W, b, A, B, 0.2).startswith("sm90 fused lead (" if mode == 2 else "sm90 fused (")
        seed = (1 << 33) + 5
        y1, u1 = cb.forward(x, W, b, A, B, S, 0.2, seed, 99)
        y2, u2 = cb.forward(x, W, b, A, B, S, 0.2, torch.tensor(seed, dtype=torch.int64, device="cuda"), 99)
        assert torch.equal(y1, y2) and torch.equal(u1, u2)
        run_and_check("cuda", "cuda", torch.bfloat16, (3, 100), 520, 1024, r, bias=True, p=0.2,
                      adapter_dtype=torch.float32)
    finally:
        cb.set_fused_forward(previous)


def test_fused_forward_dropout_paths():
    """With dropout the default takes the shrink + GEMM path and says why; mode 2 takes the lead tiles with fp32
    adapters on bf16 x, and says why not otherwise."""
    cb = _cb()
    assert "(fused: dropout (the fused kernel's masking is slower than the shrink pass" in _path(
        256, 512, 512, 16, p=0.1)
    previous = cb.set_fused_forward(2)
    try:
        assert _path(256, 512, 512, 16, p=0.1).startswith("sm90 fused lead (")
        assert _path(256, 512, 1024, 64, p=0.1).startswith("sm90 fused lead (")
        assert "(fused: lead tiles with dropout: fp32 adapters on bf16 x only" in _path(
            256, 512, 512, 16, p=0.1, adapter_dtype=torch.bfloat16)
        assert "(fused: lead tiles with dropout: fp32 adapters on bf16 x only" in _path(
            256, 512, 512, 16, p=0.1, dtype=torch.float16, adapter_dtype=torch.float16)
        assert "(fused: lead tiles: fewer output tile columns than lead tiles" in _path(256, 512, 136, 24, p=0.1)
    finally:
        cb.set_fused_forward(previous)


@pytest.mark.parametrize("M,K,N,r,p,offset", [(300, 200, 136, 16, 0.1, 0), (1000, 520, 1032, 33, 0.3, 12345),
                                              (129, 4096, 264, 24, 0.5, 7), (4099, 1000, 392, 8, 0.05, 0),
                                              (65, 72, 8, 1, 0.9, 3), (2048, 4096, 1024, 64, 0.1, 5),
                                              (1025, 1024, 4096, 16, 0.2, 1 << 33)])
@pytest.mark.usefixtures("fused_lead")
def test_lead_tiles_dropout_against_float64(M, K, N, r, p, offset):
    # the lead tiles mask x's copy in registers with the contract's mask (64-bit seed and offset; rows of the last
    # row block past M; K % 64 == 0, whose keep bytes load 8 at a time, and K's partial tiles and 8-groups byte by
    # byte); every lead-tile count from 1 to 8 (all tiles of a row block at 2048 x 4096 -> 1024, r = 64); y's base
    # GEMM reads the unmasked x
    cb = _cb()
    x, W, b, A, B = _inputs(M, K, N, r, torch.bfloat16, torch.float32, True)
    assert cb.forward_path(x, W, b, A, B, p).startswith("sm90 fused lead (")
    assert_cuda_forward(cb, x, W, b, A, B, S, p=p, seed=(1 << 40) + 987654321, offset=offset)


@pytest.mark.usefixtures("fused_on")
def test_fused_forward_is_deterministic():
    assert_cuda_backend_deterministic(1333, 1024, 520, 16)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
@pytest.mark.parametrize("M,K,N,r", [(65, 64, 8, 1), (300, 200, 136, 16), (1000, 520, 1032, 17), (129, 4096, 264, 24),
                                     (257, 72, 4096, 64), (2048, 4096, 1024, 64), (4099, 1000, 392, 8),
                                     (4100, 520, 1032, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("fused_lead")
def test_lead_tiles_against_float64(dtype, adapter_dtype, M, K, N, r, bias):
    # every lead-tile count (fp32 adapters: 1 to 8 per row block, ceil(r / 8); 16-bit adapters: 1 or 2, ceil(r / 32);
    # odd ones leaving a cluster's second tile an ordinary one), partial tiles in M, N and K, all tiles of a row block
    # lead tiles (2048 x 4096 -> 1024, r = 64, fp32 adapters), lead tiles in the second wave of items, which take
    # their K-tiles and lora_A's slots in decreasing order (4100 x 520 -> 1032, r = 64, fp32 adapters: 132 lead
    # clusters)
    _check_forward(M, K, N, r, dtype, adapter_dtype, bias, path="sm90 fused lead (")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", [(300, 520, 136, 48), (1000, 264, 264, 64), (129, 4096, 136, 24)])
@pytest.mark.usefixtures("fused_lead")
def test_lead_tiles_of_32_columns_against_float64(dtype, M, K, N, r):
    # 16-bit adapters where ceil(r / 8) lead tiles of 8 u columns do not fit the output's tile columns: ceil(r / 32)
    # lead tiles of 32 columns (the other lead-tile tests' shapes take 8 columns per lead tile)
    _check_forward(M, K, N, r, dtype, dtype, True, path="sm90 fused lead (")


@pytest.mark.usefixtures("fused_lead")
def test_lead_tiles_fallback_says_why():
    assert "(fused: lead tiles: fewer output tile columns than lead tiles" in _path(256, 512, 72, 48)
    # 2 output tile columns: enough for 16-bit adapters' 2 lead tiles at r = 48, not for fp32 adapters' 6
    assert _path(256, 512, 136, 48, adapter_dtype=torch.bfloat16).startswith("sm90 fused lead")
    assert "(fused: lead tiles: fewer output tile columns than lead tiles" in _path(256, 512, 136, 48)


@pytest.mark.usefixtures("fused_lead")
def test_lead_tiles_op_grads_and_determinism():
    run_and_check("cuda", "cuda", torch.bfloat16, (3, 100), 520, 1024, 64, bias=True, p=0.0,
                  adapter_dtype=torch.float32)
    assert_cuda_backend_deterministic(1333, 1024, 520, 16)


@pytest.mark.skipif(SM90_TILE_FORCED, reason="LORA_KERNELS_SM90_GEMM_CONFIG forces the tile")
def test_wide_tile_where_the_gemm_takes_it():
    """Without dropout the lead tiles run on 128 x 256 tiles (the cooperative schedule) where the sm_90 GEMM picks
    that tile (K and N >= 2048, or K >= 2048 and 1.5 waves of those tiles) and the lead tiles fit in ceil(N / 256)
    tile columns; elsewhere on 128 x 128 tiles."""
    assert _path(256, 2048, 2048, 16).endswith(WIDE_TILE)
    assert _path(256, 2048, 2048, 64, adapter_dtype=torch.bfloat16).endswith(WIDE_TILE)
    assert _path(256, 2048, 2048, 16, dtype=torch.float16, adapter_dtype=torch.float16).endswith(WIDE_TILE)
    assert not _path(256, 2048, 1024, 16).endswith(WIDE_TILE)  # N < 2048
    # N < 2048 with at least 1.5 waves of 128 x 256 tiles (csrc/gemm_sm90.cu): 4 tile columns at N = 1024
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = 128 * -(-3 * sms // 8)
    assert _path(rows, 2048, 1024, 16, adapter_dtype=torch.bfloat16).endswith(WIDE_TILE)
    assert not _path(rows - 128, 2048, 1024, 16, adapter_dtype=torch.bfloat16).endswith(WIDE_TILE)
    assert not _path(256, 1024, 4096, 16).endswith(WIDE_TILE)  # K < 2048
    assert _path(256, 2048, 2048, 64).endswith(WIDE_TILE)  # fp32 adapters: 8 lead tiles in 8 tile columns of 256
    assert not _path(256, 2048, 2048, 16, p=0.1).endswith(WIDE_TILE)  # dropout: the shrink + GEMM path
    previous = _cb().set_fused_forward(2)
    try:
        assert not _path(256, 2048, 2048, 16, p=0.1).endswith(WIDE_TILE)  # dropout: the 128 x 128 lead tiles
    finally:
        _cb().set_fused_forward(previous)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
@pytest.mark.parametrize("M,K,N,r", [(300, 2048, 2056, 16), (1000, 2056, 2048, 32), (129, 4096, 2304, 8),
                                     (4099, 2048, 4096, 24), (2048, 2048, 2048, 64), (1, 2048, 2048, 3),
                                     (6400, 2048, 1000, 16)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("fused_lead")
def test_wide_lead_tiles_against_float64(dtype, adapter_dtype, M, K, N, r, bias):
    # the wide variant: each warpgroup computes its own 64 rows of u and counts itself in; every lead-tile count
    # from 1 to 8 (fp32 adapters at r = 64 and N = 2048: all 8 tile columns of 256 lead), a partial last tile
    # column (N = 2056: 9 columns of 256, the fifth cluster's second tile past N) and K-tile, M = 1 and many row
    # blocks waiting on their lead tiles
    cb = _cb()
    x, W, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype, bias)
    small_m = cb.set_small_m(False)  # M = 1 would take the small-M kernel
    try:
        path = cb.forward_path(x, W, b, A, B, 0.0)
        assert path.startswith("sm90 fused lead (") and (SM90_TILE_FORCED or path.endswith(WIDE_TILE)), path
        assert_cuda_forward(cb, x, W, b, A, B, S)
    finally:
        cb.set_small_m(small_m)


def test_wide_lead_tiles_op_grads_and_determinism():
    run_and_check("cuda", "cuda", torch.bfloat16, (3, 700), 2048, 2048, 32, bias=True, p=0.0,
                  adapter_dtype=torch.float32)
    run_and_check("cuda", "cuda", torch.bfloat16, (1333,), 2048, 2304, 64, bias=False, p=0.0,
                  adapter_dtype=torch.bfloat16)
    assert_cuda_backend_deterministic(1333, 2048, 2048, 16)


SPLIT = " cluster-split u"


@pytest.fixture
def fused_split():
    """The split variant wherever it can run (set_fused_split(1)): clusters of two 128 x 256 tiles that share u's
    K-tiles through distributed shared memory, in place of lead tiles (16-bit adapters read as they are, p = 0, the
    wide tile)."""
    previous = _cb().set_fused_split(1)
    yield
    _cb().set_fused_split(previous)


@pytest.mark.skipif(SM90_TILE_FORCED, reason="LORA_KERNELS_SM90_GEMM_CONFIG forces the tile")
def test_split_variant_where_it_runs():
    """By default the split variant runs where the wide lead tiles would read 16-bit adapters as they are at p = 0 and
    N <= 1024 (two clusters span the row block); set_fused_split(1) takes it wherever it can run, dropout on bf16 x
    included, (0) nowhere."""
    bf = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = 128 * -(-3 * sms // 8)  # 1.5 waves of 128 x 256 tiles at N = 1024: the wide tile
    assert SPLIT in _path(rows, 2048, 1024, 16, adapter_dtype=bf)
    assert SPLIT in _path(rows, 2048, 1024, 32, dtype=torch.float16, adapter_dtype=torch.float16)
    assert SPLIT in _path(rows, 2048, 1000, 8, adapter_dtype=bf)
    assert SPLIT in _path(rows, 2048, 1024, 64, adapter_dtype=bf)
    assert SPLIT not in _path(rows, 2048, 1024, 16)  # fp32 adapters: the lead tiles' pieces
    assert SPLIT not in _path(rows, 2048, 1024, 12, adapter_dtype=bf)  # r % 8: the prep's operands
    assert SPLIT not in _path(rows, 2048, 1024, 16, p=0.1, adapter_dtype=bf)  # dropout: only where asked for
    assert SPLIT not in _path(256, 2048, 2048, 16, adapter_dtype=bf)  # N > 1024
    assert SPLIT not in _path(rows - 128, 2048, 1024, 16, adapter_dtype=bf)  # the 128 x 128 tile
    cb = _cb()
    previous = cb.set_fused_split(1)
    try:
        assert _path(256, 2048, 2048, 64, adapter_dtype=bf).endswith(SPLIT + WIDE_TILE)
        assert SPLIT not in _path(256, 2048, 2048, 16)  # fp32 adapters: never
        assert SPLIT not in _path(256, 1024, 4096, 16, adapter_dtype=bf)  # K < 2048: the 128 x 128 tile
        assert _path(256, 2048, 2048, 16, p=0.3, adapter_dtype=bf).endswith(SPLIT + WIDE_TILE)
        dropped = _path(rows, 2048, 1024, 16, p=0.1, adapter_dtype=bf)  # dropout: x masked in registers
        assert dropped.endswith(SPLIT + WIDE_TILE) and " one launch" not in dropped, dropped  # the keep bits' launch
        assert SPLIT not in _path(rows, 2048, 1024, 16, p=0.1)  # fp32 adapters: the shrink + GEMM path
        assert SPLIT not in _path(rows, 2048, 1024, 16, p=0.1, dtype=torch.float16, adapter_dtype=torch.float16)
        cb.set_fused_split(0)
        assert SPLIT not in _path(rows, 2048, 1024, 16, adapter_dtype=bf)
        assert "(fused: dropout (the fused kernel's masking is slower" in _path(rows, 2048, 1024, 16, p=0.1,
                                                                               adapter_dtype=bf)
    finally:
        cb.set_fused_split(previous)


@pytest.mark.skipif(SM90_TILE_FORCED, reason="LORA_KERNELS_SM90_GEMM_CONFIG forces the tile")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", [(300, 2048, 2056, 16), (1000, 2056, 2048, 32), (129, 4096, 2304, 8),
                                     (4099, 2048, 4096, 24), (2048, 2048, 2048, 64), (1, 2048, 2048, 48),
                                     (6400, 2048, 1000, 16), (6437, 2056, 1024, 40), (700, 2048, 3000, 56)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("fused_split")
def test_split_variant_against_float64(dtype, M, K, N, r, bias):
    # every u width (16, 32, 64 columns: r = 8 .. 64, TMA's zeros past r), a partial last cluster (N = 1000: its
    # second tile partly past N; N = 2056: the fifth cluster's second tile past N) and K-tile, M = 1, several
    # cluster columns per row block (only the first writes u), row blocks past one wave of clusters
    cb = _cb()
    x, W, b, A, B = _inputs(M, K, N, r, dtype, dtype, bias)
    small_m = cb.set_small_m(False)  # M = 1 would take the small-M kernel
    try:
        path = cb.forward_path(x, W, b, A, B, 0.0)
        assert path.startswith("sm90 fused lead (") and path.endswith(SPLIT + WIDE_TILE), path
        assert_cuda_forward(cb, x, W, b, A, B, S)
    finally:
        cb.set_small_m(small_m)


@pytest.mark.skipif(SM90_TILE_FORCED, reason="LORA_KERNELS_SM90_GEMM_CONFIG forces the tile")
@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp16 x: not built (ptxas serialised its wgmmas)
@pytest.mark.parametrize("M,K,N,r,p,offset", [(300, 2048, 2056, 16, 0.1, 0), (1000, 2056, 2048, 32, 0.3, 12345),
                                              (129, 4096, 2304, 8, 0.5, 7), (2048, 2048, 2048, 64, 0.05, 1 << 33),
                                              (1, 2048, 2048, 48, 0.2, 3), (6437, 2056, 1024, 40, 0.1, 5),
                                              (700, 2104, 3000, 56, 0.9, 11)])
@pytest.mark.usefixtures("fused_split")
def test_split_variant_dropout_against_float64(dtype, M, K, N, r, p, offset):
    # each CTA masks its share's x tiles in registers with the contract's mask (64-bit seed, counter offset; rows of
    # the last row block past M; K % 64 == 0, whose keep bytes load 8 at a time, and K's partial tiles and 8-groups
    # byte by byte: K = 2056, 2104); every u width; y's base GEMM reads the unmasked x
    cb = _cb()
    x, W, b, A, B = _inputs(M, K, N, r, dtype, dtype, True)
    small_m = cb.set_small_m(False)
    try:
        path = cb.forward_path(x, W, b, A, B, p)
        assert path.startswith("sm90 fused lead (") and path.endswith(SPLIT + WIDE_TILE), path
        assert_cuda_forward(cb, x, W, b, A, B, S, p=p, seed=(1 << 40) + 987654321, offset=offset)
    finally:
        cb.set_small_m(small_m)


@pytest.mark.skipif(SM90_TILE_FORCED, reason="LORA_KERNELS_SM90_GEMM_CONFIG forces the tile")
@pytest.mark.usefixtures("fused_split")
def test_split_variant_dropout_device_seed_grads_and_determinism():
    """The dropout cells where the default takes it at p = 0 (N <= 1024, the wide tile's row count): float64 checks,
    a device seed giving the bits of the same 64 bits by value, the public op's grads (the backward regenerates the
    mask), and the same bits twice."""
    cb = _cb()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = 128 * -(-3 * sms // 8)
    for r, p in ((16, 0.1), (32, 0.25), (64, 0.1)):
        x, W, b, A, B = _inputs(rows + 57, 2048, 1024, r, torch.bfloat16, torch.bfloat16, True)
        assert SPLIT in cb.forward_path(x, W, b, A, B, p)
        assert_cuda_forward(cb, x, W, b, A, B, S, p=p, seed=12345, offset=64)
    x, W, b, A, B = _inputs(rows, 2048, 1024, 16, torch.float16, torch.float16, True)
    assert SPLIT not in cb.forward_path(x, W, b, A, B, 0.1)  # fp16 x with dropout: the shrink + GEMM path
    x, W, b, A, B = _inputs(rows, 2048, 1024, 16, torch.bfloat16, torch.bfloat16, False)
    seed = (1 << 33) + 5
    y1, u1 = cb.forward(x, W, b, A, B, S, 0.1, seed, 99)
    y2, u2 = cb.forward(x, W, b, A, B, S, 0.1, torch.tensor(seed, dtype=torch.int64, device="cuda"), 99)
    y3, u3 = cb.forward(x, W, b, A, B, S, 0.1, seed, 99)
    assert torch.equal(y1, y2) and torch.equal(u1, u2) and torch.equal(y1, y3) and torch.equal(u1, u3)
    run_and_check("cuda", "cuda", torch.bfloat16, (3, rows // 3 + 5), 2048, 1024, 16, bias=True, p=0.1,
                  adapter_dtype=torch.bfloat16)


@pytest.mark.skipif(SM90_TILE_FORCED, reason="LORA_KERNELS_SM90_GEMM_CONFIG forces the tile")
def test_split_variant_by_default_against_float64_and_deterministic():
    # the default's own cells (N <= 1024, the wide tile's row count), the module-level op with grads, and the same
    # bits twice
    cb = _cb()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = 128 * -(-3 * sms // 8)
    for dtype, r in ((torch.bfloat16, 16), (torch.float16, 32), (torch.bfloat16, 64)):
        x, W, b, A, B = _inputs(rows + 57, 2048, 1024, r, dtype, dtype, True)
        assert SPLIT in cb.forward_path(x, W, b, A, B, 0.0)
        assert_cuda_forward(cb, x, W, b, A, B, S)
    run_and_check("cuda", "cuda", torch.bfloat16, (3, rows // 3 + 5), 2048, 1024, 16, bias=True, p=0.0,
                  adapter_dtype=torch.bfloat16)
    x, W, b, A, B = _inputs(rows, 2048, 1024, 16, torch.bfloat16, torch.bfloat16, False)
    first = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    second = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.skipif(SM90_TILE_FORCED, reason="LORA_KERNELS_SM90_GEMM_CONFIG forces the tile")
@pytest.mark.usefixtures("fused_split")
def test_split_variant_on_two_streams_and_in_a_graph():
    """No state outside the launch: calls on two streams and a replayed graph give the eager call's bits."""
    cb = _cb()
    x, W, b, A, B = _inputs(2048, 2048, 2048, 32, torch.bfloat16, torch.bfloat16, True)
    for p in (0.0, 0.1):  # with dropout: the keep bits' pass and the masking kernel
        assert SPLIT in cb.forward_path(x, W, b, A, B, p)
        _assert_streams_and_graph(cb, x, W, b, A, B, p)
