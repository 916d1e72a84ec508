"""The device-seed path (CUDA graphs, torch.compile): the dropout seed as a 0-d int64 tensor that the mask code reads
where it lives, never on the host. It must give the mask of the int path bit for bit for the same 64 bits.

No host read is proved on the meta device, where a tensor has no value: an int()/.item() of the seed raises there.
"""
import os

import pytest
import torch

import lora_kernels
from lora_kernels import _dispatch, ops
from lora_kernels.backends import cuda_backend, torch_ref
from lora_kernels.philox import dropout_bits, dropout_mask

from conftest import assert_tolerance, forbid_host_reads

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"

# top bit set (a negative int64), above 2^32, below 2^31, multiples of 16, 0 and 1: every class the int path handles
SEEDS = [0, 1, 16, 12345, 2**31 + 7, 2**40, 0x1234_5678_9ABC, 2**62 - 1, 2**63 + 5, 2**64 - 1]


def _as_tensor(seed: int, device="cpu") -> torch.Tensor:
    """The 64 bits of seed as a 0-d int64 tensor (values >= 2^63 wrap to negative, as the kernels read them)."""
    s = seed & (2**64 - 1)
    return torch.tensor(s - 2**64 if s >= 2**63 else s, dtype=torch.int64, device=device)


@pytest.mark.parametrize("seed", SEEDS)
def test_tensor_seed_mask_bit_identical(seed):
    offset = 2**32 - 3  # counters cross the 32-bit boundary
    for shape, p in [((37, 22), 0.4), ((5, 3, 64), 0.1), ((1, 9), 0.05)]:
        ref = dropout_mask(seed, offset, shape, p)
        got = dropout_mask(_as_tensor(seed), offset, shape, p)
        assert got.dtype == torch.bool and torch.equal(got, ref), (seed, shape, p)
        assert torch.equal(lora_kernels.dropout_mask(_as_tensor(seed), offset, shape, p), ref)
    assert torch.equal(dropout_bits(_as_tensor(seed), 7, (4, 40)), dropout_bits(seed, 7, (4, 40)))


def test_tensor_seed_is_never_read_on_the_host():
    """On the meta device the mask is built from shapes alone: any int(seed) / .item() would raise."""
    seed = torch.empty((), dtype=torch.int64, device="meta")
    with pytest.raises(Exception):
        int(seed)  # the premise: a host read of a meta tensor fails
    keep = dropout_mask(seed, 0, (8, 24), 0.3)
    assert keep.device.type == "meta" and keep.shape == (8, 24) and keep.dtype == torch.bool
    assert lora_kernels.dropout_mask(seed, 0, (8, 24), 0.3).device.type == "meta"
    # the reference backend, forward and backward, on meta tensors with a meta seed
    x, W, A, B = (torch.empty(s, device="meta") for s in [(8, 24), (16, 24), (4, 24), (16, 4)])
    y, u = torch_ref.forward(x, W, None, A, B, 2.0, 0.3, seed, 0)
    assert y.shape == (8, 16) and u.shape == (8, 4)
    dy = torch.empty(8, 16, device="meta")
    dx, dA, dB = torch_ref.backward(dy, x, W, A, B, u, 2.0, 0.3, seed, 0, True, True, True)
    assert dx.shape == x.shape and dA.shape == A.shape and dB.shape == B.shape


