"""The cuda backend's small-M forward (csrc/small_m.cu): for M <= 64 the whole forward, y = x W^T + b + s u B^T and the
saved u = s/(1-p) dropout(x) A^T, is one kernel launch (with dropout: 16-bit x with 16-byte aligned rows, the
register-direct kernel). GPU-only (skips elsewhere): the path is taken where it should be (forward_path, and a
profiler count of one kernel), it says why where it is not (dropout with fp32 or misaligned x among the reasons),
and y, u and the grads meet the float64 tolerance rule (error at most 2x the
same-precision PyTorch computation's, plus a floor) with every output poisoned first, for K and N that are not
multiples of any tile, every x dtype, fp32 and 16-bit adapters, with and without bias, misaligned inputs, and grids with
fewer y tiles than u items (N small next to M * r / 32: the blocks compute the unclaimed items at their epilogue) and
fewer item blocks than items (256 tiles at N = 4096 fill the H200's 264 slots but 8: rd_item_blocks). The
kernel's grid-wide counters are checked across streams and CUDA graph replays. With dropout, the same checks hold
(the contract's mask: assert_cuda_forward's reference), and for the forward that small M takes where this one does
not. On Hopper: the wgmma forward (csrc/small_m_sm90.cu) and the two-launch backward (that kernel transposed for dx,
then csrc/small_m_grads.cu for dA and dB) against float64, forced plans, fp32 adapters through their opt-in."""
import pytest
import torch

import lora_kernels

from conftest import HAS_CUDA, assert_cuda_forward, check_lora_linear
from test_contract import run_and_check

pytestmark = [
    pytest.mark.usefixtures("poisoned_outputs"),
    pytest.mark.skipif(not HAS_CUDA or "cuda" not in lora_kernels.available_backends(),
                       reason="needs the cuda backend on a GPU"),
]
S = 0.75
DROPOUT_WHY = ("(small_m: dropout needs the register-direct kernel (16-bit x, K % 8 == 0, 16-byte aligned x, W and "
               "lora_A))")
FP32_MR_WHY = "(small_m: M * r is above 2048 with fp32 x)"  # the FFMA kernel's limit (csrc/small_m.cu, Limits)


def _cb():
    from lora_kernels.backends import cuda_backend

    return cuda_backend


def _inputs(M, K, N, r, dtype, adapter_dtype, bias, misaligned=False):
    def rn(*shape, dt=dtype, std=1.0):
        t = (torch.randn(*shape, device="cuda") * std).to(dt)
        if misaligned:  # same values at an address 2 elements past an aligned one: no 16-byte vector loads
            buf = torch.empty(t.numel() + 2, device="cuda", dtype=dt)
            buf[2:].copy_(t.reshape(-1))
            t = buf[2:].view(*shape)
        return t

    x = rn(M, K)
    W = rn(N, K, std=K ** -0.5)
    b = rn(N) if bias else None
    A = rn(r, K, dt=adapter_dtype, std=K ** -0.5)
    B = rn(N, r, dt=adapter_dtype, std=r ** -0.5)
    return x, W, b, A, B


def _fp32_opt_in():
    """LORA_KERNELS_SMALL_M_SM90_FP32=1: the Hopper kernels take fp32 adapters (read once per process)."""
    import os

    return os.environ.get("LORA_KERNELS_SMALL_M_SM90_FP32") == "1"


def _sm90_kernel_expected(M, K, r, dtype, adapter_dtype, p, misaligned=False):
    """Where the small-M forward runs its Hopper kernel (csrc/small_m_sm90.cu): p = 0, x and both adapters in one
    16-bit dtype (or, opt-in, fp32 adapters on bf16 x at r <= 16), r and K multiples of 8, 16-byte aligned operands,
    on compute capability 9.0."""
    adapters = adapter_dtype == dtype or (
        _fp32_opt_in() and adapter_dtype == torch.float32 and dtype == torch.bfloat16 and r <= 16)
    return (torch.cuda.get_device_capability() == (9, 0) and p == 0 and dtype != torch.float32
            and adapters and r % 8 == 0 and K % 8 == 0 and not misaligned and 1 <= M <= 64)


