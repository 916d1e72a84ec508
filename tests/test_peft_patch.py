"""Tests of lora_kernels.peft_patch on a tiny random Llama (CPU, default backend, no downloads)."""
import copy
import filecmp
import math
import os
import sys

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lora_kernels  # noqa: E402
from lora_kernels.peft_patch import PatchReport, is_patched, patch_peft, unpatch_peft  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinearLayer  # noqa: E402

from conftest import PEFT_TARGETS as TARGETS, randomize_adapters  # noqa: E402
from conftest import tiny_llama as _tiny_llama  # noqa: E402

N_LORA = 2 * len(TARGETS)


def _peft_llama(dtype=torch.float32, dropout=0.0, **lora_kwargs):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout, **lora_kwargs)
    model = get_peft_model(_tiny_llama(dtype), cfg)
    randomize_adapters(model)
    return model.eval()


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 11), generator=g)


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinearLayer)}


def _rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _logits_and_lora_grads(model, ids, gseed=3):
    out = model(ids).logits
    g = torch.Generator().manual_seed(gseed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    (out.double() * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return out.detach(), grads


def _check_rule(got, unpatched, ref, floor):
    """Tolerance rule: error vs float64 <= 2x the unpatched (PEFT) error + floor."""
    e_got, e_ref = _rel_err(got, ref), _rel_err(unpatched, ref)
    assert e_got <= 2 * e_ref + floor, (e_got, e_ref)


# ------------------------------------------------------------------------------------------ basic patching
def test_patch_all_layers_and_report():
    model = _peft_llama()
    report = patch_peft(model)
    assert isinstance(report, PatchReport)
    assert report.num_patched == N_LORA and report.skipped == {}
    assert set(report.patched) == set(_lora_layers(model))
    assert all(is_patched(m) for m in _lora_layers(model).values())
    assert f"patched {N_LORA}" in str(report)
    assert unpatch_peft(model) == N_LORA
    assert not any("forward" in m.__dict__ for m in _lora_layers(model).values())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_and_grads_match_peft_fp32(use_rslora):
    model = _peft_llama(use_rslora=use_rslora)
    layer = next(iter(_lora_layers(model).values()))
    expect_scaling = 16 / math.sqrt(8) if use_rslora else 16 / 8
    assert layer.scaling["default"] == pytest.approx(expect_scaling)
    ids = _ids()
    ref_model = copy.deepcopy(model).double()
    ref_logits, ref_grads = _logits_and_lora_grads(ref_model, ids)
    base_logits, base_grads = _logits_and_lora_grads(model, ids)
    assert patch_peft(model).num_patched == N_LORA
    logits, grads = _logits_and_lora_grads(model, ids)
    torch.testing.assert_close(logits, base_logits, rtol=1e-4, atol=1e-5)
    _check_rule(logits, base_logits, ref_logits, 1e-6)
    assert set(grads) == set(base_grads) and len(grads) == 2 * N_LORA
    for name in grads:
        assert _rel_err(grads[name], base_grads[name]) < 1e-4, name
        _check_rule(grads[name], base_grads[name], ref_grads[name], 1e-5)
    # the adapter matters (lora_B is nonzero) and its scaling is used: compare with a model without it
    with model.disable_adapter():
        assert _rel_err(model(ids).logits, logits) > 1e-3


def test_single_layer_rslora_scaling_by_hand():
    layer = _single_layer(dropout=0.0, use_rslora=True, r=4, alpha=8)
    x = torch.randn(5, 32)
    patch_peft(layer)
    y = layer(x)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    base = layer.base_layer
    ref = x.double() @ base.weight.double().T + base.bias.double() + (x.double() @ A.T) @ B.T * (8 / math.sqrt(4))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_fp32_adapters_on_bf16_base():
    model = _peft_llama(dtype=torch.bfloat16)  # autocast_adapter_dtype=True (default): fp32 adapters
    layer = next(iter(_lora_layers(model).values()))
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    ids = _ids()
    ref_logits, ref_grads = _logits_and_lora_grads(copy.deepcopy(model).double(), ids)
    base_logits, base_grads = _logits_and_lora_grads(model, ids)
    assert patch_peft(model).num_patched == N_LORA
    logits, grads = _logits_and_lora_grads(model, ids)
    assert logits.dtype == base_logits.dtype == torch.bfloat16
    _check_rule(logits, base_logits, ref_logits, 1e-3)
    for name in grads:
        assert grads[name].dtype == base_grads[name].dtype == torch.float32
        _check_rule(grads[name], base_grads[name], ref_grads[name], 1e-3)


def test_output_dtype_like_peft_single_layer_bf16():
    layer = _single_layer(dtype=torch.bfloat16)
    x = torch.randn(4, 32).to(torch.bfloat16)
    y0 = layer(x)
    patch_peft(layer)
    y1 = layer(x)
    assert y1.dtype == y0.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- dropout
class _Tiny(nn.Module):
    def __init__(self, k=32, n=24, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(k, n, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def _single_layer(dropout=0.0, dtype=torch.float32, r=8, alpha=16, **kw):
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(dtype=dtype), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"],
                                                          lora_dropout=dropout, **kw))
    randomize_adapters(model)
    layer = model.base_model.model.lin
    assert isinstance(layer, LoraLinearLayer)
    return layer


def test_dropout_train_matches_mask_reference():
    p = 0.1
    layer = _single_layer(dropout=p).train()
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    assert patch_peft(layer).num_patched == 1
    x = torch.randn(3, 5, 32, requires_grad=True)
    with lora_kernels.ops.record_dropout() as calls:
        y = layer(x)
    assert len(calls) == 1
    seed, offset = calls[0]
    keep = lora_kernels.dropout_mask(seed, offset, x.shape, p, x.device)
    assert keep.shape == x.shape and 0 < (~keep.bool()).sum() < keep.numel()

    base = layer.base_layer
    xd = x.detach().double().requires_grad_()
    A = layer.lora_A["default"].weight.detach().double().requires_grad_()
    B = layer.lora_B["default"].weight.detach().double().requires_grad_()
    xl = xd * keep.double() / (1 - p)
    ref = xd @ base.weight.double().T + base.bias.double() + (xl @ A.T) @ B.T * layer.scaling["default"]
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)

    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.float())
    ref.backward(g)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), B.grad, rtol=1e-5, atol=1e-5)

    # eval mode: no dropout, same as PEFT
    layer.eval()
    with lora_kernels.ops.record_dropout() as calls:
        y_eval = layer(x)
    assert calls == []
    unpatch_peft(layer)
    torch.testing.assert_close(y_eval, layer(x), rtol=1e-5, atol=1e-6)


