"""Run PEFT LoRA ``Linear`` layers through the fused ``lora_kernels.lora_linear`` op.

    report = patch_peft(peft_model)      # patches every supported peft lora.Linear in place
    print(report)                        # which layers were patched, which skipped and why
    unpatch_peft(peft_model)             # back to PEFT's own forward

Patching only sets an instance attribute ``forward`` (``_patched_forward`` bound to the layer, kept by pickling and
deepcopy) on each supported layer: parameters, buffers, ``state_dict`` and ``save_pretrained`` output are untouched,
and ``unpatch_peft`` deletes the attribute.

Supported (checked at patch time, with a reason recorded for every skipped layer): exactly one active adapter
that exists in ``lora_A``; not merged; vanilla LoRA or DoRA (``use_dora=True``: runs ``lora_kernels.dora_linear``),
no other LoRA variant; no ``lora_bias``; ``fan_in_fan_out=False``; rank 1 to 256 (``ops.MAX_RANK``);
dropout ``nn.Dropout`` or ``nn.Identity``; a plain (unquantized) ``nn.Linear`` base layer without hooks.
The patched forward re-checks everything that can change at runtime (adapters disabled or switched, merged,
DoRA/variants, ``adapter_names`` mixed batches, extra arguments, dtypes) and falls back to PEFT's forward
whenever the fast path does not apply, so results always match PEFT's semantics. Under forward-mode AD and the
torch.func transforms the patched layers run plain PyTorch ops (``ops.transform_backend``).
"""
from __future__ import annotations

import dataclasses
import math
import types

import torch
from torch import nn

from . import _dispatch, dora, ops

__all__ = ["PatchReport", "patch_peft", "unpatch_peft"]

_BACKEND_ATTR = "_lora_kernels_backend"


def _lora_linear_cls():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as e:
        raise ImportError(
            "lora_kernels.patch_peft needs the `peft` package (pip install peft); importing "
            f"peft.tuners.lora.layer failed: {e}"
        ) from e
    return Linear


@dataclasses.dataclass
class PatchReport:
    """What ``patch_peft`` did: ``patched`` module names (``dora``: those of them that are DoRA layers) and
    ``skipped`` {module name: reason}."""

    patched: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    dora: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_patched(self) -> int:
        return len(self.patched)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        dora_note = f" ({len(self.dora)} of them DoRA)" if self.dora else ""
        lines = [f"lora_kernels.patch_peft: patched {self.num_patched} LoRA Linear layer(s){dora_note}, "
                 f"skipped {self.num_skipped}"]
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  skipped {len(names)}: {reason} [{shown}]")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- checks
def _is_quantized(base: nn.Module) -> bool:
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor):
        return True
    if type(w) not in (torch.Tensor, nn.Parameter):  # bnb Int8Params/Params4bit, torchao / other subclasses
        return True
    for attr in ("quant_state", "SCB", "CB", "quant_type", "qweight", "compress_statistics"):
        if hasattr(base, attr) or hasattr(w, attr):
            return True
    return w.dtype not in ops.SUPPORTED_DTYPES


def _base_reason(base: nn.Module) -> str | None:
    """Why the base layer cannot run in the fast path (None if it can)."""
    if not isinstance(base, nn.Linear):
        return f"base layer is {type(base).__name__}, not nn.Linear"
    if _is_quantized(base):
        return f"base layer {type(base).__name__} is quantized (weight {type(base.weight).__name__}, " \
               f"dtype {getattr(base.weight, 'dtype', None)})"
    if type(base).forward is not nn.Linear.forward or "forward" in base.__dict__:
        return f"base layer {type(base).__name__} overrides forward"
    if base._forward_hooks or base._forward_pre_hooks:
        return "base layer has forward hooks"
    return None


def _static_reason(module, lora_linear_cls) -> str | None:
    """Why ``module`` (a peft lora.Linear) is not supported (None if it is). Checks patch-time state."""
    if type(module).forward is not lora_linear_cls.forward:
        return f"{type(module).__name__} overrides lora.Linear.forward"
    if "forward" in module.__dict__ and getattr(module.__dict__["forward"], "__func__", None) is not _patched_forward:
        return "forward already overridden on the instance (e.g. an accelerate hook)"
    return _runtime_reason(module)


