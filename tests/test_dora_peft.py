"""DoRA against PEFT itself (peft 0.21, real tiny random-init Llama and single layers, CPU): patch_peft on
use_dora=True layers (outputs and grads of x, lora_A, lora_B, magnitude, with and without dropout), the report,
save_pretrained, merge/unmerge; and LoRALinear(use_dora=True)."""
import copy
import filecmp
import os

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lora_kernels  # noqa: E402
from lora_kernels import dora  # noqa: E402
from lora_kernels.peft_patch import is_patched, patch_peft, unpatch_peft  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinearLayer  # noqa: E402

from conftest import PEFT_TARGETS as TARGETS, backend_cases, import_from, randomize_adapters  # noqa: E402
from conftest import tiny_llama as _tiny_llama  # noqa: E402

N_LORA = 2 * len(TARGETS)
# backends that run on CPU tensors here (torch; triton under TRITON_INTERPRET=1)
CPU_BACKENDS = [b for b, d in backend_cases() if d == "cpu"]


def _dora_llama(dtype=torch.float32, dropout=0.0, **kw):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout, use_dora=True, **kw)
    model = get_peft_model(_tiny_llama(dtype), cfg)
    randomize_adapters(model, magnitudes=True)
    return model.eval()


def _ids(seed=0):
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(seed))


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinearLayer)}


def _rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_rule(got, peft_out, ref, floor, name=""):
    """Error vs float64 <= 2x PEFT's own error + floor (relative norms)."""
    e_got, e_ref = _rel_err(got, ref), _rel_err(peft_out, ref)
    assert e_got <= 2 * e_ref + floor, (name, e_got, e_ref)


def _logits_and_grads(model, ids, gseed=3):
    out = model(ids).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(gseed), dtype=torch.float64).to(out.device)
    model.zero_grad(set_to_none=True)
    (out.double() * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return out.detach(), grads


# ------------------------------------------------------------------------------------------- patch_peft
def test_patch_reports_dora_layers():
    model = _dora_llama()
    report = patch_peft(model)
    assert report.num_patched == N_LORA and report.skipped == {}
    assert sorted(report.dora) == sorted(report.patched) == sorted(_layers(model))
    assert f"patched {N_LORA} LoRA Linear layer(s) ({N_LORA} of them DoRA)" in str(report)
    assert all(is_patched(m) for m in _layers(model).values())
    assert unpatch_peft(model) == N_LORA


def test_plain_lora_report_has_no_dora():
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    report = patch_peft(model)
    assert report.num_patched == N_LORA and report.dora == [] and "DoRA" not in str(report)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_and_grads_match_peft_fp32(backend):
    model = _dora_llama()
    ids = _ids()
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(model).double(), ids)
    peft_logits, peft_grads = _logits_and_grads(model, ids)
    assert patch_peft(model, backend=backend).num_patched == N_LORA
    logits, grads = _logits_and_grads(model, ids)
    assert len(grads) == 3 * N_LORA and set(grads) == set(peft_grads)
    assert sum("lora_magnitude_vector" in n for n in grads) == N_LORA
    torch.testing.assert_close(logits, peft_logits, rtol=1e-4, atol=1e-5)
    _check_rule(logits, peft_logits, ref_logits, 1e-6, "logits")
    for name in grads:
        assert _rel_err(grads[name], peft_grads[name]) < 1e-4, name
        _check_rule(grads[name], peft_grads[name], ref_grads[name], 1e-5, name)
    # the adapter matters: without it the logits differ
    with model.disable_adapter():
        assert _rel_err(model(ids).logits, logits) > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_adapters_on_half_base(backend):
    # bf16 on the torch backend; fp16 under the Triton interpreter (it mis-computes bf16 dots)
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    model = _dora_llama(dtype=dtype)  # autocast_adapter_dtype=True (default): fp32 adapters and magnitudes
    layer = next(iter(_layers(model).values()))
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    ids = _ids()
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(model).double(), ids)
    peft_logits, peft_grads = _logits_and_grads(model, ids)
    patch_peft(model, backend=backend)
    logits, grads = _logits_and_grads(model, ids)
    assert logits.dtype == peft_logits.dtype == dtype
    _check_rule(logits, peft_logits, ref_logits, 1e-3, "logits")
    for name in grads:
        assert grads[name].dtype == peft_grads[name].dtype == torch.float32
        _check_rule(grads[name], peft_grads[name], ref_grads[name], 1e-3, name)