def _small_m_path(M, K, r, dtype, adapter_dtype, p, misaligned=False):
    return "small_m sm90" if _sm90_kernel_expected(M, K, r, dtype, adapter_dtype, p, misaligned) else "small_m"


def _check_forward(M, K, N, r, dtype, adapter_dtype, bias, p, misaligned=False, seed=1234):
    cb = _cb()
    x, W, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype, bias, misaligned)
    path = cb.forward_path(x, W, b, A, B, p)
    if p == 0 and dtype == torch.float32 and M * r > 2048:
        assert path.endswith(FP32_MR_WHY), path
    elif p == 0 or (dtype != torch.float32 and K % 8 == 0 and not misaligned):
        assert path == _small_m_path(M, K, r, dtype, adapter_dtype, p, misaligned), path
    else:
        assert path.endswith(DROPOUT_WHY), path
    assert_cuda_forward(cb, x, W, b, A, B, S, p, seed)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float32), (torch.float16, torch.float16),
                                                 (torch.float32, torch.float32)])
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (16, 4096, 1000, 16), (64, 1000, 4104, 16),
                                     (7, 37, 24, 8), (17, 200, 100, 32), (33, 72, 40, 1), (64, 130, 300, 32),
                                     (32, 520, 264, 64), (5, 1, 3, 4), (64, 64, 24, 32),
                                     (64, 300, 40, 64), (48, 4096, 16, 64), (16, 1024, 4096, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_small_m_forward_against_float64(dtype, adapter_dtype, M, K, N, r, bias):
    _check_forward(M, K, N, r, dtype, adapter_dtype, bias, 0.0)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                                 (torch.float32, torch.float32)])
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 512, 16), (8, 4096, 264, 16), (7, 37, 24, 8), (64, 500, 72, 32),
                                     (3, 12, 1, 1), (17, 200, 100, 32), (64, 1000, 4104, 16), (33, 72, 40, 1),
                                     (48, 4096, 16, 64)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_small_m_with_dropout(dtype, adapter_dtype, M, K, N, r, p):
    # 16-bit x with K % 8 == 0: the one-launch kernel masks its u items; K = 37, 500, 12 and fp32 x: the unfused path
    _check_forward(M, K, N, r, dtype, adapter_dtype, True, p, seed=2**61 + 12345)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_small_m_misaligned_inputs(dtype, adapter_dtype):
    # every operand 2 elements off a 16-byte boundary: the copies and A's float4 loads take their scalar fallbacks
    _check_forward(19, 136, 72, 16, dtype, adapter_dtype, True, 0.0, misaligned=True)
    _check_forward(5, 64, 40, 8, dtype, adapter_dtype, True, 0.2, misaligned=True)  # dropout: the unfused forward


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
@pytest.mark.parametrize("lead,K,N,r,p", [((1,), 4096, 4096, 16, 0.0), ((4, 16), 136, 200, 16, 0.0),
                                          ((3, 7), 36, 44, 8, 0.0), ((64,), 1000, 72, 32, 0.0),
                                          ((1,), 4096, 4096, 16, 0.1), ((4, 16), 136, 200, 16, 0.5),
                                          ((64,), 1000, 72, 32, 0.1)])
def test_small_m_op_grads(dtype, adapter_dtype, lead, K, N, r, p):
    # the public op end to end (forward by the small-M kernel, backward as before, the saved u included; with
    # dropout the backward regenerates the forward's mask)
    x = torch.empty(*lead, K)
    cb = _cb()
    path = cb.forward_path(x.reshape(-1, K).to("cuda", dtype), torch.empty(N, K, device="cuda", dtype=dtype), None,
                           torch.empty(r, K, device="cuda", dtype=adapter_dtype),
                           torch.empty(N, r, device="cuda", dtype=adapter_dtype), p)
    want = _small_m_path(x.reshape(-1, K).shape[0], K, r, dtype, adapter_dtype, p)
    assert path == want if p == 0 or dtype != torch.float32 else path.endswith(DROPOUT_WHY), path
    run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=p, adapter_dtype=adapter_dtype)


