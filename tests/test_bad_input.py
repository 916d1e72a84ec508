"""Inputs at the edges of the contract: each either computes what the reference computes or raises a clear error.

bf16 on the interpreted Triton backend (and CPU autocast to bf16), a float64 base with float32 adapters, tensors on
'meta', NaN/inf in dropped elements, non-finite scaling, dropout p = 1, a merged LoRALinear's state_dict, and
torch.compile without dynamo's lru_cache warning.
"""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import LoRALinear
from lora_kernels.backends import torch_ref

from conftest import HAS_CUDA, INTERPRET, assert_tolerance, backend_cases, formula

TRITON_CASES = [(b, d) for b, d in backend_cases() if b == "triton"]


def _inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=torch.float32, device="cpu"):
    x = torch.randn(M, K, device=device).to(dtype)
    W = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    A = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, device=device) / r**0.5).to(adapter_dtype)
    return x, W, b, A, B


# --------------------------------------------------------------------------------- bf16 on interpreted Triton
@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_triton_cpu_autocast_bf16(backend, device):
    """Under autocast to bf16 the op casts x and W to bf16 (like F.linear); the Triton kernels must then compute
    bf16 correctly (the interpreter needs its bf16 dots widened)."""
    x, W, b, A, B = _inputs(37, 64, 40, 8, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lora_kernels.lora_linear(x, W, b, A, B, 0.5, backend=backend)
    assert y.dtype == torch.bfloat16
    ref = formula(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5)
    same = formula(x.bfloat16(), W.bfloat16(), b.bfloat16(), A, B, 0.5)
    assert_tolerance(y, ref, same)


# ------------------------------------------------------------------------------- float64 base, fp32 adapters
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_float64_base_with_float32_adapters(p):
    """Allowed by the dtype rule (adapters fp32 or x's dtype): runs in float64 on the torch backend."""
    x, W, b, A, B = _inputs(6, 24, 12, 4, dtype=torch.float64, adapter_dtype=torch.float32)
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    with lora_kernels.record_dropout() as calls:
        y = lora_kernels.lora_linear(xg, W, b, Ag, Bg, 0.5, dropout_p=p)
    keep = lora_kernels.dropout_mask(*calls[0], x.shape, p) if p else None
    dy = torch.randn_like(y)
    y.backward(dy)
    r = [t.double().requires_grad_() for t in (x, A, B)]
    ref = formula(r[0], W, b, r[1], r[2], 0.5, keep, p)
    ref.backward(dy)
    assert y.dtype == torch.float64 and xg.grad.dtype == torch.float64
    assert Ag.grad.dtype == Bg.grad.dtype == torch.float32
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xg.grad, r[0].grad, rtol=1e-12, atol=1e-12)
    for got, want in ((Ag.grad, r[1].grad), (Bg.grad, r[2].grad)):  # computed in float64, rounded once to fp32
        torch.testing.assert_close(got, want.float(), rtol=2e-7, atol=1e-7 * want.abs().max().item())