def _single(dropout=0.0, dtype=torch.float32, bias=True, K=48, N=40):
    torch.manual_seed(0)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(K, N, bias=bias, dtype=dtype)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(One(), LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], lora_dropout=dropout,
                                             use_dora=True))
    randomize_adapters(model, magnitudes=True)
    return model, model.base_model.model.lin


def _layer_grads(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y.backward(dy.to(y.dtype))
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    return [y.detach(), x.grad] + [p.grad.clone() for p in params]


class _FixedMask(nn.Module):
    """Applies the op's keep-mask for (seed, offset 0) with inverted scaling: PEFT's dropout with our mask."""

    def __init__(self, seed, p):
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x):
        keep = lora_kernels.dropout_mask(self.seed, 0, x.shape, self.p, device=x.device)
        return x * keep.to(x.dtype) / (1.0 - self.p)


NAMES = ("y", "dx", "dA", "dB", "dmagnitude")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_single_layer_all_grads_match_peft(backend, bias, p):
    model, layer = _single(dropout=p, bias=bias)
    model.train()
    x, dy = torch.randn(3, 5, 48), torch.randn(3, 5, 40)
    patch_peft(model, backend=backend)
    with lora_kernels.record_dropout() as calls:
        ours = _layer_grads(layer, x, dy)
    assert len(calls) == (1 if p else 0)
    unpatch_peft(model)
    if p:  # PEFT with our mask in place of its nn.Dropout
        layer.lora_dropout["default"] = _FixedMask(calls[0][0], p)
    theirs = _layer_grads(layer, x, dy)
    ref = _layer_grads(copy.deepcopy(layer).double(), x.double(), dy.double())
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert a.dtype == b.dtype, name
        _check_rule(a, b, r, 1e-6, name)
        assert _rel_err(a, b) < 1e-5, name


def _model_vs_peft(backend, p, dtype=torch.float32, device="cpu", floor=1e-5):
    """patch_peft on a tiny DoRA Llama against unpatched PEFT, with dropout p through the same masks (PEFT's
    nn.Dropout replaced by _FixedMask with each layer's recorded seed), and a float64 copy as the reference."""
    model = _dora_llama(dtype=dtype, dropout=p).to(device).train()
    ids = _ids().to(device)
    patch_peft(model, backend=backend)
    order, hooks = [], []
    for name, m in _layers(model).items():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name)))
    with lora_kernels.record_dropout() as calls:
        logits, grads = _logits_and_grads(model, ids)
    for h in hooks:
        h.remove()
    assert len(calls) == (N_LORA if p else 0) and len(order) == N_LORA
    unpatch_peft(model)
    layers = _layers(model)
    for name, (seed, offset) in zip(order, calls):
        assert offset == 0
        layers[name].lora_dropout["default"] = _FixedMask(seed, p)
    peft_logits, peft_grads = _logits_and_grads(model, ids)
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(model).double(), ids)
    assert logits.dtype == peft_logits.dtype == dtype and len(grads) == 3 * N_LORA
    _check_rule(logits, peft_logits, ref_logits, floor, "logits")
    for name in grads:
        assert grads[name].dtype == peft_grads[name].dtype, name
        _check_rule(grads[name], peft_grads[name], ref_grads[name], floor, name)
    return logits, peft_logits


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_dropout_matches_peft_with_same_masks(backend):
    logits, peft_logits = _model_vs_peft(backend, 0.1)
    assert _rel_err(logits, peft_logits) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_half_base_dropout_matches_peft(backend):
    # fp32 adapters on a 16-bit base (PEFT's default); fp16 under the Triton interpreter (bf16 dots are wrong there)
    _model_vs_peft(backend, 0.1, dtype=torch.float16 if backend == "triton" else torch.bfloat16, floor=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_model_matches_peft_bf16_fp32_adapters(p, backend):
    # one case per backend, so that an outcome names the backend. At p = 0 every column of this model takes the
    # saved-y backward's recompute of z on the fast backends: its adapter rows are about 4× W's (randomize_adapters
    # against Llama's 0.02-std init), past the rule's ‖s·(B A)_n‖ > ‖W_n‖ / 2
    if backend not in lora_kernels.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    _model_vs_peft(backend, p, dtype=torch.bfloat16, device="cuda", floor=1e-3)


def test_dropout_modes_follow_peft():
    # PEFT's DoRA drops x only when the layer is in training mode (DoraLinearVariant.forward), whatever the
    # dropout module's own mode; with the layer training and the dropout module in eval, its identity runs
    model, layer = _single(dropout=0.3)
    x = torch.randn(4, 48)
    patch_peft(model)
    for layer_train, dropout_train in ((False, True), (True, False), (False, False)):
        layer.train(layer_train)
        layer.lora_dropout["default"].train(dropout_train)
        with lora_kernels.record_dropout() as calls, torch.no_grad():
            y = layer(x)
        assert calls == []
        unpatch_peft(model)
        with torch.no_grad():
            torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-6)
        patch_peft(model)