def test_small_m_is_one_launch():
    """The forward of M <= 64 launches one kernel (no shrink, reduce, pack, prefill or cuBLAS GEMM)."""
    cb = _cb()
    for M, p, adapter_dtype in ((1, 0.0, torch.float32), (16, 0.0, torch.bfloat16), (64, 0.0, torch.float32),
                                (4, 0.0, torch.bfloat16), (16, 0.1, torch.float32), (64, 0.5, torch.bfloat16)):
        x, W, b, A, B = _inputs(M, 4096, 4096, 16, torch.bfloat16, adapter_dtype, True)
        with torch.no_grad():
            for _ in range(2):
                lora_kernels.lora_linear(x, W, b, A, B, S, dropout_p=p, backend="cuda")
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                lora_kernels.lora_linear(x, W, b, A, B, S, dropout_p=p, backend="cuda")
                torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 1 and "small_m" in kernels[0], (M, p, kernels)


def test_paths_say_why():
    """The mma.sync kernels' reasons (the Hopper kernel switched off: fp32 adapters at r <= 16 would take it)."""
    cb = _cb()
    previous_sm90 = cb.set_small_m_sm90(False)
    try:
        _paths_say_why(cb)
    finally:
        cb.set_small_m_sm90(previous_sm90)


def _paths_say_why(cb):

    def path(M, K, N, r, p=0.0, dtype=torch.bfloat16):
        x, W, b, A, B = _inputs(M, K, N, r, dtype, torch.float32, False)
        return cb.forward_path(x, W, b, A, B, p)

    assert path(64, 64, 64, 32) == "small_m"
    assert path(65, 64, 64, 16).endswith("(small_m: M is not in 1..64)")
    assert path(32, 64, 64, 64) == "small_m"
    assert path(64, 64, 64, 64) == "small_m"
    assert path(16, 64, 64, 65).endswith("(small_m: r is above 64)")
    assert path(64, 64, 64, 64, dtype=torch.float32).endswith("(small_m: M * r is above 2048 with fp32 x)")
    assert path(1, 64, 64, 16, p=0.1) == "small_m"
    assert path(64, 4096, 64, 16, p=0.5) == "small_m"
    assert path(1, 64, 64, 16, p=0.1, dtype=torch.float32).endswith(DROPOUT_WHY)
    assert path(1, 60, 64, 16, p=0.1).endswith(DROPOUT_WHY)
    # above M = 16 with N / 128 >= SMs / 2 (csrc/binding.cpp, small_m_unsupported): the fused forward where it runs
    wide = 128 * torch.cuda.get_device_properties(0).multi_processor_count // 2
    assert path(16, 1024, wide, 16) == "small_m"
    assert path(17, 1024, wide - 128, 16) == "small_m"
    if torch.cuda.get_device_capability() == (9, 0):
        assert path(17, 1024, wide, 16).startswith("sm90 fused"), path(17, 1024, wide, 16)
        assert path(17, 1024, wide, 16).endswith(
            "(small_m: M > 16 with N / 128 >= SMs / 2: the fused forward is faster)")
    assert path(17, 1024, wide, 16, p=0.1) == "small_m"  # dropout: the fused forward does not take it
    previous = cb.set_small_m(False)
    try:
        assert path(1, 64, 64, 16).endswith("(small_m: off (LORA_KERNELS_SMALL_M=0 or set_small_m))")
    finally:
        cb.set_small_m(previous)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_small_m_matches_the_unfused_path(p):
    """Against the multi-launch forward (the small-M kernel switched off), same seed: the same u to fp32 rounding (the
    same mask). Without dropout y agrees within a unit in the last place; with dropout the multi-launch forward is
    another chain of roundings (its y differed from this one's by 0.0137 at |y| = 0.21 on the H200, where the terms
    of y are larger and cancel), so each y meets the float64 tolerance rule on its own instead."""
    cb = _cb()
    x, W, b, A, B = _inputs(24, 1024, 520, 16, torch.bfloat16, torch.float32, True)
    seed = 2**40 + 77
    assert cb.forward_path(x, W, b, A, B, p) == _small_m_path(24, 1024, 16, torch.bfloat16, torch.float32, p)
    y1, u1 = cb.forward(x, W, b, A, B, S, p, seed, 0)
    previous = cb.set_small_m(False)
    try:
        assert not cb.forward_path(x, W, b, A, B, p).startswith("small_m")
        y0, u0 = cb.forward(x, W, b, A, B, S, p, seed, 0)
    finally:
        cb.set_small_m(previous)
    torch.testing.assert_close(u1, u0, rtol=1e-5, atol=1e-6)
    if p == 0:
        torch.testing.assert_close(y1.float(), y0.float(), rtol=2 ** -7, atol=1e-2)
        return
    assert_cuda_forward(cb, x, W, b, A, B, S, p, seed)
    previous = cb.set_small_m(False)
    try:
        assert_cuda_forward(cb, x, W, b, A, B, S, p, seed)
    finally:
        cb.set_small_m(previous)