def _runtime_reason(module) -> str | None:
    """The conditions that can change after patching (re-checked by the patched forward)."""
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True is not supported"
    active = list(module.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters ({', '.join(map(str, active))}); exactly one is supported"
    name = active[0]
    if name not in module.lora_A:
        return f"active adapter {name!r} has no lora_A on this layer"
    if module.merged:
        return "adapter is merged into the base weight"
    if _is_dora(module, name):
        reason = _dora_reason(module, name)
        if reason is not None:
            return reason
    elif name in getattr(module, "lora_variant", {}):
        return f"LoRA variant {type(module.lora_variant[name]).__name__} is not supported"
    if module.lora_bias.get(name, False):
        return "lora_bias=True is not supported"
    A, B = module.lora_A[name], module.lora_B[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return "lora_A/lora_B are not bias-free nn.Linear"
    if not 1 <= A.out_features <= ops.MAX_RANK:
        return f"rank {A.out_features} is outside the fused op's 1..{ops.MAX_RANK}"
    if not isinstance(module.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"lora_dropout is {type(module.lora_dropout[name]).__name__}, not nn.Dropout/nn.Identity"
    if not math.isfinite(module.scaling[name]):
        return f"scaling {module.scaling[name]} is not finite"
    return _base_reason(module.base_layer)


def _is_dora(module, name) -> bool:
    return bool(module.use_dora.get(name, False)) or type(getattr(module, "lora_variant", {}).get(name)).__name__ \
        == "DoraLinearVariant"


def _dora_reason(module, name) -> str | None:
    """Why the DoRA adapter ``name`` cannot run in the fast path (None if it can): PEFT's own DoRA variant and
    magnitude layer, unmodified, with a (N,) magnitude."""
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError as e:
        return f"DoRA classes not importable from peft ({e})"
    if type(module.lora_variant.get(name)) is not DoraLinearVariant:
        return f"DoRA variant {type(module.lora_variant.get(name)).__name__} is not PEFT's DoraLinearVariant"
    mag = module.lora_magnitude_vector[name] if name in module.lora_magnitude_vector else None
    if type(mag) is not DoraLinearLayer or mag._forward_hooks or mag._forward_pre_hooks:
        return f"DoRA magnitude layer is {type(mag).__name__} (or has hooks), not PEFT's DoraLinearLayer"
    w = getattr(mag, "weight", None)
    N = module.base_layer.weight.shape[0] if isinstance(getattr(module.base_layer, "weight", None), torch.Tensor) \
        else None
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != N:
        return "DoRA magnitude is not a (out_features,) tensor"
    return None


# -------------------------------------------------------------------------------------- patched forward
def _fast_dtypes_ok(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    backend) -> bool:
    """Whether the op accepts these dtypes (checked with the op's own rule; otherwise PEFT's forward runs). float64
    runs only on the torch backend (which None/'auto' pick for it): a model patched for a fused backend and then
    made float64 (``model.double()``, for a gradcheck) runs PEFT's forward."""
    compute = ops.autocast_dtype(x)
    if compute is not None:  # the op casts x/weight/bias to it, as F.linear would
        return ops.dtype_problem(compute, compute, None, lora_A.dtype, lora_B.dtype) is None
    if x.dtype == torch.float64 and backend not in (None, "auto", "torch"):
        return False
    return ops.dtype_problem(x.dtype, weight.dtype, None, lora_A.dtype, lora_B.dtype) is None


def _patched_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The patched ``forward`` of a peft lora.Linear (bound to the instance by ``patch_peft``).

    Same semantics as PEFT's ``Linear.forward``; the single-active-adapter vanilla-LoRA case runs the fused op,
    everything else goes to PEFT's own forward."""
    cls_forward = type(self).forward
    if (self.disable_adapters or args or any(v is not None for v in kwargs.values())
            or _runtime_reason(self) is not None):
        return cls_forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    lora_A = self.lora_A[name].weight
    lora_B = self.lora_B[name].weight
    backend = getattr(self, _BACKEND_ATTR, None)
    if not isinstance(x, torch.Tensor) or not _fast_dtypes_ok(x, base.weight, lora_A, lora_B, backend):
        return cls_forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        p, training = float(dropout.p), True
    else:
        p, training = 0.0, False
    if _is_dora(self, name):
        magnitude = self.lora_magnitude_vector[name].weight
        compute = ops.autocast_dtype(x) or x.dtype
        if magnitude.dtype not in (torch.float32, compute) or (compute == torch.float64 and any(
                t.dtype != torch.float64 for t in (lora_A, lora_B, magnitude))):  # dora_linear's float64 rule
            return cls_forward(self, x, *args, **kwargs)
        # PEFT's DoRA drops x only when the layer itself is in training mode (DoraLinearVariant.forward)
        return dora.dora_linear(x, base.weight, base.bias, lora_A, lora_B, float(self.scaling[name]), magnitude,
                                dropout_p=p, training=training and self.training, backend=backend)

    # PEFT returns the base layer's output dtype (x's dtype, or the autocast dtype); the op returns exactly that
    # (it casts x/weight to the autocast dtype itself, and its result is in x's (cast) dtype).
    return ops.lora_linear(x, base.weight, base.bias, lora_A, lora_B, float(self.scaling[name]),
                           dropout_p=p, training=training, backend=backend)


class _PatchedForward:
    """A layer's patched ``forward``: ``_patched_forward`` bound to the layer, like a bound method (``__self__``,
    ``__func__``), but one that pickling keeps. A bound method pickles as ``getattr(layer, "forward")``, which during
    unpickling, before the layer's ``__dict__`` is restored, is PEFT's own forward: a pickled (``torch.save``d,
    multiprocessing) patched model came back unpatched. This one pickles as the class and the layer."""
    __slots__ = ("__self__",)
    __func__ = staticmethod(_patched_forward)

    def __init__(self, module: nn.Module):
        self.__self__ = module

    def __call__(self, *args, **kwargs):
        return _patched_forward(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return _PatchedForward, (self.__self__,)


# ----------------------------------------------------------------------------------------------- public
def _check_model(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"lora_kernels.{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def patch_peft(model: nn.Module, backend=None) -> PatchReport:
    """Make every supported PEFT LoRA ``Linear`` in ``model`` run the fused ``lora_linear`` op.

    Only an instance attribute ``forward`` is added (nothing in parameters/buffers/state_dict changes). Layers
    that are not supported are left alone and listed in the report's ``skipped`` with a reason. Calling it again
    re-patches (e.g. with another ``backend``) and re-evaluates skipped layers. ``backend`` is passed to
    ``lora_linear`` (None/'auto', 'torch', 'triton', 'cuda').
    """
    _check_model(model, "patch_peft")
    _dispatch.check_name(backend)
    lora_linear_cls = _lora_linear_cls()
    report = PatchReport()
    for name, module in model.named_modules():
        if not isinstance(module, lora_linear_cls):
            continue
        reason = _static_reason(module, lora_linear_cls)
        if reason is not None:
            report.skipped[name] = reason
            continue
        # Plain object attributes: nn.Module.__setattr__ stores non-Parameter/Module/Tensor values in __dict__,
        # so none of this reaches the state_dict.
        setattr(module, _BACKEND_ATTR, backend)
        module.forward = _PatchedForward(module)
        report.patched.append(name)
        if _is_dora(module, module.active_adapters[0]):
            report.dora.append(name)
    return report


def _ours(fwd) -> bool:
    return fwd is not None and getattr(fwd, "__func__", None) is _patched_forward


def unpatch_peft(model: nn.Module) -> int:
    """Remove the patch from every layer ``patch_peft`` patched; returns how many layers were unpatched. A layer that
    an accelerate hook wrapped after patching (``dispatch_model``, ``device_map``: the hook keeps the forward it
    replaced as ``_old_forward`` and puts it back when removed) gets PEFT's forward there instead."""
    _check_model(model, "unpatch_peft")
    n = 0
    for module in model.modules():
        d = module.__dict__
        if _ours(d.get("forward")):
            del d["forward"]
        elif _ours(d.get("_old_forward")):
            d["_old_forward"] = types.MethodType(type(module).forward, module)
        else:
            continue
        d.pop(_BACKEND_ATTR, None)
        n += 1
    return n


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` currently carries the patched forward (also under an accelerate hook added after
    patching)."""
    return _ours(module.__dict__.get("forward")) or _ours(module.__dict__.get("_old_forward"))