def test_bf16_layer_output_dtype_and_value():
    model, layer = _single(dtype=torch.bfloat16)
    x = torch.randn(6, 48).to(torch.bfloat16)
    dy = torch.randn(6, 40)
    theirs = _layer_grads(layer, x, dy)
    ref = _layer_grads(copy.deepcopy(layer).double(), x.double(), dy.double())
    patch_peft(model)
    ours = _layer_grads(layer, x, dy)
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert a.dtype == b.dtype, name
        _check_rule(a, b, r, 1e-3, name)


def test_cpu_autocast_bf16_like_peft():
    model = _dora_llama()
    ids = _ids()
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(model).double(), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_logits, peft_grads = _logits_and_grads(model, ids)
        patch_peft(model)
        logits, grads = _logits_and_grads(model, ids)
    assert logits.dtype == peft_logits.dtype
    _check_rule(logits, peft_logits, ref_logits, 1e-3, "logits")
    for name in grads:
        assert grads[name].dtype == peft_grads[name].dtype == torch.float32
        _check_rule(grads[name], peft_grads[name], ref_grads[name], 1e-3, name)


def test_fast_path_is_taken(monkeypatch):
    calls = []
    real = dora.dora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dora, "dora_linear", counting)
    model = _dora_llama()
    patch_peft(model, backend="torch")
    with torch.no_grad():
        model(_ids())
        assert calls == ["torch"] * N_LORA
        calls.clear()
        with model.disable_adapter():
            model(_ids())
        assert calls == []


def test_disable_adapters_gives_base_output():
    model = _dora_llama()
    ids = _ids()
    with torch.no_grad(), model.disable_adapter():
        base = model(ids).logits
    patch_peft(model)
    with torch.no_grad(), model.disable_adapter():
        got = model(ids).logits
    torch.testing.assert_close(got, base, rtol=0, atol=0)


def _same_tree(a, b):
    files_a = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    files_b = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    assert files_a == files_b and files_a
    for f in files_a:
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


def test_save_pretrained_byte_identical(tmp_path):
    model = _dora_llama()
    ids = _ids()
    model.save_pretrained(tmp_path / "before")
    patch_peft(model)
    _logits_and_grads(model, ids)  # a forward and backward through the patched layers (fills the norm cache)
    model.save_pretrained(tmp_path / "patched")
    unpatch_peft(model)
    model.save_pretrained(tmp_path / "after")
    _same_tree(tmp_path / "before", tmp_path / "patched")
    _same_tree(tmp_path / "before", tmp_path / "after")
    sd = model.state_dict()
    assert sum("lora_magnitude_vector" in k for k in sd) == N_LORA