def test_op_passes_device_seed_to_backend(monkeypatch):
    """The registered ops hand a seed that is not on the CPU to the backend as the tensor itself (a CPU seed as an
    int): checked with a meta seed, whose value cannot be read."""
    seen = []
    real_fwd, real_bwd = torch_ref.forward, torch_ref.backward

    def fwd(*args):
        seen.append(("fwd", args[7]))
        return real_fwd(*args)

    def bwd(*args):
        seen.append(("bwd", args[8]))
        return real_bwd(*args)

    monkeypatch.setattr(torch_ref, "forward", fwd)
    monkeypatch.setattr(torch_ref, "backward", bwd)
    x, W, A, B = torch.randn(6, 24), torch.randn(16, 24), torch.randn(4, 24), torch.randn(16, 4)
    meta_seed = torch.empty((), dtype=torch.int64, device="meta")
    with pytest.raises(Exception):  # the CPU backend computes on CPU tensors: a meta seed cannot mix in; it got it
        ops._fwd_impl(x, W, None, A, B, 2.0, 0.3, meta_seed, 0, "torch")
    assert seen[-1][0] == "fwd" and seen[-1][1] is meta_seed
    cpu_seed = torch.tensor(99)
    ops._fwd_impl(x, W, None, A, B, 2.0, 0.3, cpu_seed, 0, "torch")
    assert seen[-1][1] == 99 and isinstance(seen[-1][1], int)
    ops._fwd_impl(x, W, None, A, B, 2.0, 0.0, meta_seed, 0, "torch")  # p == 0: the seed is never touched
    assert seen[-1][1] == 0


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reference_backend_tensor_seed_bit_identical(p):
    M, K, N, r = 19, 40, 24, 8
    x, W, b = torch.randn(M, K), torch.randn(N, K) / K**0.5, torch.randn(N)
    A, B, dy = torch.randn(r, K) / K**0.5, torch.randn(N, r), torch.randn(M, N)
    for seed in (7, 2**63 + 5):
        y0, u0 = torch_ref.forward(x, W, b, A, B, 1.5, p, seed, 3)
        y1, u1 = torch_ref.forward(x, W, b, A, B, 1.5, p, _as_tensor(seed), 3)
        assert torch.equal(y0, y1) and torch.equal(u0, u1)
        g0 = torch_ref.backward(dy, x, W, A, B, u0, 1.5, p, seed, 3, True, True, True)
        g1 = torch_ref.backward(dy, x, W, A, B, u0, 1.5, p, _as_tensor(seed), 3, True, True, True)
        for a, c in zip(g0, g1):
            assert torch.equal(a, c)


@pytest.mark.skipif(not _INTERP, reason="the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("small_m", [True, False], ids=["small_m", "tiled"])
def test_triton_tensor_seed_bit_identical(monkeypatch, small_m):
    """The Triton kernels with the seed read from a pointer (SEED_PTR) give the int path's outputs bit for bit. The
    host must not read the seed: int() and .item() of tensors raise during the pointer-path calls."""
    pytest.importorskip("triton")
    from lora_kernels.backends.triton import launch as tb

    monkeypatch.setattr(tb, "SMALL_M", 64 if small_m else 0)
    M, K, N, r, p, s = 37, 44, 40, 8, 0.3, 0.75
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=g).half()
    W, b = (torch.randn(N, K, generator=g) / K**0.5).half(), torch.randn(N, generator=g).half()
    A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g)
    dy = torch.randn(M, N, generator=g).half()
    for seed, offset in [(0x1234_5678_9ABC, 2**32 - 7), (2**63 + 5, 0), (16, 5)]:
        y0, u0 = tb.forward(x, W, b, A, B, s, p, seed, offset)
        g0 = tb.backward(dy, x, W, A, B, u0, s, p, seed, offset, True, True, True)
        seed_t = _as_tensor(seed)
        launches = []
        real_keep = tb._seed_args
        monkeypatch.setattr(tb, "_seed_args", lambda sd, dummy: launches.append(real_keep(sd, dummy)) or launches[-1])
        with monkeypatch.context() as m:
            forbid_host_reads(m)
            y1, u1 = tb.forward(x, W, b, A, B, s, p, seed_t, offset)
            g1 = tb.backward(dy, x, W, A, B, u1, s, p, seed_t, offset, True, True, True)
        monkeypatch.setattr(tb, "_seed_args", real_keep)
        assert launches and all(flag for _, _, flag in launches)  # every launch took the pointer path
        assert torch.equal(y0, y1) and torch.equal(u0, u1)
        for a, c in zip(g0, g1):
            assert torch.equal(a, c)
        keep = dropout_mask(seed, offset, (M, K), p)
        ref = (x.double() @ W.double().T + b.double()
               + s * ((x.double() * keep / (1 - p)) @ A.double().T) @ B.double().T)
        base = (x @ W.T + b + s * ((x * keep / (1 - p)) @ A.half().T) @ B.half().T)
        assert_tolerance(y1, ref, base, "y")


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in lora_kernels.available_backends(),
                    reason="needs the cuda backend on a GPU")
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype,adapter", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("M", [5, 37, 300])
def test_cuda_tensor_seed_bit_identical(monkeypatch, dtype, adapter, M):
    """The cuda backend's kernels with the seed read from device memory (seed_t) give the by-value path's outputs bit
    for bit, forward and backward, on every kernel family (tensor-core and FFMA: the shrink at M = 5, 37 and 300 (the
    small-M forward takes no dropout); dA and dx always), and the host never reads the seed."""
    _cuda_tensor_seed_check(monkeypatch, dtype, adapter, M)


