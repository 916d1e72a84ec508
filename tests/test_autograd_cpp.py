"""The CUDA backend's C++ autograd node (csrc/lora_autograd.h), tested on the CPU: the same header is built into a
small CPU extension (tests/cpp/autograd_shim.cpp) with reference math in place of the fused kernels, so that the
node's gradient routing (which inputs need grads, with and without a bias), its refusal of a trainable base weight
or bias (lora_linear sends those to its Python autograd), its saved tensors, retain_graph, checkpointing, inference
mode and the double-backward error are checked in CI. The GPU suite checks the real node
against the Python paths (test_contract.py::test_eager_paths_match_registered_op)."""
import itertools
import os
import shutil

import pytest
import torch

from conftest import assert_tolerance, torch_cxx_std

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError:
            pytest.skip("ninja is needed to build the test extension")
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        pytest.skip("no host C++ compiler")
    build = tmp_path_factory.mktemp("autograd_shim")
    cpp_extension.load(name="lora_autograd_shim", sources=[os.path.join(ROOT, "tests", "cpp", "autograd_shim.cpp")],
                       extra_include_paths=[os.path.join(ROOT, "csrc")],
                       extra_cflags=["-O1", f"-std={torch_cxx_std()}"],  # C++20 for torch >= 2.14
                       build_directory=str(build), is_python_module=False, verbose=False)
    return torch.ops.lora_autograd_shim.lora_linear


def _inputs(bias, dtype=torch.float64, M=5, K=7, N=6, r=3):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g) if bias else None,
          torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)]
    return [t.to(dtype) if t is not None else None for t in ts]


def _formula(x, W, b, A, B, s):
    y = x @ W.t() + s * (x @ A.t()) @ B.t()
    return y + b if b is not None else y


FROZEN_BASE = "covers a frozen weight and bias"


@pytest.mark.parametrize("bias", [True, False])
def test_grads_for_every_subset_of_inputs(op, bias):
    """Each subset of (x, A, B) requiring grad, with W and b frozen, gets exactly those grads, equal to autograd
    through the formula; every subset in which W or b requires grad is refused at the call with a clear error."""
    base = _inputs(bias)
    refused = 0
    for req in itertools.product([False, True], repeat=5):
        if not any(req) or (req[2] and not bias):
            continue
        ts = [t.clone().requires_grad_(q) if t is not None else None for t, q in zip(base, req)]
        ref = [t.clone().requires_grad_(q) if t is not None else None for t, q in zip(base, req)]
        dy = torch.randn(5, 6, dtype=torch.float64)
        if req[1] or req[2]:
            with pytest.raises(RuntimeError, match=FROZEN_BASE):
                op(*ts, 0.5, 0.0, 0, 0)
            refused += 1
            continue
        op(*ts, 0.5, 0.0, 0, 0).backward(dy)
        _formula(*ref, 0.5).backward(dy)
        for name, t, r in zip("xWbAB", ts, ref):
            if t is None:
                continue
            assert (t.grad is None) == (r.grad is None), (req, name)
            if t.grad is not None:
                torch.testing.assert_close(t.grad, r.grad, msg=f"{req} {name}")
    assert refused == (24 if bias else 8)  # the subsets with W (and, given a bias, b) requiring grad


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(op, bias):
    """gradcheck over (x, A, B), with the base weight and bias frozen."""
    x, W, b, A, B = _inputs(bias)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    assert torch.autograd.gradcheck(lambda x, A, B: op(x, W, b, A, B, 0.5, 0.0, 0, 0), (x, A, B))


def test_trainable_base_is_refused_at_the_call(op):
    """A weight or bias that requires grad (alone, or beside a non-leaf weight from a cast) fails in forward, at the
    call, not later in backward; nothing else about the call matters."""
    x, W, b, A, B = _inputs(True)
    for w, bb in ((W.clone().requires_grad_(), b), (W, b.clone().requires_grad_()),
                  (W.clone().requires_grad_().float().double(), None)):
        with pytest.raises(RuntimeError, match=FROZEN_BASE):
            op(x, w, bb, A.clone().requires_grad_(), B, 0.5, 0.0, 0, 0)


def test_retain_graph_checkpoint_and_modes(op):
    from torch.utils.checkpoint import checkpoint

    x, W, b, A, B = _inputs(True)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    y = op(x, W, b, A, B, 0.5, 0.0, 0, 0)
    y.sum().backward(retain_graph=True)
    once = [t.grad.clone() for t in (x, A, B)]
    y.sum().backward()  # the saved tensors survive retain_graph
    for t, g in zip((x, A, B), once):
        torch.testing.assert_close(t.grad, 2 * g)
        t.grad = None
    for reentrant in (True, False):
        checkpoint(lambda x, A, B: op(x, W, b, A, B, 0.5, 0.0, 0, 0).sin(), x, A, B,
                   use_reentrant=reentrant).sum().backward()
        got = [t.grad.clone() for t in (x, A, B)]
        for t in (x, A, B):
            t.grad = None
        op(x, W, b, A, B, 0.5, 0.0, 0, 0).sin().sum().backward()
        for t, g in zip((x, A, B), got):
            torch.testing.assert_close(t.grad, g)
            t.grad = None
    with torch.inference_mode():
        assert not op(x, W, b, A, B, 0.5, 0.0, 0, 0).requires_grad
    with torch.no_grad():
        assert not op(x, W, b, A, B, 0.5, 0.0, 0, 0).requires_grad