def test_merge_unmerge_through_peft():
    model = _dora_llama()
    ids = _ids()
    reference = copy.deepcopy(model)
    patch_peft(model)
    with torch.no_grad():
        before = model(ids).logits
        model.merge_adapter()  # PEFT's DoRA merge; the patched forward sees merged and defers to PEFT
        merged = model(ids).logits
        reference.merge_adapter()
        torch.testing.assert_close(merged, reference(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()  # back on the fast path, with W restored (the norm cache must follow it)
        after = model(ids).logits
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert all(is_patched(m) for m in _layers(model).values())
    merged_model = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged_model(ids).logits, before, rtol=1e-4, atol=1e-5)


def test_unsupported_dora_layer_is_skipped_with_reason():
    model, layer = _single()

    class MyDora(type(layer.lora_magnitude_vector["default"])):
        pass

    layer.lora_magnitude_vector["default"].__class__ = MyDora
    report = patch_peft(model)
    assert report.num_patched == 0 and list(report.skipped) == ["base_model.model.lin"]
    assert "magnitude layer" in report.skipped["base_model.model.lin"]


# ------------------------------------------------------------------------------------ LoRALinear(use_dora)
def _module_formula(layer, x, keep=None, p=0.0):
    """The DoRA layer's output in float64 (PEFT's formula)."""
    W, A, B, m = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B, layer.magnitude))
    b = layer.bias.detach().double() if layer.bias is not None else 0.0
    s = layer.scaling
    g = m / torch.linalg.norm(W + s * B @ A, dim=1)
    xd = x.double() if keep is None else x.double() * keep / (1 - p)
    return x.double() @ W.T + b + (g - 1) * (xd @ W.T) + g * ((s * (xd @ A.T)) @ B.T)


def test_module_init_like_peft():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    ours = lora_kernels.LoRALinear.from_linear(copy.deepcopy(lin), r=8, alpha=16, use_dora=True)
    assert ours.magnitude.shape == (40,) and ours.magnitude.requires_grad
    torch.testing.assert_close(ours.magnitude.double(), torch.linalg.norm(lin.weight.double(), dim=1),
                               rtol=1e-6, atol=1e-7)
    x = torch.randn(5, 48)
    torch.testing.assert_close(ours(x), lin(x), rtol=1e-5, atol=1e-6)  # lora_B = 0 and g = 1: the base linear
    fresh = lora_kernels.LoRALinear(48, 40, r=8, use_dora=True)
    torch.testing.assert_close(fresh.magnitude.double(), torch.linalg.norm(fresh.weight.double(), dim=1),
                               rtol=1e-6, atol=1e-7)
    assert "use_dora=True" in repr(fresh)
    assert "magnitude" in fresh.state_dict() and "magnitude" not in lora_kernels.LoRALinear(48, 40).state_dict()