# ------------------------------------------------------------------------------------------------------ meta
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_meta_tensors_propagate_shapes(p, op):
    x = torch.empty(2, 5, 24, device="meta", requires_grad=True)
    W, b = torch.empty(12, 24, device="meta"), torch.empty(12, device="meta")
    A = torch.empty(4, 24, device="meta", requires_grad=True)
    B = torch.empty(12, 4, device="meta", requires_grad=True)
    extra = (torch.empty(12, device="meta", requires_grad=True),) if op == "dora_linear" else ()  # the magnitude
    y = getattr(lora_kernels, op)(x, W, b, A, B, 2.0, *extra, dropout_p=p)
    assert y.device.type == "meta" and y.shape == (2, 5, 12) and y.dtype == torch.float32
    y.sum().backward()
    for t in (x, A, B, *extra):
        assert t.grad.shape == t.shape and t.grad.device.type == "meta"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_meta_tensors_on_a_kernel_backend_are_a_clear_error(backend):
    # meta propagates shapes on the torch backend (and backend=None); a kernel backend asked for by name says so,
    # also where Triton's interpreter takes CPU tensors
    if backend not in lora_kernels.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    x, W, b, A, B = (t.to("meta") for t in _inputs(3, 16, 8, 4))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' needs CUDA tensors, but x is on 'meta'"):
        lora_kernels.lora_linear(x, W, b, A, B, 1.0, backend=backend)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' needs CUDA tensors, but x is on 'meta'"):
        lora_kernels.dora_linear(x, W, b, A, B, 1.0, torch.empty(8, device="meta"), backend=backend)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_linear_module_on_meta(use_dora):
    layer = LoRALinear(24, 12, r=4, dropout=0.1, use_dora=use_dora, device="meta")
    y = layer(torch.empty(3, 24, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 12)


# ------------------------------------------------------------------------------------------ x not a tensor
@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_x_not_a_tensor_is_a_clear_error(op):
    # the autocast check reads x's device before the argument checks: it must not be the one that fails
    import numpy as np

    x, W, b, A, B = _inputs(3, 16, 8, 4)
    extra = (torch.rand(8) + 0.5,) if op == "dora_linear" else ()
    for bad in (None, x.numpy(), np.float32(1.0), [[1.0] * 16]):
        with pytest.raises(ValueError, match=f"{op}: x must be a Tensor"):
            getattr(lora_kernels, op)(bad, W, b, A, B, 1.0, *extra)


# ------------------------------------------------------------------------------------ sparse (non-strided) tensors
@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_sparse_tensors_are_a_clear_error(backend, device, op):
    # the kernels (and the reference's dense math) read strided memory: a sparse or CSR tensor raised a raw error from
    # deep inside (".contiguous(): unsupported memory format", "as_strided ... SparseCPU")
    x, W, b, A, B = _inputs(3, 16, 8, 4, device=device)
    args = dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B)
    if op == "dora_linear":
        args["magnitude"] = torch.rand(8, device=device) + 0.5
    for name, t in args.items():
        for bad_t in [t.to_sparse()] + ([_csr(t)] if t.dim() == 2 else []):
            bad = list(dict(args, **{name: bad_t}).values())
            with pytest.raises(ValueError, match=rf"{op}: {name} must be a dense \(strided\) tensor"):
                getattr(lora_kernels, op)(*bad[:5], 0.5, *bad[5:], backend=backend)


# ---------------------------------------------------------------------------- NaN/inf in a dropped element
def _kernel_backends():
    """(backend name, device) whose kernels apply the dropout mask themselves."""
    out = []
    if INTERPRET or HAS_CUDA:
        out.append(("triton", "cuda" if HAS_CUDA else "cpu"))
    out.append(pytest.param("cuda", "cuda", marks=pytest.mark.skipif(
        "cuda" not in lora_kernels.available_backends(), reason="needs the CUDA extension and a GPU")))
    return out


