"""The op contract: every backend against float64 math, autograd, opcheck, compile, autocast, dropout, errors."""
import math

import pytest
import torch

import lora_kernels
from lora_kernels.ops import record_dropout

from conftest import HAS_CUDA, abs_reference, assert_tolerance, backend_cases, check_lora_linear, dtypes_for, formula

# Outputs start as NaN (conftest.poisoned_outputs): an unwritten element fails the finiteness checks.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")

CASES = [(b, d, dt) for b, d in backend_cases() for dt in dtypes_for(b, d)]
IDS = [f"{b}-{d}-{str(dt).split('.')[-1]}" for b, d, dt in CASES]

# (lead shape, K, N, r): M = 0, 1, 3; K, N not multiples of 16; r from 1 to 256; 3-D inputs.
SHAPES = [((0,), 32, 16, 4), ((1,), 48, 40, 1), ((3,), 20, 24, 8), ((2, 5), 72, 36, 16),
          ((37,), 100, 50, 33), ((4, 4), 64, 96, 256)]


def make(lead, K, N, r, dtype, device, bias=True, adapter_dtype=None):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, K, device=device).to(dtype)
    W = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    A = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype)
    B = torch.randn(N, r, device=device).to(adapter_dtype) / r**0.5
    return x, W, b, A, B


def run_and_check(backend, device, dtype, lead, K, N, r, bias, p, adapter_dtype=None, x_transform=None):
    x, W, b, A, B = make(lead, K, N, r, dtype, device, bias, adapter_dtype)
    if x_transform is not None:
        x = x_transform(x)
    # a clone: x_transform's values, contiguous
    check_lora_linear(x.clone(), W, b, A, B, 0.75, p, backend)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
def test_against_float64(backend, device, dtype, lead, K, N, r):
    run_and_check(backend, device, dtype, lead, K, N, r, bias=True, p=0.0)


@pytest.mark.parametrize("lead,K,N,r", [((1,), 48, 40, 1), ((1,), 64, 8, 1), ((37,), 100, 50, 33),
                                         ((300,), 1024, 264, 64)])
def test_tolerance_rule_accepts_reordered_and_rejects_wrong(lead, K, N, r):
    """The rule with its condition-aware floor, on float32 CPU results: PyTorch's own computation with K summed in
    reverse passes (for M = 1, r = 1 the floor of the result alone rejected it for a few seeds in a hundred: one dot
    product's summation-order luck), while a result computed in bfloat16, or in float16, and the correct result
    with its largest element off by 1e-3 relative, fail."""
    x, W, b, A, B = make(lead, K, N, r, torch.float32, "cpu")
    s, dy = 0.75, torch.randn(*lead, N)

    def run(x, W, b, A, B):
        ts = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        out = formula(ts[0], W, b, ts[1], ts[2], s)
        out.backward(dy.to(out.dtype))
        return [out.detach()] + [t.grad for t in ts]

    ref = run(x.double(), W.double(), b.double(), A.double(), B.double())
    base = run(x, W, b, A, B)
    Wa, ba = W.double().abs(), b.double().abs()
    out_abs, abs_g = abs_reference(lambda x, A, B: formula(x, Wa, ba, A, B, s), (x, A, B), dy)
    rev = run(x.flip(-1), W.flip(-1), b, A.flip(-1), B)
    rev[1:3] = [rev[1].flip(-1), rev[2].flip(-1)]
    low = {dt: [t.float() for t in run(*(t.to(dt) for t in (x, W, b, A, B)))] for dt in (torch.bfloat16, torch.float16)}
    for i, (name, a64) in enumerate(zip(("y", "dx", "dA", "dB"), [out_abs] + abs_g)):
        assert_tolerance(rev[i], ref[i], base[i], name, abs_ref=a64)
        off = base[i].clone().flatten()
        j = ref[i].abs().argmax()
        off[j] = ref[i].flatten()[j].float() * (1 + 1e-3)
        for wrong in (low[torch.bfloat16][i], low[torch.float16][i], off.view_as(base[i])):
            with pytest.raises(AssertionError, match="error"):
                assert_tolerance(wrong, ref[i], base[i], name, abs_ref=a64)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_dropout_and_bias(backend, device, dtype, p, bias):
    run_and_check(backend, device, dtype, (3, 7), 36, 44, 8, bias=bias, p=p)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