def test_module_matches_peft_layer():
    model, peft_layer = _single(dropout=0.0)
    ours = lora_kernels.LoRALinear(48, 40, r=8, alpha=16, use_dora=True)
    with torch.no_grad():
        ours.weight.copy_(peft_layer.base_layer.weight)
        ours.bias.copy_(peft_layer.base_layer.bias)
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
        ours.magnitude.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    x, dy = torch.randn(7, 48), torch.randn(7, 40)
    theirs = _layer_grads(peft_layer, x, dy)
    xg = x.clone().requires_grad_()
    y = ours(xg)
    y.backward(dy)
    for name, a, b in zip(NAMES, [y.detach(), xg.grad, ours.lora_A.grad, ours.lora_B.grad, ours.magnitude.grad],
                          theirs):
        assert _rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_module_forward_and_grads_float64(p):
    layer = lora_kernels.LoRALinear(40, 24, r=4, alpha=8, dropout=p, use_dora=True).double().train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(0.5 + torch.rand(24, dtype=torch.float64))
    x = torch.randn(2, 6, 40, dtype=torch.float64)
    with lora_kernels.record_dropout() as calls:
        y = layer(x)
    keep = lora_kernels.dropout_mask(*calls[0], x.shape, p).double() if p else None
    torch.testing.assert_close(y, _module_formula(layer, x, keep, p), rtol=1e-10, atol=1e-10)
    y.pow(2).sum().backward()
    assert all(t.grad is not None for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    assert layer.weight.grad is None and layer.bias.grad is None
    layer.eval()
    torch.testing.assert_close(layer(x), _module_formula(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_merge_unmerge(dtype):
    layer = lora_kernels.LoRALinear(48, 40, r=8, alpha=16, use_dora=True, dtype=dtype,
                                    adapter_dtype=torch.float32).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(0.5 + torch.rand(40))
    x = torch.randn(5, 48).to(dtype)
    W0 = layer.weight.detach().clone()
    with torch.no_grad():
        y0 = layer(x)
        layer.merge()
        assert layer.merged
        y1 = layer(x)
        # merged weight = g ⊙ (W + s B A), rounded once (PEFT's DoRA merge)
        W, A, B, m = (t.detach().double() for t in (W0, layer.lora_A, layer.lora_B, layer.magnitude))
        want = (m / torch.linalg.norm(W + layer.scaling * B @ A, dim=1))[:, None] * (W + layer.scaling * B @ A)
        torch.testing.assert_close(layer.weight.double(), want.to(dtype).double(), rtol=0,
                                   atol=2 * torch.finfo(dtype).eps * want.abs().max().item())
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(y1, y0, rtol=tol, atol=tol)
        layer.unmerge()
        assert torch.equal(layer.weight, W0)
        torch.testing.assert_close(layer(x), y0, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- benchmark providers
def test_bench_dora_providers_compute_the_same_layer():
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "suite")
    if not os.path.exists(os.path.join(bench, "providers.py")):
        pytest.skip("no bench/suite/providers.py")
    providers = import_from(bench, "providers")
    outs, grads = {}, {}
    for prov in ("ours-dora-torch", "ours-dora-torch-recompute", "ours-dora-torch-savez", "peft-dora"):
        case = providers.make_case(prov, 24, 40, 32, 4, 0.0, dtype=torch.float32, device="cpu", bias=True)
        outs[prov] = case.fwd[0]()
        grads[prov] = case.fwd_bwd[0]()
        assert len(grads[prov]) == 4 and all(torch.isfinite(g).all() for g in grads[prov])  # x, A, B, magnitude
        assert "DoRA" in case.note
    assert dora.SAVE_Z is False and dora.SAVE_Y is True  # the -savez / -recompute providers set them per call
    for prov in ("ours-dora-torch", "ours-dora-torch-recompute", "ours-dora-torch-savez"):
        torch.testing.assert_close(outs[prov], outs["peft-dora"], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads[prov], grads["peft-dora"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bench_dora_rows_in_the_table(tmp_path):
    # the DoRA rows of the benchmark (--dora providers: ours, PEFT's DoRA, the floor) run through the suite and
    # make_table.py on the CPU smoke grid, with their memory columns
    import json
    import subprocess
    import sys

    pytest.importorskip("pytest_benchmark")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suite = os.path.join(root, "bench", "suite", "test_bench_lora.py")
    if not os.path.exists(suite):
        pytest.skip("no bench/suite")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST") and k != "TRITON_INTERPRET"}
    env.update(LORA_KERNELS_BENCH_CPU_SMOKE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]))  # this tree's lora_kernels
    path = tmp_path / "dora.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite, "--dora", "--benchmark-json",
         str(path), "--providers", "ours-dora-torch,peft-dora,cublas-base", "--shard", "0/4", "--rep-ms", "2",
         "--warmup-ms", "1"], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [b["extra_info"] for b in json.load(open(path))["benchmarks"]]
    assert {r["provider"] for r in rows} == {"ours-dora-torch", "peft-dora", "cublas-base"}
    for r in rows:
        if r["mode"] == "fwd_bwd" and r["provider"] != "cublas-base":
            assert r["saved_bytes"] > 0 and "peak_bytes" in r  # peak_bytes: None on the CPU
    ours = {(r["shape"], r["M"], r["p"]): r["saved_bytes"] for r in rows
            if r["mode"] == "fwd_bwd" and r["provider"] == "ours-dora-torch"}
    theirs = {(r["shape"], r["M"], r["p"]): r["saved_bytes"] for r in rows
              if r["mode"] == "fwd_bwd" and r["provider"] == "peft-dora"}
    assert ours and all(ours[k] < theirs[k] for k in ours)  # PEFT's DoRA saves M×N activations, ours none
    out = tmp_path / "table"
    run = subprocess.run([sys.executable, os.path.join(root, "bench", "tools", "make_table.py"), str(path), "--out",
                          str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (out / "bench_table.md").read_text()
    dora_rows = [line for line in table.splitlines() if line.startswith("| ours-dora-torch |")]
    assert dora_rows and "peak MiB" in table and "saved MiB" in table