def test_fp32_adapters_grads_keep_their_dtypes(op):
    x, W, b, A, B = _inputs(True, dtype=torch.float32)
    x, W, b = x.bfloat16().requires_grad_(), W.bfloat16(), b.bfloat16()
    A.requires_grad_(), B.requires_grad_()
    op(x, W, b, A, B, 0.5, 0.0, 0, 0).float().sum().backward()
    assert (x.grad.dtype, A.grad.dtype, B.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert W.grad is None and b.grad is None


def test_double_backward_is_a_clear_error(op):
    x, W, b, A, B = _inputs(True)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    first = torch.autograd.grad(op(x, W, b, A, B, 0.5, 0.0, 0, 0).square().sum(), (x, A, B))
    again = torch.autograd.grad(op(x, W, b, A, B, 0.5, 0.0, 0, 0).square().sum(), (x, A, B), create_graph=True)
    for f, g in zip(first, again):
        torch.testing.assert_close(f, g, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(again[0].sum() + again[2].sum(), (x, A, B))


def test_node_name(op):
    x, W, b, A, B = _inputs(True)
    y = op(x.requires_grad_(), W, b, A, B, 0.5, 0.0, 0, 0)
    assert "LoraLinearFunction" in y.grad_fn.name()


@pytest.mark.parametrize("bias", [True, False])
def test_device_seed_reaches_forward_and_backward(op, bias):
    """The optional seed tensor (the graph-safe device seed; the shim's stand-in for the mask scales the LoRA term by
    1 + its value) is passed to the forward and saved for the backward: every grad matches the formula with that
    scaling, with and without a bias (the seed comes after the optional bias among the node's tensor inputs), and
    it gets no grad itself."""
    base = _inputs(bias)
    seed_t = torch.tensor(2, dtype=torch.int64)
    for req in ([True, False, False, True, True], [True, False, False, False, False], [False, False, False, False, True]):
        ts = [t.clone().requires_grad_(q) if t is not None else None for t, q in zip(base, req)]
        ref = [t.clone().requires_grad_(q) if t is not None else None for t, q in zip(base, req)]
        dy = torch.randn(5, 6, dtype=torch.float64)
        y = op(*ts, 0.5, 0.0, 0, 0, seed_t)
        torch.testing.assert_close(y, _formula(*[t.detach() if t is not None else None for t in ref], 1.5))
        y.backward(dy)
        _formula(*ref, 1.5).backward(dy)
        for name, t, r in zip("xWbAB", ts, ref):
            if t is not None and r.grad is not None:
                torch.testing.assert_close(t.grad, r.grad, msg=f"{req} {name}")
    assert seed_t.grad is None


# ---------------------------------------------------------------------------------------------- the eager entry
# lora_linear_entry (csrc/lora_autograd.h) runs a whole eager lora_linear call in C++, or declines it (None) for the
# Python path to run. Here with the shim's reference math on CPU tensors; the GPU suite checks the cuda backend's
# entry against the Python path bit for bit (test_contract.py::test_eager_paths_match_registered_op).
@pytest.fixture(scope="module")
def entry(op):
    return torch.ops.lora_autograd_shim.linear_entry


def _fresh(dtype=torch.float32, adapters=torch.float32, x_shape=(5, 7), N=6, r=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = x_shape[-1]
    x = torch.randn(*x_shape, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) * max(K, 1) ** -0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    A = (torch.randn(r, K, generator=g) * max(K, 1) ** -0.5).to(adapters)
    B = (torch.randn(N, r, generator=g) * max(r, 1) ** -0.5).to(adapters)
    return x, W, b, A, B


@pytest.mark.parametrize("case", ["2d", "3d", "1d", "noncontig", "nobias", "bf16_fp32_adapters", "rank256"])
@pytest.mark.parametrize("grad", [True, False])
def test_entry_matches_the_node(op, entry, case, grad):
    """A call the entry takes gives the same output and grads, bit for bit, as the node called on the 2-D contiguous
    arguments the Python path would hand it (reshape back included), with and without grad mode."""
    kw = dict(x_shape=(5, 7))
    if case == "3d":
        kw["x_shape"] = (2, 3, 7)
    elif case == "1d":
        kw["x_shape"] = (7,)
    elif case == "nobias":
        kw["bias"] = False
    elif case == "bf16_fp32_adapters":
        kw.update(dtype=torch.bfloat16)
    elif case == "rank256":
        kw.update(r=256)
    x, W, b, A, B = _fresh(**kw)
    if case == "noncontig":
        x = torch.randn(7, 5).t()
    ins = [x, A, B]
    mine = [t.clone().requires_grad_(grad) for t in ins]
    ref = [t.clone().requires_grad_(grad) for t in ins]
    y = entry(mine[0], W, b, mine[1], mine[2], 0.75, 0.0, True)
    assert y is not None, "declined a call it should take"
    assert y.shape == (*x.shape[:-1], W.shape[0]) and y.dtype == x.dtype
    x2 = ref[0].reshape(-1, x.shape[-1]).contiguous()
    want = op(x2, W, b, ref[1].contiguous(), ref[2].contiguous(), 0.75, 0.0, 0, 0).reshape(y.shape)
    assert torch.equal(y, want)
    assert y.requires_grad == grad and (y.grad_fn is not None) == grad
    if grad:
        dy = torch.randn_like(y)
        y.backward(dy)
        want.backward(dy)
        for name, a, w in zip(("x", "A", "B"), mine, ref):
            assert torch.equal(a.grad, w.grad), name
            assert a.grad.dtype == a.dtype, name


def test_entry_no_grad_and_inference_mode(op, entry):
    """Nothing to differentiate (no_grad, inference_mode, or no input requiring grad): the forward alone, no node."""
    x, W, b, A, B = _fresh()
    want = op(x, W, b, A, B, 0.5, 0.0, 0, 0)
    Ag = A.clone().requires_grad_()
    with torch.no_grad():
        y1 = entry(x, W, b, Ag, B, 0.5, 0.0, True)
    with torch.inference_mode():
        y2 = entry(x, W, b, Ag, B, 0.5, 0.0, True)
    y3 = entry(x, W, b, A, B, 0.5, 0.0, True)
    for y in (y1, y2, y3):
        assert y is not None and y.grad_fn is None and torch.equal(y, want)


class _Mode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _declined_cases():
    """(name, args builder) for calls the entry must leave to the Python path: each builds (args, context)."""
    def base(**kw):
        x, W, b, A, B = _fresh(**kw)
        return [x, W, b, A, B, 0.5, 0.1, True]

    def edit(i, fn, **kw):
        def build():
            a = base(**kw)
            a[i] = fn(a[i])
            return a
        return build

    return {
        "trainable_weight": edit(1, lambda W: W.requires_grad_()),
        "trainable_bias": edit(2, lambda b: b.requires_grad_()),
        "nan_p": edit(6, lambda p: float("nan")),
        "p_above_1": edit(6, lambda p: 1.5),
        "p_below_0": edit(6, lambda p: -0.1),
        "inf_scaling": edit(5, lambda s: float("inf")),
        "nan_scaling": edit(5, lambda s: float("nan")),
        "K_mismatch": edit(0, lambda x: torch.randn(5, 8)),
        "A_K_mismatch": edit(3, lambda A: torch.randn(3, 8)),
        "B_shape": edit(4, lambda B: torch.randn(6, 4)),
        "bias_shape": edit(2, lambda b: torch.randn(5)),
        "weight_dtype": edit(1, lambda W: W.double()),
        "float64": lambda: base(dtype=torch.float64, adapters=torch.float64),
        "adapter_dtype": edit(3, lambda A: A.half()),
        "int_x": edit(0, lambda x: x.to(torch.int32)),
        "rank_0": lambda: base(r=0),
        "rank_257": lambda: base(r=257),
        "M_0": lambda: base(x_shape=(0, 7)),
        "K_0": lambda: base(x_shape=(5, 0)),
        "x_0d": edit(0, lambda x: torch.tensor(1.0)),
        "weight_1d": edit(1, lambda W: W[0]),
        "meta_weight": edit(1, lambda W: W.to("meta")),
        "meta_x": edit(0, lambda x: x.to("meta")),
        "sparse_weight": edit(1, lambda W: W.to_sparse()),
    }


@pytest.mark.parametrize("name", sorted(_declined_cases()))
def test_entry_declines_what_the_python_path_handles(entry, name):
    """Invalid calls, float64, the empty problems, meta and sparse tensors, a trainable base: None, and the RNG
    untouched (no seed drawn for a call the Python path then runs, which draws its own)."""
    args = _declined_cases()[name]()
    state = torch.get_rng_state()
    assert entry(*args) is None
    assert torch.equal(torch.get_rng_state(), state)


def test_entry_declines_under_autocast_modes_and_transforms(entry):
    """Autocast (the Python path casts like F.linear), a TorchDispatchMode, a __torch_dispatch__ tensor subclass and
    functorch's grad transform are the Python path's: the entry declines them."""
    x, W, b, A, B = _fresh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert entry(x, W, b, A, B, 0.5, 0.0, True) is None
    with _Mode():
        assert entry(x, W, b, A, B, 0.5, 0.0, True) is None
    from torch.testing._internal.two_tensor import TwoTensor  # a __torch_dispatch__ subclass

    tt = TwoTensor(x, x.clone())
    assert entry(tt, W, b, A, B, 0.5, 0.0, True) is None
    seen = []

    def f(xr):
        y = entry(xr, W, b, A, B, 0.5, 0.0, True)
        seen.append(y is None)
        return xr.sum() * 0 if y is None else y.sum()

    torch.func.grad(f)(x[0].clone())
    assert seen == [True]
    # (under vmap the batching fallback hands the op one plain sample at a time: ops.lora_linear does not call the
    # entry while a functorch transform is active)


@pytest.mark.parametrize("training,p", [(True, 0.3), (True, 0.0), (False, 0.3), (True, 1.0)])
def test_entry_draws_the_seed_as_the_python_path(op, entry, training, p):
    """With dropout the entry draws its seed as ops._draw_seed does, from the default CPU generator: the same value
    and the same generator state after it, so torch.manual_seed reproduces a run whichever path took its calls.
    Without dropout (p = 0, eval, or p = 1, which drops the whole LoRA path) nothing is drawn, and p = 1 gives the
    base linear alone."""
    import lora_kernels.ops as ops

    x, W, b, A, B = _fresh()
    torch.manual_seed(123)
    y = entry(x, W, b, A, B, 0.5, p, training)
    after = torch.get_rng_state()
    torch.manual_seed(123)
    if training and 0.0 < p < 1.0:
        assert torch.ops.lora_autograd_shim.last_seed() == int(ops._draw_seed())
    assert torch.equal(torch.get_rng_state(), after)
    if p == 1.0:
        assert torch.equal(y, op(x, W, b, A, B, 0.0, 0.0, 0, 0))


# ------------------------------------------------------------------------------------------- DoRA's C++ entry
# dora_linear_entry (csrc/dora_autograd.h) runs an eager dora_linear call at p = 0 in C++, or declines it (None).
# Here with the shim's reference ATen math (ReferenceDora) on CPU tensors: the node's routing of the grads of x, A,
# B and the magnitude, the ‖W_n‖² cache, the saved output y, and what it declines. The GPU suite checks the cuda
# backend's entry against float64 and PEFT (tests/test_dora.py runs through it by default, tests/test_cuda_dora_ops.py
# checks that it is taken).
@pytest.fixture(scope="module")
def dora_entry(op):
    return torch.ops.lora_autograd_shim.dora_entry


def _dora_fresh(x_shape=(9, 24), N=20, r=4, bias=True, dtype=torch.float32, adapters=torch.float32, seed=0,
                zero_cols=()):
    from test_dora import make

    torch.manual_seed(seed)
    x, W, b, A, B, m = make(x_shape[:-1], x_shape[-1], N, r, dtype, "cpu", bias, adapters)
    if zero_cols:
        m[list(zero_cols)] = 0
    return x, W, b, A, B, m


def _assert_dora_grads(mine, base, ref, req):
    """The grads of (x, A, B, magnitude) under the tolerance rule: mine against ref's float64, base the same-precision
    baseline; none for a leaf that needs none."""
    for name, a, b0, r64, q in zip(("x", "A", "B", "magnitude"), mine, base, ref, req):
        if not q:
            assert a.grad is None, name
            continue
        assert a.grad.dtype == a.dtype, name
        assert_tolerance(a.grad, r64.grad, b0.grad, name)


def _dora_check(dora_entry, x, W, b, A, B, m, req=(True, True, True, True), s=0.75, training=True, dropout_p=0.0,
                owned_dy=False):
    """The entry's output and grads against PEFT's formula in float64, under the tolerance rule with the torch
    backend's float32 dora_linear as the same-precision baseline; the node is DoRA's. owned_dy: y's grad dy comes
    from autograd (the grad of (y ⊙ dy).sum()), so the node owns it and writes g ⊙ dy over it where x needs a grad;
    else the caller holds dy (y.backward(dy)), which the node leaves as it was. Returns how the node made g ⊙ dy
    (dora_last_dyc_in_place)."""
    from test_dora import peft_formula

    import lora_kernels

    def leaves(cast):
        return [cast(t).detach().clone().requires_grad_(q) for t, q in zip((x, A, B, m), req)]

    mine, base, ref = leaves(lambda t: t), leaves(lambda t: t), leaves(lambda t: t.double())
    y = dora_entry(mine[0], W, b, mine[1], mine[2], s, mine[3], dropout_p, training)
    assert y is not None, "declined a call it should take"
    assert y.shape == (*x.shape[:-1], W.shape[0]) and y.dtype == x.dtype
    node = y.grad_fn if x.dim() == 2 else y.grad_fn.next_functions[0][0]  # 3-D: the reshape's view first
    assert "DoraLinearFunction" in node.name()
    y0 = lora_kernels.dora_linear(base[0], W, b, base[1], base[2], s, base[3], dropout_p=dropout_p,
                                  training=training, backend="torch")
    y64 = peft_formula(ref[0], W.double(), None if b is None else b.double(), ref[1], ref[2], s, ref[3])
    assert_tolerance(y, y64, y0, "y")
    dy = torch.randn_like(y)
    dy_before = dy.clone()
    if owned_dy:
        (y * dy).sum().backward()
    else:
        y.backward(dy)
        assert torch.equal(dy, dy_before), "the node wrote over a dy its caller holds"
    how = torch.ops.lora_autograd_shim.dora_last_dyc_in_place()
    assert how == (int(owned_dy) if req[0] else -1), how
    y0.backward(dy)
    y64.backward(dy.double())
    _assert_dora_grads(mine, base, ref, req)
    return how


@pytest.mark.parametrize("case", ["2d", "3d", "nobias", "rank_1", "bf16_fp32_adapters", "bf16_magnitude", "eval_p"])
def test_dora_entry_matches_peft(op, dora_entry, case):
    kw, extra = {}, {}
    if case == "3d":
        kw["x_shape"] = (2, 5, 24)
    elif case == "nobias":
        kw["bias"] = False
    elif case == "rank_1":
        kw["r"] = 1
    elif case == "bf16_fp32_adapters":
        kw["dtype"] = torch.bfloat16
    elif case == "bf16_magnitude":
        kw.update(dtype=torch.bfloat16, adapters=torch.bfloat16)
    elif case == "eval_p":  # dropout off in eval mode: the entry takes it
        extra = dict(training=False, dropout_p=0.3)
    _dora_check(dora_entry, *_dora_fresh(**kw), **extra)


@pytest.mark.parametrize("req", [(True, False, False, False), (False, True, True, False), (False, False, False, True),
                                 (True, False, False, True)], ids=lambda r: "".join("xABm"[i] for i in range(4) if r[i]))
def test_dora_entry_grad_subsets(op, dora_entry, req):
    """Each subset of (x, A, B, magnitude) gets exactly its grads (the magnitude's alone needs no dy_c; x's alone
    no magnitude sum)."""
    _dora_check(dora_entry, *_dora_fresh(seed=1), req=req)


def test_dora_entry_zero_magnitudes(op, dora_entry):
    # g = 0 columns (y = b there): the magnitude's grad from z recomputed for those columns
    _dora_check(dora_entry, *_dora_fresh(seed=2, zero_cols=(0, 7, 8, 19)))


@pytest.mark.parametrize("case", ["2d", "3d", "bf16_fp32_adapters", "zero_magnitudes", "x_only", "no_magnitude"])
def test_dora_entry_owned_dy(op, dora_entry, case):
    """A dy made by autograd (the usual case in a network) is the node's own: g ⊙ dy goes over it (no M×N buffer),
    after the reads of dy, so the grads meet the tolerance rule and equal, bit for bit, those from a dy the caller
    holds. Through a 3-D x's reshape (a view of the next op's grad), with 16-bit dy, with g = 0 columns (whose dy the
    magnitude's recompute reads before they are zeroed), and for the subsets of grads that need g ⊙ dy."""
    kw, req = {}, (True, True, True, True)
    if case == "3d":
        kw["x_shape"] = (2, 5, 24)
    elif case == "bf16_fp32_adapters":
        kw["dtype"] = torch.bfloat16
    elif case == "zero_magnitudes":
        kw["zero_cols"] = (0, 7, 8, 19)
    elif case == "x_only":
        req = (True, False, False, False)
    elif case == "no_magnitude":
        req = (True, True, True, False)
    x, W, b, A, B, m = _dora_fresh(seed=8, **kw)
    if case != "bf16_fp32_adapters":
        # (in bf16 the shim's magnitude grad takes z from the rounded y, as the cuda backend does, against the torch
        # backend's fp32 recompute as the baseline: how close that comes depends on the seed and the torch build's
        # bf16 matmul; tests/test_dora.py checks it on the GPU against PEFT's own bf16 arithmetic. The subject here
        # is the in-place path, which must give the held-dy path's grads bit for bit, below.)
        assert _dora_check(dora_entry, x, W, b, A, B, m, req=req, owned_dy=True) == 1
    dy = torch.randn(*x.shape[:-1], W.shape[0], dtype=x.dtype)
    grads = []
    for owned in (False, True):
        leaves = [t.detach().clone().requires_grad_(q) for t, q in zip((x, A, B, m), req)]
        y = dora_entry(leaves[0], W, b, leaves[1], leaves[2], 0.75, leaves[3], 0.0, True)
        (y * dy).sum().backward() if owned else y.backward(dy)
        assert torch.ops.lora_autograd_shim.dora_last_dyc_in_place() == int(owned)
        grads.append([t.grad for t in leaves])
    for held, owned in zip(*grads):
        assert (held is None) == (owned is None)
        if held is not None:
            assert torch.equal(held, owned)


def test_dora_entry_shared_dy_is_not_overwritten(op, dora_entry):
    """A grad that another node or a hook can still see is not written over: y + y2 hands one grad to both DoRA
    nodes (the first to run leaves it, the last may take it), a retained grad, and a grad hook's capture."""
    x, W, b, A, B, m = _dora_fresh(seed=9)

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (x, A, B, m)]

    def grads_of(run):
        ls = leaves()
        run(ls)
        return [t.grad for t in ls]

    dy = torch.randn(x.shape[0], W.shape[0])

    def plain(ls):
        dora_entry(ls[0], W, b, ls[1], ls[2], 0.75, ls[3], 0.0, True).backward(dy)

    want = grads_of(plain)

    def two_uses(ls):  # the same layer twice, its outputs added: each node gets the add's one grad
        y = dora_entry(ls[0], W, b, ls[1], ls[2], 0.75, ls[3], 0.0, True)
        y2 = dora_entry(ls[0], W, b, ls[1], ls[2], 0.75, ls[3], 0.0, True)
        (y + y2).mul(1.0).backward(dy)

    for got, w in zip(grads_of(two_uses), want):
        torch.testing.assert_close(got, 2 * w, rtol=1e-5, atol=1e-5)

    seen = []

    def hooked(ls):  # a hook that keeps the grad it sees: that grad must still be dy afterwards
        y = dora_entry(ls[0], W, b, ls[1], ls[2], 0.75, ls[3], 0.0, True)
        y.register_hook(lambda g: seen.append(g))
        y.retain_grad()
        (y * dy).sum().backward()
        torch.testing.assert_close(y.grad, dy, rtol=0, atol=0)

    for got, w in zip(grads_of(hooked), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    assert torch.ops.lora_autograd_shim.dora_last_dyc_in_place() == 0
    torch.testing.assert_close(seen[0], dy, rtol=0, atol=0)


def test_dora_entry_no_grad_and_saved_y(op, dora_entry):
    x, W, b, A, B, m = _dora_fresh(seed=3)
    with torch.inference_mode():  # fills the ‖W_n‖² cache with an inference tensor, which later calls then read
        y = dora_entry(x, W, b, A, B, 0.75, m, 0.0, True)
    assert y is not None and y.is_inference()
    with torch.no_grad():
        y = dora_entry(x, W, b, A, B, 0.75, m.requires_grad_(), 0.0, True)
    assert y is not None and y.grad_fn is None
    _dora_check(dora_entry, x, W, b, A, B, m.detach())  # grads after the inference-mode call
    y = dora_entry(x.requires_grad_(), W, b, A, B, 0.75, m, 0.0, True)
    y.add_(1.0)  # the backward reads the output it returned: autograd's clear error, not wrong grads
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_dora_entry_double_backward_is_a_clear_error(op, dora_entry):
    x, W, b, A, B, m = _dora_fresh(seed=4)
    x.requires_grad_(), m.requires_grad_()
    gx, gm = torch.autograd.grad(dora_entry(x, W, b, A, B, 0.75, m, 0.0, True).square().sum(), (x, m),
                                 create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(gx.sum() + gm.sum(), (x, m))


def test_dora_entry_declines(op, dora_entry):
    """A trainable base, float64, autocast, a non-contiguous weight, a magnitude of another shape, dtype or device,
    and the empty problems: None (the Python path runs them)."""
    x, W, b, A, B, m = _dora_fresh(seed=5)
    assert dora_entry(x, W.clone().requires_grad_(), b, A, B, 0.75, m, 0.0, True) is None
    assert dora_entry(x, W, b.clone().requires_grad_(), A, B, 0.75, m, 0.0, True) is None
    d = [t.double() for t in (x, W, b, A, B, m)]
    assert dora_entry(d[0], d[1], d[2], d[3], d[4], 0.75, d[5], 0.0, True) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dora_entry(x, W, b, A, B, 0.75, m, 0.0, True) is None
    Wt = W.t().contiguous().t()
    assert dora_entry(x, Wt, b, A, B, 0.75, m, 0.0, True) is None
    assert dora_entry(x, W, b, A, B, 0.75, m[:-1], 0.0, True) is None
    assert dora_entry(x, W, b, A, B, 0.75, m.to(torch.float16), 0.0, True) is None
    assert dora_entry(x, W, b, A, B, 0.75, m.to("meta"), 0.0, True) is None
    assert dora_entry(x, W, b, A, B, float("inf"), m, 0.0, True) is None
    assert dora_entry(x[:0], W, b, A, B, 0.75, m, 0.0, True) is None
    assert dora_entry(x, W, b, A, B, 0.75, m, 1.0, True) is None  # everything dropped: dora_linear's _all_dropped
    assert dora_entry(x, W, b, A, B, 0.75, m, 1.5, False) is None
    # in eval the rate does not apply: p = 1 is the p = 0 call
    torch.testing.assert_close(dora_entry(x, W, b, A, B, 0.75, m, 1.0, False),
                               dora_entry(x, W, b, A, B, 0.75, m, 0.0, False), rtol=0, atol=0)


# DoRA's C++ entry with dropout (DoraDropoutFunction): the contract's mask from the seed it draws (as
# ops._draw_seed draws it), the forward's and backward's row chunks at their counter offsets, and the grads'
# routing, against PEFT's formula in float64 with that mask and against the torch backend's Python path, which draws
# the same seed from the same generator state.
def _seed_after(k):
    """torch.manual_seed(k), and the seed that the next dropout call then draws."""
    from test_dora import next_dropout_seed

    torch.manual_seed(k)
    return next_dropout_seed()


def _dora_dropout_check(dora_entry, x, W, b, A, B, m, p=0.3, req=(True, True, True, True), s=0.75,
                        chunk_bytes=64 << 20, monkeypatch=None):
    from test_dora import peft_formula

    import lora_kernels
    from lora_kernels import dora

    if monkeypatch is not None:  # the Python path's chunks as the entry's
        monkeypatch.setattr(dora, "BWD_CHUNK_BYTES", chunk_bytes)

    def leaves(cast):
        return [cast(t).detach().clone().requires_grad_(q) for t, q in zip((x, A, B, m), req)]

    mine, base, ref = leaves(lambda t: t), leaves(lambda t: t), leaves(lambda t: t.double())
    seed = _seed_after(77)
    y = dora_entry(mine[0], W, b, mine[1], mine[2], s, mine[3], p, True, chunk_bytes)
    assert y is not None, "declined a call it should take"
    after_entry = torch.rand(3)
    node = y.grad_fn if x.dim() == 2 else y.grad_fn.next_functions[0][0]
    assert "DoraDropoutFunction" in node.name()
    assert _seed_after(77) == seed
    y0 = lora_kernels.dora_linear(base[0], W, b, base[1], base[2], s, base[3], dropout_p=p, backend="torch")
    assert torch.equal(torch.rand(3), after_entry), "the entry drew another number of random values"
    x2 = x.reshape(-1, x.shape[-1])
    keep = lora_kernels.dropout_mask(seed, 0, x2.shape, p).reshape(x.shape)
    assert 0 < (~keep).sum() < keep.numel()
    y64 = peft_formula(ref[0], W.double(), None if b is None else b.double(), ref[1], ref[2], s, ref[3], keep, p)
    assert_tolerance(y, y64, y0, "y")
    with torch.no_grad():  # the forward without a node: the same output
        _seed_after(77)
        assert torch.equal(dora_entry(x, W, b, A, B, s, m, p, True, chunk_bytes), y)
    dy = torch.randn_like(y)
    y.backward(dy)
    y0.backward(dy)
    y64.backward(dy.double())
    _assert_dora_grads(mine, base, ref, req)


@pytest.mark.parametrize("case", ["2d", "3d", "nobias", "bf16_fp32_adapters", "chunked", "chunked_3d"])
def test_dora_entry_dropout(op, dora_entry, monkeypatch, case):
    kw, extra = {}, {}
    if case in ("3d", "chunked_3d"):
        kw["x_shape"] = (3, 50, 24)
    elif case == "nobias":
        kw["bias"] = False
    elif case == "bf16_fp32_adapters":
        kw["dtype"] = torch.bfloat16
    if case.startswith("chunked"):  # several row chunks: (N + K) * 4 bytes a row, 64-row chunks
        extra["chunk_bytes"] = 64 * (20 + 24) * 4
        kw.setdefault("x_shape", (150, 24))
    _dora_dropout_check(dora_entry, *_dora_fresh(seed=11, **kw), monkeypatch=monkeypatch, **extra)


@pytest.mark.parametrize("req", [(True, False, False, False), (False, True, True, False), (False, False, False, True),
                                 (True, False, False, True)],
                         ids=lambda r: "".join("xABm"[i] for i in range(4) if r[i]))
def test_dora_entry_dropout_grad_subsets(op, dora_entry, monkeypatch, req):
    """Each subset of (x, A, B, magnitude) gets exactly its grads with dropout too (x's alone: dy_c without z; the
    magnitude's alone: z without dy_c), over two row chunks."""
    _dora_dropout_check(dora_entry, *_dora_fresh(x_shape=(100, 24), seed=12), req=req,
                        chunk_bytes=64 * (20 + 24) * 4, monkeypatch=monkeypatch)


def test_dora_entry_dropout_saves_nothing_m_by_n(op, dora_entry):
    """The dropout node saves what lora_linear saves (x, u: M×r) plus O(N·r) (g ⊙ B, g, the norm): no mask, no dropped
    x, nothing M×N or N×K (M, K < N here, so an M×N tensor is the largest possible)."""
    from test_dora_memory import _saved_numels

    x, W, b, A, B, m = _dora_fresh(x_shape=(30, 24), N=40, r=4, seed=14)
    for t in (x, A, B, m):
        t.requires_grad_()
    out = []
    saved = _saved_numels(lambda: out.append(dora_entry(x, W, b, A, B, 0.75, m, 0.3, True)), (W, b, A, B, m))
    assert "DoraDropoutFunction" in out[0].grad_fn.name()
    numels = sorted(n for n, _ in saved.values())
    M, K, N, r = 30, 24, 40, 4
    assert numels[-1] == M * K and M * K < M * N, numels  # x the largest
    assert sorted(numels) == sorted([M * K, M * r, N * r, N, N]), numels  # x, u, g ⊙ B, g, the norm


def test_dora_entry_dropout_row_chunks_and_record(op, dora_entry, monkeypatch):
    """The entry's row chunks are dora.py's (_row_chunks_of), and dora_linear hands a dropout call inside
    record_dropout to its Python path, which records the seed (the entry would draw one the recorder never sees),
    but still hands it calls without dropout."""
    import lora_kernels
    from lora_kernels import _dispatch, dora

    for M, row_bytes, chunk in [(8192, 16384, 64 << 20), (100, 176, 64 * 176), (1000, 100, 999), (7, 4, 1 << 20),
                                (8192, 36864, 64 << 20), (130, 10, 10)]:
        monkeypatch.setattr(dora, "BWD_CHUNK_BYTES", chunk)
        want = [v for c in dora._row_chunks_of(M, row_bytes) for v in c]
        assert torch.ops.lora_autograd_shim.dora_row_chunks(M, row_bytes, chunk) == want, (M, chunk)
    monkeypatch.setattr(dora, "BWD_CHUNK_BYTES", 64 * 176)
    asked = []
    monkeypatch.setattr(_dispatch, "call_entry", lambda *a: asked.append(a[9:]))  # (dropout_p, training, chunk)
    x, W, b, A, B, m = _dora_fresh(seed=13)
    with lora_kernels.record_dropout() as calls:
        lora_kernels.dora_linear(x, W, b, A, B, 0.75, m, dropout_p=0.2)
        assert asked == [] and len(calls) == 1
        lora_kernels.dora_linear(x, W, b, A, B, 0.75, m, dropout_p=0.2, training=False)
        lora_kernels.dora_linear(x, W, b, A, B, 0.75, m)
    assert asked == [(0.2, False, 64 * 176), (0.0, True, 64 * 176)] and len(calls) == 1
    lora_kernels.dora_linear(x, W, b, A, B, 0.75, m, dropout_p=0.2)
    assert asked[-1] == (0.2, True, 64 * 176)


def test_dora_entry_norm_cache_follows_the_weight(op, dora_entry):
    """The C++ ‖W_n‖² cache: a repeated call reuses it, and an in-place change of W (version counter), a new
    storage through W.data, and other strides all give the new weight's output; an in-place change that bypasses the
    version counter is its documented blind spot, which dora.clear_weight_norm_cache() clears."""
    from test_dora import peft_formula

    from lora_kernels import dora

    x, W0, b, A, B, m = _dora_fresh(seed=6)
    W = torch.nn.Parameter(W0.clone(), requires_grad=False)

    def check():
        y = dora_entry(x, W, b, A, B, 0.75, m, 0.0, True)
        want = peft_formula(x.double(), W.double(), b.double(), A.double(), B.double(), 0.75, m.double())
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
        return y

    y1 = check()
    assert torch.equal(check(), y1)
    with torch.no_grad():
        W.mul_(1.5)
    check()
    W.data = torch.randn_like(W0) / 5
    check()
    W.data.mul_(2.0)  # no version bump, same address: stale until the cache is cleared
    stale = dora_entry(x, W, b, A, B, 0.75, m, 0.0, True)
    want = peft_formula(x.double(), W.double(), b.double(), A.double(), B.double(), 0.75, m.double())
    assert not torch.allclose(stale.double(), want, rtol=1e-3, atol=1e-3)
    torch.ops.lora_autograd_shim.dora_clear_cache()
    check()
    dora.clear_weight_norm_cache()  # also reaches the cuda backend's cache where it is built; harmless here