def test_non_contiguous_x(backend, device, dtype):
    run_and_check(backend, device, dtype, (6, 9), 40, 24, 8, bias=True, p=0.1,
                  x_transform=lambda x: x.transpose(0, 1))


@pytest.mark.parametrize("backend,device", [c for c in backend_cases()], ids=lambda v: str(v))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fp32_adapters_on_half_base(backend, device, p):
    # PEFT's default: fp32 adapters on a 16-bit base. PyTorch computes the adapter products in fp32, so dA and dB
    # must be fp32-accurate; at p = 0 no dropout rounding of x hides a 16-bit shortcut in the baseline.
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    run_and_check(backend, device, dtype, (5, 3), 56, 40, 16, bias=True, p=p, adapter_dtype=torch.float32)
    # a long K at r = 64; on the CPU 67 rows (a partial row tile still) instead of 300: under the Triton interpreter
    # the 300 rows took 110-180 s of CI per p
    M = 300 if device != "cpu" else 67
    run_and_check(backend, device, dtype, (M,), 1024, 264, 64, bias=False, p=p, adapter_dtype=torch.float32)


def test_frozen_base_may_require_grad():
    x, W, b, A, B = make((7,), 24, 12, 4, torch.float64, "cpu")
    for t in (x, W, b, A, B):
        t.requires_grad_()
    torch.autograd.gradcheck(lambda *a: lora_kernels.lora_linear(*a, 1.5), (x, W, b, A, B))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    x, W, b, A, B = make((2, 3), 20, 12, 4, torch.float64, "cpu")
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()

    def f(x, A, B):
        torch.manual_seed(123)  # the same dropout seed for every evaluation
        return lora_kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=p)

    assert torch.autograd.gradcheck(f, (x, A, B))


def test_opcheck():
    x, W, b, A, B = make((9,), 24, 16, 4, torch.float32, "cpu")
    seed = torch.tensor(1234, dtype=torch.int64)
    A.requires_grad_(), B.requires_grad_()
    for p in (0.0, 0.2):
        torch.library.opcheck(torch.ops.lora_kernels.lora_fwd.default, (x, W, b, A, B, 0.5, p, seed, 0, "torch"))
    u = torch.randn(9, 4)
    dy = torch.randn(9, 16)
    torch.library.opcheck(torch.ops.lora_kernels.lora_bwd.default,
                          (dy, x, W, A.detach(), B.detach(), u, 0.5, 0.2, seed, 0, "torch", True, True, True))


class _Tiny(torch.nn.Module):
    def __init__(self, p, backend=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32, 24) / 5, requires_grad=False)
        self.a = torch.nn.Parameter(torch.randn(4, 24) / 5)
        self.b = torch.nn.Parameter(torch.randn(32, 4) / 2)
        self.p = p
        self.backend = backend

    def forward(self, x):
        h = lora_kernels.lora_linear(x, self.w, None, self.a, self.b, 2.0, dropout_p=self.p, training=self.training,
                                     backend=self.backend)
        return torch.relu(h).sum(-1)


# backend=None on CPU tensors resolves to torch without loading a module; an explicit name loads its backend
# module (an import, which dynamo cannot trace: resolution must happen outside the graph).
@pytest.mark.parametrize("p,backend", [(0.0, None), (0.1, None), (0.0, "torch")])
def test_torch_compile_fullgraph(p, backend):
    torch._dynamo.reset()
    m = _Tiny(p, backend)
    x = torch.randn(3, 5, 24)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert m.a.grad is not None and torch.isfinite(m.a.grad).all()
    if p == 0.0:
        ga = m.a.grad.clone()
        m.a.grad = None
        ref = m(x)
        ref.sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(ga, m.a.grad)