def _streams_and_graph_replays(x, W, b, A, B, launches=6, replays=3):
    """Back-to-back forwards alternating between two streams, and a captured graph replayed `replays` times into
    NaN-filled outputs, each give the eager y and u bit for bit."""
    cb = _cb()
    y_ref, u_ref = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    outs = []
    for i in range(launches):
        with torch.cuda.stream(side if i % 2 else torch.cuda.current_stream()):
            outs.append(cb.forward(x, W, b, A, B, S, 0.0, 0, 0))
    torch.cuda.current_stream().wait_stream(side)
    for y, u in outs:
        assert torch.equal(y, y_ref) and torch.equal(u, u_ref)
    g = torch.cuda.CUDAGraph()
    cap = torch.cuda.Stream()
    cap.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(cap):
        cb.forward(x, W, b, A, B, S, 0.0, 0, 0)  # warm-up on the capture stream (its counters made outside capture)
        with torch.cuda.graph(g, stream=cap):
            y_g, u_g = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    torch.cuda.current_stream().wait_stream(cap)
    for _ in range(replays):
        y_g.fill_(float("nan"))
        u_g.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_g, y_ref) and torch.equal(u_g, u_ref)


def test_small_m_streams_and_graph_replays():
    """The kernel's claim / done / exit counters (one buffer per stream, reset by the last block of each launch):
    back-to-back launches on two streams, and a captured graph replayed several times, give the eager result."""
    x, W, b, A, B = _inputs(16, 1024, 4096, 16, torch.bfloat16, torch.float32, True)
    previous = _cb().set_small_m_sm90(False)  # the mma.sync kernel's counters (fp32 adapters: else the Hopper kernel)
    try:
        assert _cb().forward_path(x, W, b, A, B, 0.0) == "small_m"
        _streams_and_graph_replays(x, W, b, A, B)
    finally:
        _cb().set_small_m_sm90(previous)


# ------------------------------------------------------------------ the Hopper kernel (csrc/small_m_sm90.cu)
needs_sm90 = pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() != (9, 0),
                                reason="needs a compute capability 9.0 GPU")


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", [
    (1, 4096, 4096, 16),    # 16 tokens (15 zero rows), clusters of 4
    (16, 4096, 14336, 16),  # 112 row blocks: no K split
    (17, 4096, 1024, 32),   # 32 tokens, clusters of 8
    (33, 1000, 4104, 8),    # 48 tokens; K and N not multiples of the tiles (a partial last K tile and row block)
    (48, 520, 300, 64),     # r = 64: every row of lora_A's tile
    (64, 4096, 4096, 64),
    (64, 136, 200, 24),     # 3 K tiles: no split; r not a multiple of 16 (the expand's K padded with zeros)
    (5, 8, 40, 8),          # K = 8: one partial K tile
    (64, 14336, 4096, 16),  # long K, clusters of 4
])
@pytest.mark.parametrize("bias", [True, False])
def test_sm90_kernel_against_float64(dtype, M, K, N, r, bias):
    """y and the saved u against the float64 formula (tolerance rule, outputs poisoned first), on the Hopper kernel:
    every token count (16 to 64 wgmma columns), cluster sizes 1 to 8, partial tiles along K and N, r from 8 to 64."""
    _check_forward(M, K, N, r, dtype, dtype, bias, 0.0)
    assert _cb().forward_path(*_inputs(M, K, N, r, dtype, dtype, bias), 0.0) == "small_m sm90"