def _cuda_tensor_seed_check(monkeypatch, dtype, adapter, M):
    K, N, r, p, s = 136, 72, 8, 0.3, 0.75
    g = torch.Generator(device="cuda").manual_seed(5)
    rn = lambda *sh, dt=dtype: torch.randn(*sh, generator=g, device="cuda").to(dt)  # noqa: E731
    x, W, b, dy = rn(M, K), rn(N, K) / K**0.5, rn(N), rn(M, N)
    A, B = rn(r, K, dt=adapter) / K**0.5, rn(N, r, dt=adapter)
    for seed, offset in [(0x1234_5678_9ABC, 2**32 - 7), (2**63 + 5, 0), (16, 5)]:
        seed_t = _as_tensor(seed, "cuda")
        if seed < 2**63:  # the by-value path takes seeds in [0, 2^63) (the op draws them below 2^62)
            y0, u0 = cuda_backend.forward(x, W, b, A, B, s, p, seed, offset)
            g0 = cuda_backend.backward(dy, x, W, A, B, u0, s, p, seed, offset, True, True, True)
        with monkeypatch.context() as m:
            forbid_host_reads(m)
            y1, u1 = cuda_backend.forward(x, W, b, A, B, s, p, seed_t, offset)
            g1 = cuda_backend.backward(dy, x, W, A, B, u1, s, p, seed_t, offset, True, True, True)
        keep = dropout_mask(seed, offset, (M, K), p, device="cuda")
        ref = (x.double() @ W.double().T + b.double()
               + s * ((x.double() * keep / (1 - p)) @ A.double().T) @ B.double().T)
        base = x @ W.T + b + s * ((x * keep / (1 - p)).to(adapter) @ A.T) @ B.T
        assert_tolerance(y1, ref, base.to(dtype), "y")
        if seed < 2**63:
            assert torch.equal(y0, y1) and torch.equal(u0, u1)
            for a, c in zip(g0, g1):
                assert torch.equal(a, c)


def test_cuda_backend_seed_args(monkeypatch):
    """The cuda backend hands a device seed to its ops as the tensor (the kernels read it when they run) and an int
    seed by value; an int seed with dropout under CUDA graph capture is refused (a baked-in seed would repeat one
    mask on every replay); without dropout nothing is read and capture is fine."""
    seed_t = torch.tensor(5)
    assert cuda_backend._seed_args(0.1, seed_t) == (0, seed_t)
    assert cuda_backend._seed_args(0.0, seed_t) == (0, None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert cuda_backend._seed_args(0.1, 5) == (5, None)  # eager, not capturing
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="seed by value inside a CUDA graph capture"):
        cuda_backend._seed_args(0.1, 5)
    assert cuda_backend._seed_args(0.0, 5) == (5, None)
    assert cuda_backend._seed_args(0.1, seed_t) == (0, seed_t)  # the device seed is capture-safe