def test_autocast_like_f_linear():
    x, W, b, A, B = make((4, 6), 32, 16, 8, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_kernels.lora_linear(x, W, b, A, B, 1.0)
        base = torch.nn.functional.linear(x, W, b)
    assert y.dtype == base.dtype == torch.bfloat16
    ref = formula(x.double(), W.double(), b.double(), A.double(), B.double(), 1.0)
    bl = formula(x.bfloat16(), W.bfloat16(), b.bfloat16(), A, B, 1.0)
    assert_tolerance(y, ref, bl)


# ----------------------------------------------------------------------------------------------- dropout
def test_mask_deterministic_and_offset_dependent():
    m1 = lora_kernels.dropout_mask(42, 0, (64, 100), 0.3)
    m2 = lora_kernels.dropout_mask(42, 0, (64, 100), 0.3)
    m3 = lora_kernels.dropout_mask(42, 7, (64, 100), 0.3)
    m4 = lora_kernels.dropout_mask(43, 0, (64, 100), 0.3)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3) and not torch.equal(m1, m4)
    # the leading dims flatten to M: a (4, 16, 100) mask is the (64, 100) one
    assert torch.equal(lora_kernels.dropout_mask(42, 0, (4, 16, 100), 0.3).reshape(64, 100), m1)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate(p):
    n = 1000 * 1000
    keep = lora_kernels.dropout_mask(2024, 0, (1000, 1000), p).double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep - (1 - p)) < 5 * sigma


@pytest.mark.parametrize("lag", [1, 2, 7, 8])
def test_mask_neighbours_independent(lag):
    # One Philox call serves 8 elements: lag 1 pairs the two halves of a word, lag 2 two words of one call, lag 8
    # two calls. Chi-square test of independence of each pair's keep flags (observed marginals, 1 dof; the keep
    # rate itself is test_keep_rate's): a statistic above 15.1 (p < 1e-4) fails.
    mask = lora_kernels.dropout_mask(77, 0, (500, 1024), 0.3)
    a, b = mask[:, :-lag].flatten(), mask[:, lag:].flatten()
    n = a.numel()
    pa, pb = a.double().mean().item(), b.double().mean().item()
    chi2 = 0.0
    for va, qa in ((False, 1 - pa), (True, pa)):
        for vb, qb in ((False, 1 - pb), (True, pb)):
            observed = ((a == va) & (b == vb)).sum().item()
            chi2 += (observed - n * qa * qb) ** 2 / (n * qa * qb)
    assert chi2 < 15.1, chi2


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32-10 (counter and key all zero), the generator tl.philox implements.
    from lora_kernels.philox import philox4x32

    z = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in philox4x32(0, z, z)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_mask_layout_from_philox_words():
    # The documented layout, element by element with scalar arithmetic: counter offset + m*ceil(K/8) + k//8, word
    # (k % 8)//2, low 16 bits for even k and high 16 bits for odd k, kept iff >= ceil(65536 p).
    from lora_kernels.philox import philox4x32

    seed, offset, M, K, p = 2**35 + 3, 2**32 - 5, 3, 19, 0.3
    mask = lora_kernels.dropout_mask(seed, offset, (M, K), p)
    thr = math.ceil(float(torch.tensor(p, dtype=torch.float32)) * 65536)
    for m in range(M):
        for k in range(K):
            c = offset + m * ((K + 7) // 8) + k // 8
            w = int(philox4x32(seed, torch.tensor([c & 0xFFFFFFFF]), torch.tensor([c >> 32]))[(k % 8) // 2])
            h = (w >> (16 * (k % 2))) & 0xFFFF
            assert bool(mask[m, k]) == (h >= thr), (m, k)


@pytest.mark.parametrize("p,thr", [(0.1, 6554), (0.5, 32768), (0.05, 3277), (1.0 / 65536, 1), (0.99999, 65536)])
def test_keep_threshold(p, thr):
    from lora_kernels.philox import keep_threshold

    assert keep_threshold(p) == thr


def test_successive_calls_differ_and_manual_seed_reproduces():
    x, W, b, A, B = make((8,), 64, 16, 8, torch.float32, "cpu")
    torch.manual_seed(5)
    y1 = lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
    y2 = lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
    torch.manual_seed(5)
    y3 = lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
    assert not torch.equal(y1, y2)
    assert torch.equal(y1, y3)
    # eval mode: no dropout at all
    ye = lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5, training=False)
    assert torch.allclose(ye, formula(x, W, b, A, B, 1.0), atol=1e-5)


def test_backward_uses_forward_mask():
    x, W, b, A, B = make((16,), 40, 8, 4, torch.float64, "cpu")
    A.requires_grad_()
    with record_dropout() as calls:
        y = lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
    y.sum().backward()
    keep = lora_kernels.dropout_mask(*calls[0], x.shape, 0.5)
    A2 = A.detach().clone().requires_grad_()
    formula(x, W, b, A2, B, 1.0, keep, 0.5).sum().backward()
    torch.testing.assert_close(A.grad, A2.grad)


def test_record_dropout_records_its_own_threads_calls():
    """A record_dropout block collects the calls of its own thread only: another thread's dropout call made while the
    block is open does not land in it, and the recorded seed reproduces the block's own call's mask."""
    import threading

    x, W, b, A, B = make((16,), 40, 8, 4, torch.float64, "cpu")
    entered, other_done = threading.Event(), threading.Event()

    def other():
        entered.wait()
        lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
        other_done.set()

    t = threading.Thread(target=other)
    t.start()
    with record_dropout() as calls:
        entered.set()
        other_done.wait()
        y = lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
    t.join()
    assert len(calls) == 1
    keep = lora_kernels.dropout_mask(*calls[0], x.shape, 0.5)
    torch.testing.assert_close(y, formula(x, W, b, A, B, 1.0, keep, 0.5))


def test_no_mask_or_dropped_copy_saved():
    x, W, b, A, B = make((32,), 64, 48, 8, torch.float32, "cpu")
    A.requires_grad_(), B.requires_grad_(), x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.3)
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()
           and t.data_ptr() != W.data_ptr()]
    assert not big, f"saved an extra x-sized tensor: {[tuple(t.shape) for t in big]}"
    assert not any(t.dtype == torch.bool for t in saved)