def test_dropout_model_train_mode_runs():
    model = _peft_llama(dropout=0.1).train()
    assert patch_peft(model).num_patched == N_LORA
    ids = _ids()
    with lora_kernels.ops.record_dropout() as calls:
        out = model(ids).logits
    assert len(calls) == N_LORA
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------------------- skip reasons
def test_dora_layers_patched_and_reported():
    # DoRA layers run lora_kernels.dora_linear (their numerics: tests/test_dora_peft.py)
    model = _peft_llama(use_dora=True)
    report = patch_peft(model)
    assert report.num_patched == N_LORA and report.skipped == {}
    assert sorted(report.dora) == sorted(report.patched)
    assert "DoRA" in str(report)


def test_lora_bias_skipped():
    report = patch_peft(_peft_llama(lora_bias=True))
    assert report.num_patched == 0 and all("lora_bias" in r for r in report.skipped.values())


def _two_adapter_model():
    model = _peft_llama()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(model, seed=5)
    return model


def test_multiple_active_adapters_skipped():
    model = _two_adapter_model()
    model.base_model.set_adapter(["default", "other"])
    report = patch_peft(model)
    assert report.num_patched == 0 and len(report.skipped) == N_LORA
    assert all("2 active adapters" in r for r in report.skipped.values())


def test_merged_layers_skipped():
    model = _peft_llama()
    model.merge_adapter()
    report = patch_peft(model)
    assert report.num_patched == 0 and all("merged" in r for r in report.skipped.values())