@pytest.mark.parametrize("backend,device", _kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [9, 100], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_dropped_elements_propagate_like_reference(backend, device, dtype, M, bad):
    """The reference multiplies by the mask (NaN * 0 = inf * 0 = NaN); a select would drop the bad value.
    M = 9 takes Triton's one-launch small-M forward, M = 100 the tiled one; fp32 takes the CUDA FFMA kernels,
    16-bit the tensor-core ones."""
    mod = lora_kernels._dispatch.get(backend)
    K, N, r, p, s, seed = 40, 24, 4, 0.5, 0.75, 1234
    x, W, b, A, B = _inputs(M, K, N, r, dtype=dtype, device=device)
    keep = lora_kernels.dropout_mask(seed, 0, (M, K), p, device=device)
    dropped = (~keep).nonzero()[0].tolist()
    x[dropped[0], dropped[1]] = bad  # a dropped element of x: poisons u, so y, dA and dB (dB = dy^T u)
    B[3, 1] = bad  # g = dy @ B has a non-finite column: dx's LoRA term is non-finite, also where it is dropped
    dy = torch.randn(M, N, device=device).to(dtype)
    out = {}
    for name, m in (("reference", torch_ref), (backend, mod)):
        y, u = m.forward(x, W, b, A, B, s, p, seed, 0)
        dx, dA, dB = m.backward(dy, x, W, A, B, u, s, p, seed, 0, True, True, True)
        out[name] = dict(u=u, y=y, dx=dx, dA=dA, dB=dB)
    assert out["reference"]["dA"].isnan().any() and out["reference"]["dx"].isnan().any()  # it does propagate
    for key, want in out["reference"].items():
        got = out[backend][key]
        assert torch.equal(got.isnan(), want.isnan()), f"{key}: NaN pattern differs from the reference"
        assert torch.equal(got.isinf(), want.isinf()), f"{key}: inf pattern differs from the reference"


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("scaling", [float("inf"), float("-inf"), float("nan"), 10**400],
                         ids=["inf", "-inf", "nan", "int_past_float"])
def test_non_finite_scaling_is_a_clear_error(backend, device, scaling):
    x, W, b, A, B = _inputs(3, 16, 8, 4, device=device)
    with pytest.raises(ValueError, match="scaling must be finite"):
        lora_kernels.lora_linear(x, W, b, A, B, scaling, backend=backend)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_scaling_past_float32_range_overflows_like_peft(backend, device, op):
    # a finite double past float32's range, with float32 tensors: PEFT's s · (B A) (and s · lora) overflow to inf, and
    # its outputs are non-finite; so are ours, without an error (the torch backend's DoRA norm raised one from addmm's
    # alpha, which must fit float32)
    from test_dora import peft_formula

    x, W, b, A, B = _inputs(3, 16, 8, 4, device=device)
    m = torch.rand(8, device=device) + 0.5
    for s in (1e300, -1e300):
        if op == "lora_linear":
            ref = formula(x, W, b, A, B, s)
            y = lora_kernels.lora_linear(x, W, b, A, B, s, backend=backend)
        else:
            ref = peft_formula(x, W, b, A, B, s, m)
            y = lora_kernels.dora_linear(x, W, b, A, B, s, m, backend=backend)
        assert not torch.isfinite(ref).any()
        assert not torch.isfinite(y).any(), (s, y)


# ------------------------------------------------------------------------------------------------ p = 1
@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_dropout_p_one_drops_the_lora_path(backend, device, op):
    """PEFT accepts lora_dropout = 1.0: everything is dropped (DoRA's x_d = 0 too), so y is the base linear and the
    grads of the adapters (and of DoRA's magnitude) are zero in training; in eval dropout does not apply."""
    x, W, b, A, B = _inputs(5, 32, 16, 4, device=device)
    extra = (torch.rand(16, device=device) + 0.5,) if op == "dora_linear" else ()  # DoRA's magnitude
    call = getattr(lora_kernels, op)
    trained = [t.clone().requires_grad_() for t in (x, A, B, *extra)]
    xg, Ag, Bg, *mg = trained
    y = call(xg, W, b, Ag, Bg, 2.0, *mg, dropout_p=1.0, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    base = F.linear(x64, W.double(), b.double())
    base.backward(dy.double())
    assert_tolerance(y, base.detach(), F.linear(x, W, b), "y")
    assert_tolerance(xg.grad, x64.grad, dy @ W, "dx")
    for t in trained[1:]:
        assert torch.equal(t.grad, torch.zeros_like(t)), "an adapter's grad is not zero"
    y_eval = call(x, W, b, A, B, 2.0, *extra, dropout_p=1.0, training=False, backend=backend)
    if op == "lora_linear":
        assert_tolerance(y_eval, formula(x.double(), W.double(), b.double(), A.double(), B.double(), 2.0),
                         formula(x, W, b, A, B, 2.0), "y (eval)")
    else:  # the p = 0 call (its values: tests/test_dora.py)
        want = call(x, W, b, A, B, 2.0, *extra, dropout_p=0.0, backend=backend)
        torch.testing.assert_close(y_eval, want, rtol=0, atol=0)


def test_dropout_p_above_one_is_a_clear_error():
    x, W, b, A, B = _inputs(3, 16, 8, 4)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=1.5)
    for bad in (None, "0.1"):
        with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\]"):
            lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=bad)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_only_the_base_weight_trains(backend, device):
    """Only the base weight and bias require grad: the LoRA kernels' backward has nothing to compute (no launch on
    any backend), and dW, db are the base linear's."""
    x, W, b, A, B = _inputs(6, 24, 16, 4, device=device)
    Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()
    y = lora_kernels.lora_linear(x, Wg, bg, A, B, 0.5, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    want_dW = (dy.double().t() @ x.double())
    assert_tolerance(Wg.grad, want_dW, dy.t() @ x, "dW")
    assert_tolerance(bg.grad, dy.double().sum(0), dy.sum(0), "db")


# ------------------------------------------------------------------------- forward AD, torch.func transforms
def _op_inputs(op, requires_grad=False):
    x, W, b, A, B = _inputs(5, 16, 12, 4, dtype=torch.float64, adapter_dtype=torch.float64)
    extra = (torch.rand(12, dtype=torch.float64) + 0.5,) if op == "dora_linear" else ()
    if requires_grad:  # trainable adapters, as in every PEFT model
        A, B = A.requires_grad_(), B.requires_grad_()
        extra = tuple(e.requires_grad_() for e in extra)
    return x, W, b, A, B, extra


@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
@pytest.mark.parametrize("trainable", [False, True])
def test_forward_mode_ad(op, trainable):
    """Dual tensors: the torch backend (and backend=None, which takes it) propagates the tangent, which for this
    affine map in x is y(x + t) − y(x), also with trainable adapters (the eager path's autograd.Function has no jvp:
    the call runs plain ops); a fused backend named explicitly raises rather than return no tangent."""
    import torch.autograd.forward_ad as fwAD

    x, W, b, A, B, extra = _op_inputs(op, trainable)
    call = getattr(lora_kernels, op)
    t = torch.randn_like(x)
    with torch.no_grad():
        want = call(x + t, W, b, A, B, 2.0, *extra) - call(x, W, b, A, B, 2.0, *extra)
    for backend in (None, "torch"):
        with fwAD.dual_level():
            y = call(fwAD.make_dual(x, t), W, b, A, B, 2.0, *extra, backend=backend)
            tangent = fwAD.unpack_dual(y).tangent
        torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-10)
    if "triton" in lora_kernels.available_backends():
        x32, W32, b32, A32, B32 = (u.detach().float() for u in (x, W, b, A, B))
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
            call(fwAD.make_dual(x32, t.float()), W32, b32, A32, B32, 2.0, *(e.detach().float() for e in extra),
                 backend="triton")