# ------------------------------------------------------------------------------------------------ errors
def _good():
    return make((4,), 16, 8, 4, torch.float32, "cpu")


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(0, torch.randn(4, 15)), "x's last dim"),
    (lambda a: a.__setitem__(1, torch.randn(8, 16, 1)), "weight must be 2-D"),
    (lambda a: a.__setitem__(3, torch.randn(4, 17)), "lora_A must have shape"),
    (lambda a: a.__setitem__(4, torch.randn(9, 4)), "lora_B must have shape"),
    (lambda a: a.__setitem__(2, torch.randn(7)), "bias must have shape"),
    (lambda a: a.__setitem__(3, torch.randn(0, 16)), "unsupported rank"),
    (lambda a: a.__setitem__(3, torch.randn(300, 16)), "unsupported rank"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (4, 16))), "x has unsupported dtype"),
    (lambda a: a.__setitem__(1, torch.randn(8, 16, dtype=torch.float16)), "weight dtype"),
    (lambda a: a.__setitem__(4, torch.randn(8, 4, dtype=torch.float16)), "lora_B dtype"),
    (lambda a: a.__setitem__(2, torch.randn(8, device="meta")), "bias is on meta"),
])
def test_bad_input(mutate, match):
    args = list(_good())
    mutate(args)
    with pytest.raises(ValueError, match=match):
        lora_kernels.lora_linear(*args, 1.0)


def test_bad_dropout_and_backend():
    args = _good()
    with pytest.raises(ValueError, match="dropout_p"):
        lora_kernels.lora_linear(*args, 1.0, dropout_p=1.5)
    with pytest.raises(ValueError, match="unknown backend"):
        lora_kernels.lora_linear(*args, 1.0, backend="nope")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        lora_kernels.lora_linear(*_good(), 1.0, backend="cuda")