@needs_sm90
def test_sm90_kernel_says_why_not():
    """The inputs it declines go to the mma.sync kernels, each with its reason (the wgmma kernel's reasons are not in
    forward_path: the call is still a one-launch small-M forward)."""
    cb = _cb()

    def path(M=16, K=256, N=256, r=16, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16, p=0.0, mis=False):
        return cb.forward_path(*_inputs(M, K, N, r, dtype, adapter_dtype, False, misaligned=mis), p)

    assert path() == "small_m sm90"
    assert path(adapter_dtype=torch.float32) == "small_m"  # fp32 adapters (opt-in)
    assert path(p=0.1) == "small_m"                         # dropout: the register-direct kernel masks its u items
    assert path(r=12) == "small_m"                          # r not a multiple of 8
    assert path(K=60) == "small_m"                          # K not a multiple of 8
    assert path(mis=True) == "small_m"                      # not 16-byte aligned
    assert path(dtype=torch.float32, adapter_dtype=torch.float32) == "small_m"
    previous = cb.set_small_m_sm90(False)
    try:
        assert path() == "small_m"
    finally:
        cb.set_small_m_sm90(previous)


@needs_sm90
@pytest.mark.parametrize("M,K,N,r", [(16, 4096, 4096, 16), (64, 1000, 4104, 32)])
def test_sm90_kernel_matches_mma_sync_kernel(M, K, N, r):
    """The same inputs through the wgmma kernel and through the mma.sync kernel (set_small_m_sm90(False)): u agrees
    to fp32 rounding, y within a unit in the last place (both sum fp32 products, in different orders)."""
    cb = _cb()
    x, W, b, A, B = _inputs(M, K, N, r, torch.bfloat16, torch.bfloat16, True)
    y1, u1 = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    previous = cb.set_small_m_sm90(False)
    try:
        assert cb.forward_path(x, W, b, A, B, 0.0) == "small_m"
        y0, u0 = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    finally:
        cb.set_small_m_sm90(previous)
    torch.testing.assert_close(u1, u0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y1.float(), y0.float(), rtol=2 ** -7, atol=1e-2)


@needs_sm90
def test_sm90_kernel_streams_and_graph_replays():
    """Cluster launches on two streams and in a captured graph give the eager bits (no state across launches)."""
    x, W, b, A, B = _inputs(32, 2048, 4096, 16, torch.bfloat16, torch.bfloat16, True)
    assert _cb().forward_path(x, W, b, A, B, 0.0) == "small_m sm90"
    _streams_and_graph_replays(x, W, b, A, B, launches=4, replays=2)


def _run_with_env(body: str, **env) -> None:
    """Runs `body` (Python, with `torch` and this module as `t`) in a fresh process with the given environment
    settings, which the extension reads once per process, the caching allocator's free blocks filled with NaN first
    (an unwritten output shows); the body must end by printing "ok"."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import torch, test_small_m as t\n"
            "pool = [torch.full((n,), float('nan'), device='cuda') for n in [256 * 1024] * 64 + [64 * 1024 * 1024]]\n"
            "del pool\n" + body)
    full_env = dict(os.environ, **env, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@needs_sm90
@pytest.mark.parametrize("cluster,bn", [(1, 128), (2, 64), (8, 64), (8, 128), (4, 64)])
def test_sm90_kernel_forced_plans(cluster, bn):
    """Every K split and tile height (LORA_KERNELS_SMALL_M_SM90_CLUSTER and _BN, read once per process: a subprocess
    per pair) meets the float64 tolerance rule, where the default would pick another plan: the forward and the
    transposed kernel's backward (there the split runs over N)."""
    _run_with_env(
        "for M, K, N, r in ((1, 4096, 4096, 16), (64, 1000, 4104, 32), (33, 520, 300, 8)):\n"
        "    t._check_forward(M, K, N, r, torch.bfloat16, torch.bfloat16, True, 0.0)\n"
        "for M, K, N, r in ((1, 4096, 4096, 16), (64, 4104, 1000, 32), (33, 296, 520, 8)):\n"
        "    t._check_sm90_backward(M, K, N, r, torch.bfloat16)\n"
        "print('ok')\n",
        LORA_KERNELS_SMALL_M_SM90_CLUSTER=str(cluster), LORA_KERNELS_SMALL_M_SM90_BN=str(bn))


