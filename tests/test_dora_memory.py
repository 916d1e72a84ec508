"""dora_linear's memory: no N×K temporary (PEFT's DoRA builds one), what the backward keeps and allocates (nothing
M×N beyond one row chunk), and on the GPU its fwd+bwd peak against lora_linear's."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lora_kernels
from lora_kernels import dora

from conftest import backend_cases, live_at_peak
from test_dora import CASES, IDS, _gpu_backends, gpu, make, run_and_check

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


# ----------------------------------------------------------------------------------- no N×K temporary
class _Allocs(TorchDispatchMode):
    """Records the element count of every tensor an ATen op returns in new memory (views and in-place results,
    whose storage is an input's, are not allocations)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), t.untyped_storage().nbytes() // t.element_size()))
        return out


def _nk_allocations(fn, N, K):
    mode = _Allocs()
    with mode:
        fn()
    return [(f, n) for f, n in mode.sizes if n >= N * K]


# the torch backend up-casts 16-bit operands (its reference math): fp32 there; Triton runs 16-bit as given, on each
# device backend_cases() runs it on (CUDA tensors on a GPU, CPU tensors under TRITON_INTERPRET=1)
_ALLOC_CASES = [("torch", "cpu", torch.float32)] + [
    ("triton", d, torch.float16) for b, d in backend_cases() if b == "triton"]


@pytest.mark.parametrize("backend,device,dtype", _ALLOC_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_no_nk_temporary(monkeypatch, backend, device, dtype, p):
    # M·N, M·K, N·r, ... are all far below N·K here, so any tensor of N·K elements or more is a weight-sized
    # temporary. The ‖W‖² cache fill up-casts W in row chunks: made smaller than W to show that it chunks.
    M, K, N, r = 6, 64, 48, 4
    monkeypatch.setattr(dora, "_CHUNK_ELEMS", N * K // 4)
    dora.clear_weight_norm_cache()
    x, W, b, A, B, m = make((M,), K, N, r, dtype, device, adapter_dtype=torch.float32)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_(), m.requires_grad_()

    def fwd_bwd():
        y = lora_kernels.dora_linear(x, W, b, A, B, 2.0, m, dropout_p=p, backend=backend)
        y.backward(torch.randn_like(y))

    # the detector works on this device: it sees an N×K temporary (the dispatch mode sees every ATen op's result,
    # whatever the device's allocator)
    assert _nk_allocations(lambda: W.float() * 2.0, N, K) != []
    assert _nk_allocations(fwd_bwd, N, K) == []


def test_nk_detector_sees_peft_dora():
    # the same detector flags PEFT's DoRA layer, which builds the N×K LoRA weight each call
    peft = pytest.importorskip("peft")
    M, K, N = 6, 64, 48

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(K, N)

        def forward(self, x):
            return self.lin(x)

    model = peft.get_peft_model(One(), peft.LoraConfig(r=4, target_modules=["lin"], use_dora=True))
    x = torch.randn(M, K, requires_grad=True)
    assert _nk_allocations(lambda: model(x).sum().backward(), N, K) != []


# ------------------------------------------------------------------------- what backward keeps, what it allocates
_CPU_BACKENDS = [b for b, d in backend_cases() if d == "cpu"]


def _saved_numels(fn, exclude):
    """{storage: (numel, nbytes)} of the tensors autograd saves while ``fn`` runs (its forward), leaving out the
    storages of ``exclude`` (the parameters: W, b, A, B, magnitude)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[(ptr, t.untyped_storage().nbytes())] = (t.numel(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("backend", _CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_saved_for_backward_is_loras_plus_n_floats(monkeypatch, backend, p):
    # K < N and M < N: x (M×K) is the largest activation LoRA itself saves; nothing M×N or N×K may be saved (but
    # the output y itself, below), and the bytes saved may exceed lora_linear's by a few float32 N-vectors (g, the
    # norm) only
    M, K, N, r = 32, 40, 56, 4
    dtype = torch.float16 if backend == "triton" else torch.float32
    x, W, b, A, B, m = make((M,), K, N, r, dtype, "cpu", adapter_dtype=torch.float32)
    for t in (x, A, B, m):
        t.requires_grad_()
    params = (W, b, A, B, m)
    lora = _saved_numels(lambda: lora_kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=p, backend=backend), params)
    # SAVE_Y (the default) keeps the output y at p = 0 on the fast backends: the tensor the call returns, no copy
    out = []
    with_y = _saved_numels(lambda: out.append(lora_kernels.dora_linear(x, W, b, A, B, 2.0, m, dropout_p=p,
                                                                        backend=backend)), params)
    keeps_y = p == 0.0 and backend != "torch"
    y_storage = (out[0].untyped_storage().data_ptr(), out[0].untyped_storage().nbytes())
    assert (y_storage in with_y) == keeps_y, (with_y, y_storage)
    monkeypatch.setattr(dora, "SAVE_Y", False)
    ours = list(_saved_numels(lambda: lora_kernels.dora_linear(x, W, b, A, B, 2.0, m, dropout_p=p,
                                                               backend=backend), params).values())
    lora = list(lora.values())
    if keeps_y:  # the same saved tensors, y in place of the recompute's empty z
        assert sorted(n for k, (n, _) in with_y.items() if k != y_storage and n) == sorted(n for n, _ in ours if n)
    else:
        assert sorted(n for n, _ in with_y.values()) == sorted(n for n, _ in ours)
    assert max(n for n, _ in ours) == M * K  # x
    assert all(n < min(M * N, N * K) for n, _ in ours), ours
    extra = sum(nb for _, nb in ours) - sum(nb for _, nb in lora)
    assert extra <= 4 * 4 * N, (ours, lora)
    # the detector sees an M×N saved tensor: the opt-in SAVE_Z keeps z
    monkeypatch.setattr(dora, "SAVE_Z", True)
    with_z = list(_saved_numels(lambda: lora_kernels.dora_linear(x, W, b, A, B, 2.0, m, dropout_p=p,
                                                                 backend=backend), params).values())
    assert sorted(n for n, _ in with_z if n) == sorted([n for n, _ in ours if n] + [M * N])


@pytest.mark.skipif(not any(d == "cpu" for b, d in backend_cases() if b == "triton"),
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_allocates_nothing_m_by_n(monkeypatch, p):
    # the fast path's backward: its M×N (z, then c ⊙ dy over it) and M×K (a chunk's dx / x_k) temporaries live per
    # row chunk of at most BWD_CHUNK_BYTES; here 16 rows of 4, so no allocation reaches M×N elements (dx, M×K, is
    # the largest, as in LoRA's own backward)
    M, K, N, r = 64, 40, 96, 4
    rows = 16
    monkeypatch.setattr(dora, "BWD_CHUNK_BYTES", rows * (N + K) * 2)
    monkeypatch.setattr(dora, "SAVE_Y", False)  # z recomputed (at p = 0 the default keeps y: no chunks)
    x, W, b, A, B, m = make((M,), K, N, r, torch.float16, "cpu", adapter_dtype=torch.float32)
    for t in (x, A, B, m):
        t.requires_grad_()
    y = lora_kernels.dora_linear(x, W, b, A, B, 2.0, m, dropout_p=p, backend="triton")
    dy = torch.randn_like(y)
    mode = _Allocs()
    with mode:
        y.backward(dy)
    sizes = [n for _, n in mode.sizes]
    assert max(sizes) == M * K and M * K < M * N, mode.sizes
    assert rows * N in sizes  # a chunk's z
    for t in (x, A, B, m):
        assert torch.isfinite(t.grad).all()


def test_forward_with_dropout_allocates_per_chunk(monkeypatch):
    # at p > 0 the forward's dropped x (x_k, then x_c over it) and z live per row chunk of at most BWD_CHUNK_BYTES:
    # here 16 rows of 256, so nothing of M×K elements or half of it is allocated
    M, K, N, r = 256, 100, 40, 4
    rows = 16
    monkeypatch.setattr(dora, "BWD_CHUNK_BYTES", rows * (N + K) * 4)
    x, W, b, A, B, m = make((M,), K, N, r, torch.float32, "cpu")
    mode = _Allocs()
    with mode, torch.no_grad():
        y = lora_kernels.dora_linear(x, W, b, A, B, 2.0, m, dropout_p=0.3, backend="torch")
    sizes = [n for _, n in mode.sizes]
    assert max(sizes) < M * K // 2, mode.sizes  # one x_k of all rows would be M×K (y, M×N, and the norm's N×K are smaller)
    assert M * N in sizes and rows * K in sizes  # y, and a chunk's x_k
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["recompute", "save_z", "save_y"])
def test_chunked_backward_and_saved_z(monkeypatch, backend, device, dtype, p, mode):
    # the backward by row chunks (here 3 chunks of 13 rows: the dropout mask's counters continue across chunks),
    # with z recomputed, saved, or (p = 0, fast backends) taken from the saved y (its dy_c per chunk)
    monkeypatch.setattr(dora, "SAVE_Z", mode == "save_z")
    monkeypatch.setattr(dora, "SAVE_Y", mode == "save_y")
    elt = torch.tensor([], dtype=dtype).element_size()
    monkeypatch.setattr(dora, "BWD_CHUNK_BYTES", 13 * (50 + 100) * elt)
    assert len(dora._row_chunks_of(37, (50 + 100) * elt)) == 3
    run_and_check(backend, device, dtype, (37,), 100, 50, 33, bias=True, p=p)


PEAK_SHAPE = (4096, 1024, 1024, 16)  # M, K, N, r: one M×N bf16 buffer is 8 MiB


def peak_case(p, backend, dev="cuda", owned_dy=False):
    """(lora, dora) fwd+bwd callables on fresh inputs of PEAK_SHAPE (bf16 x and W, fp32 adapters and magnitude),
    as the peak-memory test and bench/dev/peak_trace.py run them. The upstream grad dy is the caller's, or with
    owned_dy made by autograd, as in a network (the grad of (y ⊙ dy).sum(): the layer's node owns it)."""
    M, K, N, r = PEAK_SHAPE
    dt = torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    W = (torch.randn(N, K, device=dev) / K**0.5).to(dt)
    A = (torch.randn(r, K, device=dev) / K**0.5).requires_grad_()
    B = torch.randn(N, r, device=dev).requires_grad_()
    m = (torch.rand(N, device=dev) + 0.5).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=dt)

    def grad(y, wrt):
        if owned_dy:
            torch.autograd.grad((y * dy).sum(), wrt)
        else:
            torch.autograd.grad(y, wrt, dy)

    def lora():
        grad(lora_kernels.lora_linear(x, W, None, A, B, 2.0, dropout_p=p, backend=backend), (x, A, B))

    def dora_():
        grad(lora_kernels.dora_linear(x, W, None, A, B, 2.0, m, dropout_p=p, backend=backend), (x, A, B, m))

    return lora, dora_


@gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("save_y", [False, True])
@pytest.mark.parametrize("owned_dy", [False, True], ids=["caller_dy", "autograd_dy"])
def test_gpu_peak_memory_against_lora(monkeypatch, p, save_y, owned_dy):
    # DoRA fwd+bwd peak - LoRA fwd+bwd peak <= c·N·r + the backward's chunk budget (its transient M×N / M×K
    # temporaries, here set to 1 MiB) + 1 MiB, far below one M×N buffer (8 MiB here): nothing M×N is saved or held
    # for the whole backward, nothing N×K is built. With y kept (p = 0, SAVE_Y) the backward runs in one chunk: its
    # dy_c, one M×N buffer, is transient for the whole backward, and nothing else is added (y is the output the
    # caller holds); the cuda backend's C++ node writes dy_c over a dy that autograd made (owned_dy), so there it
    # adds nothing M×N. The fast backends only (the torch reference backend makes fp32 copies of its operands).
    M, K, N, r = PEAK_SHAPE
    budget = 1 << 20
    monkeypatch.setattr(dora, "BWD_CHUNK_BYTES", budget)
    monkeypatch.setattr(dora, "SAVE_Y", save_y)
    backends = [b for b in _gpu_backends() if b != "torch"]
    if not backends:
        pytest.skip("no fast backend")
    for backend in backends:
        in_place = owned_dy and backend == "cuda"  # the C++ entry (SAVE_Y, p = 0): dy_c over dy
        dy_c = M * N * 2 if (save_y and p == 0.0 and not in_place) else 0
        lora, dora_ = peak_case(p, backend, owned_dy=owned_dy)
        lora(), dora_()  # warm-up: kernels compiled, the ‖W‖² cache filled
        (peak_d, live_d), (peak_l, live_l) = live_at_peak(dora_), live_at_peak(lora)
        extra = peak_d - peak_l
        allowance = 64 * N * (r + 8) + budget + (1 << 20)
        print(f"{backend} p={p} save_y={save_y} owned_dy={owned_dy}: DoRA peak - LoRA peak = "
              f"{extra / 2**20:.2f} MiB (allowance "
              f"{(allowance + dy_c) / 2**20:.2f} MiB; one M×N buffer is {M * N * 2 / 2**20:.0f} MiB)")
        assert extra <= allowance + dy_c and allowance < M * N * 2, (
            backend, extra, allowance, dy_c, "DoRA's live blocks at its peak", live_d[:8], "LoRA's", live_l[:8])