def test_fan_in_fan_out_and_quantized_like_base_skipped():
    layer = _single_layer()

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    layer.base_layer.__class__ = MyLinear
    reason = patch_peft(layer).skipped[""]
    assert "overrides forward" in reason
    layer.base_layer.__class__ = nn.Linear
    layer.fan_in_fan_out = True
    assert "fan_in_fan_out" in patch_peft(layer).skipped[""]


# ---------------------------------------------------------------------------------- runtime fallbacks
def test_runtime_changes_fall_back_to_peft():
    model = _two_adapter_model()
    ids = _ids()
    assert patch_peft(model).num_patched == N_LORA  # only "default" active

    def both():
        with torch.no_grad():
            y_patched = model(ids).logits
            unpatch_peft(model)
            y_peft = model(ids).logits
            patch_peft(model)
        return y_patched, y_peft

    y_patched, y_peft = both()
    torch.testing.assert_close(y_patched, y_peft, rtol=1e-4, atol=1e-5)
    # switch the (single) active adapter: the patch follows it
    model.set_adapter("other")
    y_patched, y_peft = both()
    torch.testing.assert_close(y_patched, y_peft, rtol=1e-4, atol=1e-5)
    # two active adapters after patching: falls back to PEFT's forward (still patched)
    patch_peft(model)
    model.base_model.set_adapter(["default", "other"])
    assert all(is_patched(m) for m in _lora_layers(model).values())
    with torch.no_grad():
        y = model(ids).logits
    unpatch_peft(model)
    with torch.no_grad():
        torch.testing.assert_close(y, model(ids).logits, rtol=0, atol=0)
    # merged after patching: falls back too
    model.base_model.set_adapter("default")
    patch_peft(model)
    model.merge_adapter()
    with torch.no_grad():
        y = model(ids).logits
    unpatch_peft(model)
    with torch.no_grad():
        torch.testing.assert_close(y, model(ids).logits, rtol=0, atol=0)
    model.unmerge_adapter()


def test_mixed_batch_adapter_names_falls_back():
    model = _two_adapter_model()
    ids = _ids()
    names = ["default", "other"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
        patch_peft(model)
        got = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_disable_adapters_gives_base_output():
    model = _peft_llama()
    ids = _ids()
    with torch.no_grad(), model.disable_adapter():
        base = model(ids).logits
    patch_peft(model)
    with torch.no_grad():
        with model.disable_adapter():
            got = model(ids).logits
        enabled = model(ids).logits
    torch.testing.assert_close(got, base, rtol=0, atol=0)
    assert _rel_err(enabled, base) > 1e-3


# ------------------------------------------------------------------------------- state_dict / save_pretrained
def test_state_dict_unchanged():
    model = _peft_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch_peft(model)
    during = model.state_dict()
    unpatch_peft(model)
    after = model.state_dict()
    for sd in (during, after):
        assert list(sd) == list(before)
        assert all(torch.equal(sd[k], before[k]) for k in before)
    assert not any("forward" in k or "lora_kernels" in k for k in during)


def _same_tree(a, b):
    files_a = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    files_b = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    assert files_a == files_b and files_a
    for f in files_a:
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


def test_save_pretrained_byte_identical(tmp_path):
    model = _peft_llama()
    model.save_pretrained(tmp_path / "before")
    patch_peft(model)
    model.save_pretrained(tmp_path / "patched")
    unpatch_peft(model)
    model.save_pretrained(tmp_path / "after")
    _same_tree(tmp_path / "before", tmp_path / "patched")
    _same_tree(tmp_path / "before", tmp_path / "after")


def test_missing_peft_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft.tuners.lora.layer", None)
    with pytest.raises(ImportError, match="needs the `peft` package"):
        patch_peft(nn.Linear(2, 2))


def test_bad_arguments_fail_at_patch_time():
    # a model that is not a module raised AttributeError ('str' object has no attribute 'named_modules'); a backend
    # typo was taken, to fail at the first forward
    model = _peft_llama()
    for bad in ("model", None):
        with pytest.raises(TypeError, match="patch_peft: model must be a torch.nn.Module"):
            patch_peft(bad)
        with pytest.raises(TypeError, match="unpatch_peft: model must be a torch.nn.Module"):
            unpatch_peft(bad)
    with pytest.raises(ValueError, match="unknown backend 'trtion'"):
        patch_peft(model, backend="trtion")
    assert unpatch_peft(model) == 0  # nothing was patched


# ------------------------------------------------------------------------------------ the op is really used
def _count_op_calls(monkeypatch):
    calls = []
    real = lora_kernels.ops.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_kernels.ops, "lora_linear", counting)
    return calls