@needs_sm90
def test_sm90_kernels_fp32_adapters_opt_in():
    """fp32 adapters on bf16 x (LORA_KERNELS_SMALL_M_SM90_FP32=1, in a subprocess: read once per process): the Hopper
    kernels take them at r <= 16 (lora_A's and lora_B's three bf16 pieces; U summed per stage in fp32 registers),
    forward and backward: y and u (fp32-accurate), and the grads, meet the float64 tolerance rule; r = 24 and fp16 x
    keep the mma.sync kernel and the backward's passes."""
    _run_with_env(
        "for M, K, N, r in ((1, 4096, 4096, 16), (16, 4096, 14336, 16), (33, 1000, 4104, 8), (64, 520, 300, 16),\n"
        "                   (5, 8, 40, 8), (64, 14336, 4096, 16)):\n"
        "    x, W, b, A, B = t._inputs(M, K, N, r, torch.bfloat16, torch.float32, True)\n"
        "    assert t._cb().forward_path(x, W, b, A, B, 0.0) == 'small_m sm90'\n"
        "    t.assert_cuda_forward(t._cb(), x, W, b, A, B, t.S, 0.0, 0)\n"
        "for r, dt in ((24, torch.bfloat16), (16, torch.float16)):\n"
        "    x, W, b, A, B = t._inputs(16, 256, 256, r, dt, torch.float32, False)\n"
        "    assert t._cb().forward_path(x, W, b, A, B, 0.0) == 'small_m'\n"
        "    assert t._cb().dx_path(x, W, A, B, 0.0) != 'small_m sm90'\n"
        "for M, K, N, r in ((1, 4096, 4096, 16), (16, 14336, 4096, 16), (33, 4104, 1000, 8), (64, 296, 520, 16),\n"
        "                   (5, 40, 8, 8)):\n"
        "    t._check_sm90_backward(M, K, N, r, torch.bfloat16, adapter_dtype=torch.float32)\n"
        "print('ok')\n",
        LORA_KERNELS_SMALL_M_SM90_FP32="1")


# ------------------------------------------ the backward on Hopper (small_m_sm90.cu transposed, small_m_grads.cu)
def _check_sm90_backward(M, K, N, r, dtype, lead=None, bias=True, adapter_dtype=None):
    """lora_linear's y and grads (x, A, B) against float64 (check_lora_linear: the tolerance rule, outputs poisoned
    by the caller's fixture or process), with dx on the small-M Hopper kernel (dx_path says so)."""
    x, W, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype or dtype, bias)
    assert _cb().dx_path(x, W, A, B, 0.0) == "small_m sm90"
    if lead is not None:
        x = x.reshape(*lead, K)
    check_lora_linear(x, W, b, A, B, S, 0.0, "cuda")


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", [
    (1, 4096, 4096, 16),    # 16 tokens, the split over N (clusters)
    (16, 14336, 4096, 16),  # dx has 14336 columns: 112 or 224 row blocks
    (17, 1024, 4096, 32),   # 32 tokens
    (33, 4104, 1000, 8),    # 48 tokens; K and N not multiples of the tiles (a partial last block and N tile)
    (48, 296, 520, 64),     # r = 64: every column of lora_B's rows
    (64, 4096, 4096, 64),
    (64, 200, 136, 24),     # r not a multiple of 16 (the expand's K padded with zero rows of lora_A)
    (5, 40, 8, 8),          # N = 8: one partial N tile
    (64, 4096, 14336, 16),  # long reduction
])
def test_sm90_backward_against_float64(dtype, M, K, N, r):
    """dx, dA and dB of a small-M call (and y) against float64 where the backward runs the transposed Hopper kernel
    and small_m_grads.cu: every token count, partial tiles along K and N, r from 8 to 64, fp16 and bf16."""
    _check_sm90_backward(M, K, N, r, dtype)