def test_env_var_overrides_auto_on_every_call(monkeypatch):
    """LORA_KERNELS_BACKEND replaces backend=None/'auto' and is read on every call (lora_kernels/_config.py):
    changing it between two calls changes the second one. A backend named in the call wins."""
    args = _good()
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    y = lora_kernels.lora_linear(*args, 1.0)  # auto: torch for CPU tensors
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        lora_kernels.lora_linear(*args, 1.0)
    assert torch.equal(lora_kernels.lora_linear(*args, 1.0, backend="torch"), y)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")  # unavailable here, or not for CPU tensors
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        lora_kernels.lora_linear(*args, 1.0, backend="auto")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert torch.equal(lora_kernels.lora_linear(*args, 1.0), y)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "")  # empty: auto
    assert torch.equal(lora_kernels.lora_linear(*args, 1.0), y)


def test_available_backends_reports_reasons():
    assert "torch" in lora_kernels.available_backends()
    status = lora_kernels.backend_status()
    assert set(status) == {"torch", "triton", "cuda"} and all(status.values())


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen_base", "trained_base"])
def test_eager_paths_match_registered_op(backend, device, dtype, p, train_base, monkeypatch):
    """Every way lora_linear runs autograd gives bit-identical outputs and grads for the same seed: the eager
    path (for the cuda backend with a frozen base its C++ entry, csrc/lora_autograd.h, else the Python
    autograd.Function that skips the dispatcher's wrapper), the C++ autograd node called from Python (the entry
    off), the Python autograd.Function forced, and the registered op with its
    register_autograd (what torch.compile records). With train_base the base weight and bias train too: the cuda
    backend's C++ node covers a frozen base only, so lora_linear must take the Python autograd (the one definition
    of dW and db) instead."""
    x, W, b, A, B = make((11,), 40, 24, 8, dtype, device)
    dy = torch.randn(11, 24, device=device).to(dtype)
    names = ("y", "dx", "dW", "db", "dA", "dB") if train_base else ("y", "dx", "dA", "dB")

    def leaves():  # fresh copies of the inputs; W and b require grad only with train_base
        return [t.detach().clone().requires_grad_(train_base or i not in (1, 2)) for i, t in enumerate((x, W, b, A, B))]

    def run(path):
        ts = leaves()
        if path == "registered":  # the seed that every eager path drew after torch.manual_seed(7)
            torch.manual_seed(7)
            seed = torch.tensor(int(lora_kernels.ops._draw_seed()) if p > 0 else 0, dtype=torch.int64)
            y = torch.ops.lora_kernels.lora_fwd(*ts, 0.5, p, seed, 0, backend)[0]
        else:
            with monkeypatch.context() as m:
                if path in ("node", "python"):  # the C++ entry off (it runs the node or declines)
                    m.setattr(lora_kernels._dispatch.get(backend), "linear_entry", None, raising=False)
                if path == "python":
                    m.setattr(lora_kernels._dispatch.get(backend), "linear_autograd", None, raising=False)
                torch.manual_seed(7)
                y = lora_kernels.lora_linear(*ts, 0.5, dropout_p=p, backend=backend)
        y.backward(dy)
        if not train_base:
            assert ts[1].grad is None and ts[2].grad is None, path
        return [y] + [t.grad for i, t in enumerate(ts) if train_base or i not in (1, 2)]

    eager = run("eager")  # (not inside record_dropout: its calls take the Python path)
    if backend == "cuda":  # the C++ autograd node ran exactly for a frozen base, through the entry
        assert ("LoraLinearFunction" in eager[0].grad_fn.name()) != train_base, eager[0].grad_fn.name()
        took = lora_kernels._dispatch.eager_entry(backend)(*leaves(), 0.5, p, True)
        assert (took is not None) != train_base
    for path in ("node", "python", "registered"):
        other = run(path)
        assert len(eager) == len(other) == len(names), path
        for name, got, want in zip(names, eager, other):
            assert got is not None and want is not None, (path, name)
            assert torch.equal(got, want), (path, name)