def test_fast_path_taken_only_when_supported(monkeypatch):
    calls = _count_op_calls(monkeypatch)
    model = _two_adapter_model()
    ids = _ids()
    patch_peft(model, backend="torch")
    with torch.no_grad():
        model(ids)
        assert calls == ["torch"] * N_LORA
        calls.clear()
        with model.disable_adapter():
            model(ids)
        model.base_model.set_adapter(["default", "other"])
        model(ids)
        model.base_model.set_adapter("default")
        model.merge_adapter()
        model(ids)
        model.unmerge_adapter()
        assert calls == []
        model(ids)
        assert len(calls) == N_LORA
        calls.clear()
        unpatch_peft(model)
        model(ids)
        assert calls == []


def test_cpu_autocast_bf16_like_peft():
    model = _peft_llama()
    ids = _ids()
    ref_logits, ref_grads = _logits_and_lora_grads(copy.deepcopy(model).double(), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_logits, base_grads = _logits_and_lora_grads(model, ids)
        patch_peft(model)
        logits, grads = _logits_and_lora_grads(model, ids)
    assert logits.dtype == base_logits.dtype
    _check_rule(logits, base_logits, ref_logits, 1e-3)
    for name in grads:
        assert grads[name].dtype == base_grads[name].dtype == torch.float32
        _check_rule(grads[name], base_grads[name], ref_grads[name], 1e-3)


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_patch_survives_pickling(how):
    """A patched model pickled (torch.save of the model, multiprocessing) or deep-copied comes back patched, each
    layer's forward bound to its own copy; outputs equal the original's; unpatch_peft then removes every patch.
    (The patch was a bound method, which pickles as getattr(layer, "forward"): PEFT's own forward at unpickling.)"""
    import io
    import pickle

    model = _peft_llama()
    ids = _ids()
    patch_peft(model)
    want = model(ids).logits
    if how == "pickle":
        other = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    else:
        other = copy.deepcopy(model)
    layers = [m for m in other.modules() if isinstance(m, LoraLinearLayer)]
    assert len(layers) == N_LORA and all(is_patched(m) and m.forward.__self__ is m for m in layers)
    torch.testing.assert_close(other(ids).logits, want, rtol=0, atol=0)
    assert unpatch_peft(other) == N_LORA and not any(is_patched(m) or "forward" in m.__dict__ for m in layers)


@pytest.mark.parametrize("use_dora", [False, True])
def test_per_sample_grads_with_torch_func(use_dora):
    """Per-sample gradients of a patched model through torch.func (vmap of grad over functional_call, as DP-SGD
    libraries take them): the patched layers run plain ops under the transforms (ops.transform_backend) and give
    PEFT's own per-sample grads within the tolerance rule, against float64."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(24, 40), nn.Linear(40, 16)

        def forward(self, x):
            return self.down(torch.tanh(self.up(x)))

    def per_sample(m, x):
        params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
        loss = lambda p, xi: torch.func.functional_call(m, p, (xi[None],)).pow(2).sum()  # noqa: E731
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], use_dora=use_dora))
    randomize_adapters(model, magnitudes=use_dora)
    x = torch.randn(6, 24)
    ref = per_sample(copy.deepcopy(model).double(), x.double())
    want = per_sample(model, x)
    report = patch_peft(model)
    assert len(report.patched) == 2
    got = per_sample(model, x)
    assert got.keys() == want.keys() and len(got) == (6 if use_dora else 4)
    for k in got:
        _check_rule(got[k], want[k], ref[k], 1e-6)


class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 48)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("use_dora", [False, True])
def test_rank_above_the_op_maximum_is_left_to_peft(use_dora):
    """A layer whose rank is above the op's maximum (ops.MAX_RANK) is skipped at patch time with the reason, and one
    that gets such an adapter after patching falls back to PEFT's forward: both give PEFT's output, never the op's
    rank error."""
    big = lora_kernels.ops.MAX_RANK + 1
    torch.manual_seed(0)
    model = get_peft_model(_OneLinear(), LoraConfig(r=big, lora_alpha=16, target_modules=["lin"], use_dora=use_dora))
    randomize_adapters(model, magnitudes=use_dora)
    x = torch.randn(3, 64)
    want = model(x)
    report = patch_peft(model)
    assert report.num_patched == 0 and "rank" in report.skipped["base_model.model.lin"]
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    torch.manual_seed(0)
    model = get_peft_model(_OneLinear(), LoraConfig(r=4, target_modules=["lin"], use_dora=use_dora))
    assert patch_peft(model).num_patched == 1
    model.add_adapter("big", LoraConfig(r=big, lora_alpha=16, target_modules=["lin"], use_dora=use_dora))
    model.set_adapter("big")
    randomize_adapters(model, magnitudes=use_dora)
    got = model(x)
    unpatch_peft(model)
    torch.testing.assert_close(got, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_patched_model_on_meta_propagates_shapes(use_dora):
    """A patched model on 'meta' (shape inference, memory planning) runs as PEFT's does ('meta' has no autocast
    state to ask about)."""
    model = get_peft_model(_OneLinear(), LoraConfig(r=4, target_modules=["lin"], use_dora=use_dora)).to("meta")
    assert patch_peft(model).num_patched == 1
    y = model(torch.randn(3, 5, 64, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 5, 48)


def test_float64_calls_the_op_rejects_fall_back_to_peft():
    """float64 calls that the op would reject run PEFT's forward: a model patched for a fused backend, then made
    float64 (model.double(), for a gradcheck), and a DoRA layer with a float64 base and float32 adapters (PEFT runs
    it; dora_linear takes float64 only throughout)."""
    x = torch.randn(3, 64, dtype=torch.float64)
    fused = [b for b in ("triton", "cuda") if b in lora_kernels.available_backends()]
    for use_dora in (False, True):
        for backend in fused:
            torch.manual_seed(0)
            model = get_peft_model(_OneLinear(), LoraConfig(r=4, target_modules=["lin"], use_dora=use_dora))
            randomize_adapters(model, magnitudes=use_dora)
            assert patch_peft(model, backend=backend).num_patched == 1
            model.double()
            got = model(x)
            unpatch_peft(model)
            torch.testing.assert_close(got, model(x), rtol=0, atol=0)
    torch.manual_seed(0)
    model = get_peft_model(_OneLinear(), LoraConfig(r=4, target_modules=["lin"], use_dora=True))
    randomize_adapters(model, magnitudes=True)
    model.base_model.model.lin.base_layer.double()
    want = model(x)
    assert patch_peft(model).num_patched == 1
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_unpatch_under_an_accelerate_hook():
    """An accelerate hook added after patching (dispatch_model, device_map) keeps the patched forward as
    _old_forward: is_patched sees it, and unpatch_peft puts PEFT's forward there, so that removing the hook later
    leaves the layer unpatched."""
    hooks = pytest.importorskip("accelerate.hooks")
    from lora_kernels.peft_patch import is_patched

    torch.manual_seed(0)
    model = get_peft_model(_OneLinear(), LoraConfig(r=4, target_modules=["lin"]))
    randomize_adapters(model)
    layer = model.base_model.model.lin
    x = torch.randn(3, 64)
    want = model(x)
    patch_peft(model)
    hooks.add_hook_to_module(layer, hooks.ModelHook())
    assert is_patched(layer)
    assert unpatch_peft(model) == 1 and not is_patched(layer)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    hooks.remove_hook_from_module(layer)
    assert not is_patched(layer)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