@needs_sm90
@pytest.mark.parametrize("lead", [(4, 16), (2, 3, 5)])
def test_sm90_backward_3d_inputs(lead):
    M = 1
    for d in lead:
        M *= d
    _check_sm90_backward(M, 264, 72, 16, torch.bfloat16, lead=lead, bias=False)


@needs_sm90
def test_sm90_backward_says_why_not():
    """The backward's dx path: the Hopper kernel at M <= 64 with 16-bit adapters in x's dtype and p = 0; the passes
    with cuBLAS elsewhere (fp32 adapters, dropout, N not a multiple of 8, M = 65, switched off)."""
    cb = _cb()

    def path(M=16, K=256, N=256, r=16, adapter_dtype=torch.bfloat16, p=0.0):
        x, W, _, A, B = _inputs(M, K, N, r, torch.bfloat16, adapter_dtype, False)
        return cb.dx_path(x, W, A, B, p)

    assert path() == "small_m sm90"
    for kw in ({"adapter_dtype": torch.float32, "r": 24}, {"p": 0.1}, {"N": 252}, {"M": 65}, {"r": 12}):
        assert path(**kw) != "small_m sm90", kw
    previous = cb.set_small_m_sm90_dx(False)
    try:
        assert path() != "small_m sm90"
    finally:
        cb.set_small_m_sm90_dx(previous)


@needs_sm90
@pytest.mark.parametrize("need", [(True, True, True), (True, False, True), (True, True, False), (True, False, False),
                                  (False, True, True)])
def test_sm90_backward_matches_the_passes(need):
    """The backward op with the Hopper kernel and with the passes (set_small_m_sm90_dx(False)), for every subset of
    grads asked for: the same grads within a few units in the last place (different fp32 summation orders), an empty
    tensor for each grad not asked for."""
    cb = _cb()
    M, K, N, r = 24, 1032, 2056, 16
    x, W, b, A, B = _inputs(M, K, N, r, torch.bfloat16, torch.bfloat16, True)
    _, u = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    got = cb.backward(dy, x, W, A, B, u, S, 0.0, 0, 0, *need)
    previous = cb.set_small_m_sm90_dx(False)
    try:
        want = cb.backward(dy, x, W, A, B, u, S, 0.0, 0, 0, *need)
    finally:
        cb.set_small_m_sm90_dx(previous)
    for name, asked, g, w in zip(("dx", "dA", "dB"), need, got, want):
        if not asked:
            assert g is None or g.numel() == 0, name
            continue
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float(), w.float(), rtol=2 ** -7, atol=2e-2 * w.float().abs().max().item(),
                                   msg=name)


@needs_sm90
def test_sm90_backward_is_two_launches():
    """A small-M backward on Hopper launches the dx kernel and the grads kernel, nothing else."""
    x, W, b, A, B = _inputs(16, 4096, 4096, 16, torch.bfloat16, torch.bfloat16, True)
    xg, Ag, Bg = (t.detach().clone().requires_grad_() for t in (x, A, B))
    for _ in range(2):
        lora_kernels.lora_linear(xg, W, b, Ag, Bg, S, backend="cuda").sum().backward()
    y = lora_kernels.lora_linear(xg, W, b, Ag, Bg, S, backend="cuda")
    dy = torch.randn_like(y)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y.backward(dy)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [k for k in kernels if "lora" in k or "small_m" in k]
    assert len(ours) == 2 and "small_m_sm90" in ours[0] and "small_m_grads" in ours[1], kernels


@needs_sm90
def test_sm90_backward_streams_and_graph_replays():
    """The backward in a captured graph, replayed, gives the eager bits (no state across launches)."""
    cb = _cb()
    x, W, b, A, B = _inputs(32, 2048, 4096, 16, torch.bfloat16, torch.bfloat16, True)
    _, u = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    dy = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    eager = cb.backward(dy, x, W, A, B, u, S, 0.0, 0, 0, True, True, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = cb.backward(dy, x, W, A, B, u, S, 0.0, 0, 0, True, True, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cb.backward(dy, x, W, A, B, u, S, 0.0, 0, 0, True, True, True)
    for _ in range(2):
        for t in captured:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for e, s_, c in zip(eager, on_side, captured):
            assert torch.equal(e, s_) and torch.equal(e, c)