def test_cuda_backend_passes_device_seed_without_host_read(monkeypatch):
    """forward, backward and the C++ autograd entry of the cuda backend pass a device seed to the extension's ops as
    their seed_t argument (the int seed then 0), and never read its value on the host: checked with stand-in ops
    and a meta seed, whose value cannot be read."""
    calls = []

    def fake(name, n_out):
        def op(*args):
            calls.append((name, args))
            return tuple(torch.empty(0) for _ in range(n_out)) if n_out > 1 else torch.empty(0)
        return op

    monkeypatch.setattr(cuda_backend, "_OPS", (fake("forward", 2), fake("backward", 3)))
    monkeypatch.setattr(cuda_backend, "_LINEAR", fake("lora_linear", 1))
    seed = torch.empty((), dtype=torch.int64, device="meta")
    x = W = A = B = u = dy = torch.empty(0)
    cuda_backend.forward(x, W, None, A, B, 2.0, 0.25, seed, 3)
    cuda_backend.backward(dy, x, W, A, B, u, 2.0, 0.25, seed, 3, True, False, True)
    cuda_backend._linear_autograd(x, W, None, A, B, 2.0, 0.25, seed, 3)
    (_, fa), (_, ba), (_, la) = calls
    assert fa[-1] is seed and fa[7:9] == (0, 3)  # seed, offset by value; seed_t last
    assert ba[-1] is seed and ba[8:13] == (0, 3, True, False, True)
    assert la[-1] is seed and la[7:9] == (0, 3)
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda_backend.forward(x, W, None, A, B, 2.0, 0.25, 77, 0)  # eager: by value, no seed tensor
    assert calls[0][1][7] == 77 and calls[0][1][-1] is None


def test_auto_skips_backends_without_device_seed(monkeypatch):
    """backend=None with a device seed (capture / torch.compile, dropout on) picks the first backend that reads the
    seed on the device (every backend does now: the cuda one too); with a backend that cannot, it is skipped. An
    explicit name is never replaced."""
    class _Mod:
        pass

    monkeypatch.setattr(_dispatch, "_load", lambda name: (_Mod(), "ok"))
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    _dispatch._resolve_name.cache_clear()
    try:
        assert "cuda" in _dispatch.DEVICE_SEED_BACKENDS
        assert _dispatch.resolve(None, "cuda", False, False) == "cuda"
        assert _dispatch.resolve(None, "cuda", False, True) == "cuda"
        monkeypatch.setattr(_dispatch, "DEVICE_SEED_BACKENDS", ("torch", "triton"))
        _dispatch._resolve_name.cache_clear()
        assert _dispatch.resolve(None, "cuda", False, True) == "triton"
        assert _dispatch.resolve("cuda", "cuda", False, True) == "cuda"
        assert _dispatch.resolve(None, "cpu", False, True) == "torch"
    finally:
        _dispatch._resolve_name.cache_clear()


def test_record_dropout_device_seed_and_eager_ints():
    """Eager calls record ints (the CPU seed); the recorded pair reproduces the call's mask."""
    x, W, A, B = torch.randn(5, 24), torch.randn(16, 24), torch.randn(4, 24, requires_grad=True), torch.randn(16, 4)
    with ops.record_dropout() as calls:
        lora_kernels.lora_linear(x, W, None, A, B, 1.0, dropout_p=0.2)
    assert len(calls) == 1 and isinstance(calls[0][0], int) and calls[0][1] == 0


@pytest.mark.skipif(not _INTERP, reason="the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
def test_dora_masking_pass_tensor_seed_bit_identical(monkeypatch):
    """DoRA's masking pass (dora_kernels.masked: keep ⊙ x, and x − keep ⊙ x / q over it) with the seed read from a
    pointer, as under CUDA graph capture, gives the int path's output bit for bit, without a host read of the seed."""
    pytest.importorskip("triton")
    from lora_kernels import dora_kernels as dk

    g = torch.Generator().manual_seed(3)
    t = torch.randn(37, 44, generator=g).half()
    for seed, offset, p in [(0x1234_5678_9ABC, 2**32 - 7, 0.3), (2**63 + 5, 0, 0.1), (16, 5, 0.5)]:
        want = [dk.masked(t, p, seed, offset, 1.0, 0.0, True),
                dk.masked(t, p, seed, offset, 1.0 - 1.0 / (1 - p), 1.0, True, base=t)]
        with monkeypatch.context() as m:
            forbid_host_reads(m)
            got = [dk.masked(t, p, _as_tensor(seed), offset, 1.0, 0.0, True),
                   dk.masked(t, p, _as_tensor(seed), offset, 1.0 - 1.0 / (1 - p), 1.0, True, base=t)]
        keep = dropout_mask(seed, offset, t.shape, p)
        assert torch.equal(want[0], torch.where(keep, t, torch.zeros_like(t)))
        for a, c in zip(want, got):
            assert torch.equal(a, c)