@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_func_grad_and_per_sample_grads(op, p):
    """torch.func.grad of a loss, and per-sample grads (vmap of grad over the rows of x, as DP-SGD libraries take
    them), equal what autograd gives, row by row, in float64. Under the transforms the call runs plain ops
    (ops.transform_backend); with dropout grad draws the seed as an eager call does (the same torch seed gives the
    same mask), and vmap raises vmap's own error for a random op, as for torch's dropout."""
    x, W, b, A, B, extra = _op_inputs(op)
    call = getattr(lora_kernels, op)

    def loss(params, xs):
        return call(xs, W, b, params[0], params[1], 2.0, *params[2:], dropout_p=p).sin().sum()

    params = (A, B) + extra
    torch.manual_seed(4)
    got = torch.func.grad(loss)(params, x)
    leaves = [t.clone().requires_grad_() for t in params]
    torch.manual_seed(4)
    want = torch.autograd.grad(loss(leaves, x), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if p > 0:
        with pytest.raises(RuntimeError, match="random"):
            torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        return
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        rows = torch.autograd.grad(loss(leaves, x[i:i + 1]), leaves)
        for g, w in zip(per_sample, rows):
            torch.testing.assert_close(g[i], w, rtol=1e-12, atol=1e-12)
    if "triton" in lora_kernels.available_backends():  # a fused backend named explicitly: the clear error
        with pytest.raises(NotImplementedError, match="torch.func transforms"):
            torch.func.grad(lambda a: call(x, W, b, a, B, 2.0, *extra, backend="triton").sum())(A)


@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_vmap_over_adapters(op):
    """vmap over a stack of adapters (an ensemble of LoRA heads on one base): each slice equals the call with that
    adapter alone (DoRA's norm, a function of A and B, is batched with them)."""
    x, W, b, A, B, extra = _op_inputs(op)
    As, Bs = torch.stack([A, 2 * A, -A]), torch.stack([B, B.flip(0), 0.5 * B])
    call = getattr(lora_kernels, op)
    got = torch.func.vmap(lambda a, bb: call(x, W, b, a, bb, 2.0, *extra))(As, Bs)
    for i in range(3):
        torch.testing.assert_close(got[i], call(x, W, b, As[i], Bs[i], 2.0, *extra), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------- merged state_dict
def _trained_layer(**kw):
    layer = LoRALinear(32, 24, r=4, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_merged_state_dict_loads_as_merged():
    """A merged layer's state_dict holds the merged weight and the original one: loading it into a fresh layer
    gives the same outputs (the update is not applied twice) and unmerge() restores the original exactly."""
    src = _trained_layer()
    original = src.weight.detach().clone()
    x = torch.randn(6, 32)
    y_unmerged = src(x)
    src.merge()
    y_merged = src(x)
    dst = _trained_layer()
    dst.load_state_dict(src.state_dict())
    assert dst.merged
    torch.testing.assert_close(dst(x), y_merged, rtol=0, atol=0)
    torch.testing.assert_close(dst(x), y_unmerged, rtol=1e-5, atol=1e-5)
    dst.unmerge()
    assert torch.equal(dst.weight, original)
    torch.testing.assert_close(dst(x), y_unmerged, rtol=1e-5, atol=1e-5)


def test_unmerged_state_dict_into_merged_layer_unmerges_it():
    src = _trained_layer()
    x = torch.randn(6, 32)
    dst = _trained_layer()
    dst.merge()
    dst.load_state_dict(src.state_dict())
    assert not dst.merged
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_unmerged_state_dict_has_no_extra_key():
    """An unmerged layer's state_dict keeps its plain keys (loadable by older code and by nn.Linear-like users)."""
    layer = _trained_layer()
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]


def test_adapters_only_into_merged_layer_is_a_clear_error():
    dst = _trained_layer()
    dst.merge()
    adapters = {k: v for k, v in _trained_layer().state_dict().items() if k.startswith("lora_")}
    with pytest.raises(RuntimeError, match="merged"):
        dst.load_state_dict(adapters, strict=False)


# --------------------------------------------------------------------------------------- torch.compile
def test_compile_gives_no_lru_cache_warning():
    import torch._dynamo

    clear = getattr(torch._dynamo.utils.warn_once, "cache_clear", None)
    if clear is not None:
        clear()  # warn_once warns once per process: another test may have triggered it already
    torch._dynamo.reset()
    x, W, b, A, B = _inputs(4, 16, 8, 4)
    f = torch.compile(lambda x: lora_kernels.lora_linear(x, W, b, A, B, 0.5), backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f(x)
    msgs = [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    assert not msgs, msgs[0]


# ------------------------------------------------------------------------------------ PEFT lora_dropout = 1
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_patch_peft_lora_dropout_one_trains_like_peft(use_dora):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=1.0, use_dora=use_dora))
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_()
    model.train()
    ids = torch.randint(0, 64, (2, 7))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        logits.float().square().mean().backward()
        return logits.detach(), {n: prm.grad.clone() for n, prm in model.named_parameters() if "lora_" in n}

    want, want_g = step()
    report = lora_kernels.patch_peft(model)
    assert report.num_patched == 2 and report.num_skipped == 0, str(report)
    got, got_g = step()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, g in got_g.items():
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(want_g[n], torch.zeros_like(g)), n


def _csr(t):
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        return t.to_sparse_csr()


def _check_cases():
    """(name, args of ops._check) over valid forms (Parameters, bias, 3-D and non-contiguous x, int, bool and numpy
    scaling, p = 0 and 1) and invalid ones (each argument wrong in turn)."""
    import numpy as np

    x, W, b, A, B = _inputs(5, 12, 8, 3)
    P = torch.nn.Parameter
    ok = dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B, scaling=0.5, dropout_p=0.1)
    variants = {
        "plain": {}, "no bias": dict(bias=None), "parameters": dict(weight=P(W, requires_grad=False), lora_A=P(A),
                                                                    lora_B=P(B), bias=P(b)),
        "3-D x": dict(x=x.reshape(1, 5, 12)), "non-contiguous x": dict(x=torch.randn(12, 5).t()),
        "int scaling": dict(scaling=2), "bool scaling": dict(scaling=True),
        "numpy scaling": dict(scaling=np.float64(0.5)),
        "p = 0": dict(dropout_p=0.0), "p = 1": dict(dropout_p=1), "bf16 adapters on bf16": dict(
            x=x.bfloat16(), weight=W.bfloat16(), bias=b.bfloat16(), lora_A=A.bfloat16(), lora_B=B.bfloat16()),
        "0-d x": dict(x=torch.tensor(1.0)), "x not a tensor": dict(x=[1.0]), "K mismatch": dict(x=torch.randn(5, 11)),
        "A's K": dict(lora_A=torch.randn(3, 11)), "B's shape": dict(lora_B=torch.randn(8, 4)),
        "B transposed": dict(lora_B=B.t().contiguous()), "rank 0": dict(lora_A=torch.randn(0, 12),
                                                                         lora_B=torch.randn(8, 0)),
        "1-D weight": dict(weight=W.reshape(-1)), "bias shape": dict(bias=torch.randn(9)),
        "bias not a tensor": dict(bias=1.0), "weight dtype": dict(weight=W.double()),
        "int adapters": dict(lora_A=A.int()), "meta weight": dict(weight=W.to("meta")),
        "nan scaling": dict(scaling=float("nan")), "inf scaling": dict(scaling=float("inf")),
        "tensor scaling": dict(scaling=torch.tensor(0.5)), "p > 1": dict(dropout_p=1.5),
        "p < 0": dict(dropout_p=-0.1), "nan p": dict(dropout_p=float("nan")), "None p": dict(dropout_p=None),
        "str p": dict(dropout_p="0.1"), "sparse x": dict(x=x.to_sparse()), "sparse weight": dict(weight=W.to_sparse()),
        "sparse bias": dict(bias=b.to_sparse()), "sparse A": dict(lora_A=A.to_sparse()),
        "sparse CSR B": dict(lora_B=_csr(B)),
    }
    return [(name, {**ok, **v}) for name, v in variants.items()]


@pytest.mark.parametrize("name,kw", _check_cases(), ids=[c[0] for c in _check_cases()])
def test_fast_check_agrees_with_full_checks(name, kw):
    # ops._check's one-chain fast path accepts exactly what _explain's full checks accept, and otherwise raises
    # _explain's message
    from lora_kernels import ops

    def outcome(fn):
        try:
            fn(**kw)
            return None
        except ValueError as e:
            return str(e)

    full = outcome(ops._explain)
    assert outcome(ops._check) == full, name
    valid = name in ("plain", "no bias", "parameters", "3-D x", "non-contiguous x", "int scaling", "bool scaling",
                     "numpy scaling", "p = 0", "p = 1", "bf16 adapters on bf16")
    assert (full is None) == valid, (name, full)
