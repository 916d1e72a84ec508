"""Tests of lora_kernels.module.LoRALinear (CPU, default backend)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels
from lora_kernels.module import LoRALinear


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _reference(layer, x, mask=None, p=0.0):
    """float64 reference of y = x W^T + b + s * (dropout(x) A^T) B^T."""
    xd = x.double()
    w, a, b = layer.weight.double(), layer.lora_A.double(), layer.lora_B.double()
    xl = xd if mask is None else xd * mask.double() / (1 - p)
    y = xd @ w.T + (xl @ a.T) @ b.T * layer.scaling
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def _randomize_B(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64_reference(bias):
    torch.manual_seed(0)
    layer = LoRALinear(48, 40, r=8, alpha=16, bias=bias)
    _randomize_B(layer)
    x = torch.randn(13, 48)
    y = layer(x)
    assert y.shape == (13, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_zero_B_init_gives_base_output():
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, r=4, alpha=8)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


def test_parameters_frozen_and_shapes():
    layer = LoRALinear(16, 12, r=4)
    assert layer.weight.shape == (12, 16) and not layer.weight.requires_grad
    assert layer.bias.shape == (12,) and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 16) and layer.lora_A.requires_grad
    assert layer.lora_B.shape == (12, 4) and layer.lora_B.requires_grad
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A", "lora_B"]
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_scaling_and_rslora():
    assert LoRALinear(8, 8, r=4, alpha=16).scaling == 4.0
    layer = LoRALinear(8, 8, r=4, alpha=16, use_rslora=True)
    assert layer.scaling == 16 / math.sqrt(4)
    _randomize_B(layer)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_from_linear_shares_weight():
    torch.manual_seed(0)
    lin = nn.Linear(20, 10)
    layer = LoRALinear.from_linear(lin, r=4, alpha=8)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (10, 4)
    assert layer.lora_A.device == lin.weight.device and layer.lora_A.dtype == lin.weight.dtype
    x = torch.randn(6, 20)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        lin.weight.add_(1.0)  # the same storage
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-6, atol=1e-6)
    no_bias = LoRALinear.from_linear(nn.Linear(20, 10, bias=False), r=2, adapter_dtype=torch.float64)
    assert no_bias.bias is None and no_bias.lora_A.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(64, 32, r=8, alpha=16, dtype=dtype, adapter_dtype=torch.float32)
    _randomize_B(layer)
    layer.eval()
    x = torch.randn(9, 64).to(dtype)
    w0 = layer.weight.detach().clone()
    y_unmerged = layer(x)
    assert not layer.merged
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert "_unmerged_weight" not in layer.state_dict()
    # merged weight = round(W + s B A) computed in fp32
    expect_w = (w0.float() + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()).to(dtype)
    assert torch.equal(layer.weight, expect_w)
    y_merged = layer(x)
    torch.testing.assert_close(y_merged, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    # tolerance rule: merged error vs the float64 unmerged reference <= 2x the unmerged op's error + floor
    ref = _reference(layer, x.float()).to(torch.float64)
    layer_ref_err = _max_err(y_unmerged, ref)
    floor = 1e-5 if dtype == torch.float32 else 2e-2
    assert _max_err(y_merged, ref) <= 2 * layer_ref_err + floor
    layer.merge()  # no-op
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, w0)  # bit-exact
    assert torch.equal(layer(x), y_unmerged)
    layer.unmerge()  # no-op


def test_merge_with_dropout_uses_eval_semantics():
    torch.manual_seed(0)
    layer = LoRALinear(16, 16, r=4, dropout=0.5)
    _randomize_B(layer)
    x = torch.randn(4, 16)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    layer.merge()
    torch.testing.assert_close(layer(x), y_eval, rtol=1e-5, atol=1e-5)
    layer.unmerge()


def test_grads_only_to_adapters():
    torch.manual_seed(0)
    layer = LoRALinear(24, 16, r=4, alpha=8)
    _randomize_B(layer)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    # float64 reference grads
    xd = x.detach().double().requires_grad_()
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    yd = xd @ layer.weight.double().T + layer.bias.double() + (xd @ A.T) @ B.T * layer.scaling
    yd.backward(g.double())
    for got, want in ((x.grad, xd.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_3d_input():
    torch.manual_seed(0)
    layer = LoRALinear(32, 20, r=4)
    _randomize_B(layer)
    x = torch.randn(3, 7, 32)
    y = layer(x)
    assert y.shape == (3, 7, 20)
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.reshape(21, 20), layer(x.reshape(21, 32)), rtol=0, atol=0)


def test_dropout_train_matches_mask():
    torch.manual_seed(0)
    p = 0.25
    layer = LoRALinear(40, 24, r=4, dropout=p)
    _randomize_B(layer)
    x = torch.randn(2, 6, 40)
    with lora_kernels.ops.record_dropout() as calls:
        y = layer(x)
    assert len(calls) == 1
    seed, offset = calls[0]
    mask = lora_kernels.dropout_mask(seed, offset, x.shape, p, x.device)
    torch.testing.assert_close(y.double(), _reference(layer, x, mask=mask, p=p), rtol=1e-5, atol=1e-5)
    layer.eval()  # no dropout in eval mode
    with lora_kernels.ops.record_dropout() as calls:
        y_eval = layer(x)
    assert calls == []
    torch.testing.assert_close(y_eval.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_fp32_adapters_on_bf16_base():
    torch.manual_seed(0)
    layer = LoRALinear(64, 48, r=8, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    _randomize_B(layer)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    x = torch.randn(10, 64).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = _reference(layer, x)
    # unfused bf16 PyTorch computation as the error yardstick
    naive = F.linear(x, layer.weight, layer.bias) + (F.linear(F.linear(x.float(), layer.lora_A), layer.lora_B)
                                                     * layer.scaling).to(torch.bfloat16)
    assert _max_err(y, ref) <= 2 * _max_err(naive, ref) + 1e-2


def test_extra_repr_and_validation():
    s = repr(LoRALinear(8, 4, r=2, alpha=4, dropout=0.1, use_rslora=True))
    assert "r=2" in s and "alpha=4" in s and "dropout=0.1" in s and "use_rslora=True" in s
    # each bad argument fails where the layer is made, with its name (r = 2.5, alpha = None and dropout = None raised
    # raw TypeErrors from torch.empty or arithmetic; r = 300 and alpha = nan passed until the first forward)
    for kw, name in [(dict(r=0), "r"), (dict(r=-1), "r"), (dict(r=2.5), "r"), (dict(r=True), "r"), (dict(r=300), "r"),
                     (dict(alpha=None), "alpha"), (dict(alpha=float("nan")), "alpha"), (dict(alpha="16"), "alpha"),
                     (dict(dropout=1.5), "dropout"), (dict(dropout=-0.1), "dropout"), (dict(dropout=None), "dropout")]:
        with pytest.raises(ValueError, match=f"LoRALinear: {name} must be"):
            LoRALinear(8, 4, **kw)
    with pytest.raises(ValueError, match="unknown backend 'trtion'"):
        LoRALinear(8, 4, backend="trtion")
    import numpy as np

    layer = LoRALinear(8, 4, r=np.int64(2), alpha=np.float32(4.0), dropout=np.float64(0.0))  # numpy numbers are fine
    assert layer.r == 2 and type(layer.r) is int and layer.scaling == 2.0
    assert layer(torch.randn(3, 8)).shape == (3, 4)