# ------------------------------------------------------------------------------------------ streams, modes
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", [b for b, d in backend_cases() if d == "cuda"])
def test_runs_on_the_current_stream(backend):
    """Forward and backward launch on the caller's current stream. The inputs are NaN until a copy queued on a
    side stream behind a ~100 ms GPU sleep fills them; a kernel launched on another stream would read NaN."""
    x, W, b, A, B = make((64,), 96, 80, 8, torch.float16, "cuda")
    dy = torch.randn(64, 80, device="cuda").half()
    ref_x, ref_A = x.clone().requires_grad_(), A.clone().requires_grad_()
    ref = lora_kernels.lora_linear(ref_x, W, b, ref_A, B, 0.5, backend=backend)
    ref.backward(dy)
    xs, dys = torch.full_like(x, float("nan")), torch.full_like(dy, float("nan"))
    As = A.clone().requires_grad_()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        xs.copy_(x)
        dys.copy_(dy)
        xs.requires_grad_()
        y = lora_kernels.lora_linear(xs, W, b, As, B, 0.5, backend=backend)
        y.backward(dys)
    torch.cuda.synchronize()
    for got, want in ((y, ref), (xs.grad, ref_x.grad), (As.grad, ref_A.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", [b for b, d in backend_cases() if d == "cuda"])
@pytest.mark.parametrize("op,p", [("lora", 0.0), ("lora", 0.1), ("dora", 0.0), ("dora", 0.1)])
def test_runs_on_the_tensors_device(backend, op, p):
    """Tensors on cuda:1 while cuda:0 is current (a model spread over GPUs by device_map="auto" leaves cuda:0
    current): forward and backward run on cuda:1, on its current stream, and give what the same call gives with
    cuda:1 current. The inputs are NaN until a copy queued on cuda:1's stream behind a GPU sleep fills them, so a
    kernel launched on cuda:0 (or on another stream) reads NaN or faults."""
    dev = torch.device("cuda", 1)
    x, W, b, A, B = make((96,), 64, 72, 8, torch.bfloat16, dev, adapter_dtype=torch.float32)
    mag = torch.rand(72, device=dev) + 0.5
    dy = torch.randn(96, 72, device=dev).bfloat16()

    def run(x, dy):
        xs, As, Bs, ms = (t.clone().requires_grad_() for t in (x, A, B, mag))
        torch.manual_seed(3)
        if op == "dora":
            y = lora_kernels.dora_linear(xs, W, b, As, Bs, 0.5, ms, dropout_p=p, backend=backend)
        else:
            y = lora_kernels.lora_linear(xs, W, b, As, Bs, 0.5, dropout_p=p, backend=backend)
        y.backward(dy)
        return [y.detach(), xs.grad, As.grad, Bs.grad] + ([ms.grad] if op == "dora" else [])

    with torch.cuda.device(dev):
        want = run(x, dy)
    xn, dyn = torch.full_like(x, float("nan")), torch.full_like(dy, float("nan"))
    torch.cuda.synchronize(dev)
    side, prev = torch.cuda.Stream(device=dev), torch.cuda.current_stream(dev)
    torch.cuda.set_stream(side)  # cuda:1's current stream (set_stream makes cuda:1 current too) ...
    torch.cuda.set_device(0)  # ... then cuda:0 current again
    try:
        assert torch.cuda.current_stream(dev) == side
        with torch.cuda.device(dev):
            torch.cuda._sleep(200_000_000)  # on side
        xn.copy_(x)  # torch's own ops run on cuda:1's current stream: side
        dyn.copy_(dy)
        got = run(xn, dyn)
        assert torch.cuda.current_device() == 0
    finally:
        torch.cuda.set_stream(prev)
        torch.cuda.set_device(0)
    torch.cuda.synchronize(dev)
    for g, w in zip(got, want):
        assert g.device == dev and torch.isfinite(g).all()
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
def test_inference_mode(backend, device, dtype):
    """Under torch.inference_mode (no autograd at all) the op gives the same output as under no_grad."""
    x, W, b, A, B = make((2, 7), 40, 24, 8, dtype, device)
    with torch.no_grad():
        want = lora_kernels.lora_linear(x, W, b, A, B, 0.5, backend=backend)
    with torch.inference_mode():
        got = lora_kernels.lora_linear(x, W, b, A, B, 0.5, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
def test_double_backward_is_a_clear_error(backend, device, dtype):
    """create_graph=True gives the usual first-order grads; differentiating them again raises (the fused kernels
    record no graph, so second derivatives would otherwise be silently incomplete)."""
    x, W, b, A, B = make((9,), 32, 24, 4, dtype, device)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    y = lora_kernels.lora_linear(x, W, b, A, B, 0.5, backend=backend)
    first = torch.autograd.grad(y.float().square().sum(), (x, A, B))
    y = lora_kernels.lora_linear(x, W, b, A, B, 0.5, backend=backend)
    again = torch.autograd.grad(y.float().square().sum(), (x, A, B), create_graph=True)
    for f, g in zip(first, again):
        assert torch.equal(f, g)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(again[0].float().sum() + again[1].float().sum(), (x, A, B))
    for wrt in (x, A, B):  # each input alone: the error, never "not used in the graph" nor a None (a silent zero)
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad(again[0].float().sum(), wrt, allow_unused=True)


def test_trainable_base_grads_in_float64():
    """A trainable base weight and bias get grads accumulated in float64 for float64 inputs (not rounded to fp32)."""
    x, W, b, A, B = make((6,), 24, 12, 4, torch.float64, "cpu")
    ts = [t.clone().requires_grad_() for t in (x, W, b, A, B)]
    ref = [t.clone().requires_grad_() for t in (x, W, b, A, B)]
    dy = torch.randn(6, 12, dtype=torch.float64)
    lora_kernels.lora_linear(*ts, 0.5).backward(dy)
    formula(*ref, 0.5).backward(dy)
    for t, r in zip(ts, ref):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("op", ["lora", "dora"])
def test_activation_checkpointing_regenerates_the_mask(backend, device, dtype, op):
    """Under torch.utils.checkpoint (both forms: HF's gradient_checkpointing_enable uses them) the forward runs again
    in the backward; its dropout seed, drawn from torch's generator, must be the one the first forward drew (the
    checkpoint restores the generator's state), so the grads equal those of the same call without checkpointing at
    the same torch seed, up to rounding. A second seed gives other grads: the mask is applied, not ignored."""
    from torch.utils.checkpoint import checkpoint

    x, W, b, A, B = make((3, 11), 40, 24, 8, dtype, device)
    mag = (torch.rand(24, device=device) + 0.5).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, mag)]

    def f(x, A, B, mag):
        if op == "dora":
            return lora_kernels.dora_linear(x, W, b, A, B, 0.75, mag, dropout_p=0.3, backend=backend)
        return lora_kernels.lora_linear(x, W, b, A, B, 0.75, dropout_p=0.3, backend=backend)

    def grads(seed, reentrant=None):
        torch.manual_seed(seed)
        args = [t.clone().detach().requires_grad_() for t in leaves]
        y = f(*args) if reentrant is None else checkpoint(f, *args, use_reentrant=reentrant)
        (y.float().sin().sum()).backward()
        return [y.detach()] + [t.grad for t in args[:3 if op == "lora" else 4]]

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    # Equal up to rounding (the recompute may order sums otherwise: 1e-2 is bf16's rounding with room); another
    # mask is far off (the other seed below: about 0.3 on dA).
    plain = grads(7)
    for got in (grads(7, reentrant=False), grads(7, reentrant=True)):
        for i, (g, want) in enumerate(zip(got, plain)):
            assert torch.isfinite(g).all()
            assert rel(g, want) < 1e-2, (i, rel(g, want))
    other = grads(8)
    assert rel(other[0], plain[0]) > 5e-2 and rel(other[2], plain[2]) > 5e-2
