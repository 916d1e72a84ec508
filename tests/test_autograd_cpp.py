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

from conftest import torch_cxx_std

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
