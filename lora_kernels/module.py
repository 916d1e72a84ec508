"""``LoRALinear``: a drop-in ``nn.Linear`` replacement with a frozen base weight and a trainable LoRA adapter,
running the fused ``lora_kernels.lora_linear`` op.

    y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ,    scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

Parameter names, shapes and initialisation follow PEFT: ``lora_A`` (r, in_features) kaiming-uniform with
a = sqrt(5), ``lora_B`` (out_features, r) zeros, so a fresh layer computes exactly its base linear.

With ``use_dora=True`` the layer is DoRA (``lora_kernels.dora_linear``, PEFT's semantics): a trainable
``magnitude`` (out_features,) initialised like PEFT to the row norms of ``W + scaling · B A``, and
``y = g ⊙ (x Wᵀ + scaling · x_d Aᵀ Bᵀ) + b`` without dropout, ``g = magnitude / ‖W + scaling · B A‖_row``.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from . import _dispatch, dora, ops

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """A linear layer with a frozen base ``weight``/``bias`` and a trainable low-rank update ``lora_B @ lora_A``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: LoRA rank (``lora_A`` is (r, in_features), ``lora_B`` is (out_features, r)).
        alpha: LoRA alpha; ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` when ``use_rslora``).
        dropout: dropout probability on the LoRA path only (PEFT semantics: inverted 1/(1-p) scaling,
            active only in training mode; 1.0 drops the whole LoRA path).
        bias: whether the base layer has a bias.
        device, dtype: of the base weight and bias.
        adapter_dtype: dtype of ``lora_A``/``lora_B``; defaults to ``dtype``. ``torch.float32`` adapters on a
            bf16/fp16 base are supported (like PEFT's ``autocast_adapter_dtype``).
        backend: passed to ``lora_linear`` (None/'auto', 'torch', 'triton', 'cuda').
        use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``): adds the ``magnitude`` parameter
            (in ``adapter_dtype``) and runs ``lora_kernels.dora_linear``.

    The base weight and bias are frozen (``requires_grad=False``); only ``lora_A`` and ``lora_B`` (and
    ``magnitude``) train.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None, adapter_dtype=None,
                 backend=None, use_dora: bool = False):
        super().__init__()
        # the op's own checks would catch these at the first forward; here they fail where the layer is made
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= ops.MAX_RANK:
            raise ValueError(f"LoRALinear: r must be an integer in [1, {ops.MAX_RANK}], got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"LoRALinear: alpha must be a finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"LoRALinear: dropout must be a number in [0, 1], got {dropout!r}")
        _dispatch.check_name(backend)
        r = int(r)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.dropout = float(dropout)
        self.use_rslora = use_rslora
        self.backend = backend
        self.use_dora = bool(use_dora)
        self.scaling = float(alpha / math.sqrt(r) if use_rslora else alpha / r)

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        adapter_factory = {"device": device, "dtype": adapter_dtype if adapter_dtype is not None else dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **adapter_factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **adapter_factory))
        if self.use_dora:
            self.magnitude = nn.Parameter(torch.empty(out_features, **adapter_factory))
        else:
            self.register_parameter("magnitude", None)
        # The original weight while merged (see merge()); a non-persistent buffer so it follows .to()/.cuda().
        # The state_dict of a merged layer carries it as "unmerged_weight" (see _save_to_state_dict).
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Base weight/bias as ``nn.Linear``; ``lora_A`` kaiming-uniform (a=sqrt(5)), ``lora_B`` zeros (as PEFT)."""
        if self.weight.device.type != "meta":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
                    nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """``lora_A`` kaiming-uniform, ``lora_B`` zeros; with DoRA, ``magnitude`` = ‖W + scaling · B A‖_row (PEFT)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            if self.magnitude is not None and self.weight.device.type != "meta":
                norm = dora.dora_weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling)
                self.magnitude.copy_(norm.to(self.magnitude.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype=None, backend=None,
                    use_dora: bool = False) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``: the new layer *shares* ``linear.weight``/``linear.bias`` (the same
        Parameter objects, now frozen: ``requires_grad`` is set to False on them) and gets fresh adapters on
        the weight's device. ``merge()`` on the result updates the shared weight in place."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout,
                    bias=linear.bias is not None, use_rslora=use_rslora, device="meta", dtype=w.dtype,
                    adapter_dtype=adapter_dtype, backend=backend, use_dora=use_dora)
        w.requires_grad_(False)
        layer.weight = w
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            layer.bias = linear.bias
        adt = adapter_dtype if adapter_dtype is not None else w.dtype
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=adt))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=adt))
        if use_dora:
            layer.magnitude = nn.Parameter(torch.empty(linear.out_features, device=w.device, dtype=adt))
        layer.reset_lora_parameters()
        return layer

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.use_dora:
            return dora.dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.magnitude,
                                    dropout_p=self.dropout, training=self.training, backend=self.backend)
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                               dropout_p=self.dropout, training=self.training, backend=self.backend)

    # ----------------------------------------------------------------------------------------- merge
    @property
    def merged(self) -> bool:
        """True between ``merge()`` and ``unmerge()``."""
        return self._unmerged_weight is not None

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B @ A`` in float32 (float64 if the weight is float64)."""
        dt = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.lora_B.detach().to(dt) @ self.lora_A.detach().to(dt)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: ``weight = round(weight + scaling · B @ A)``, the sum computed
        in float32 and rounded once to the weight's dtype. A merged layer runs plain ``F.linear`` (eval semantics:
        no dropout), and its adapters get no gradient until ``unmerge()``.

        Cost: merging keeps one extra copy of the original weight so that ``unmerge()`` restores it bit-exactly.
        Subtracting the delta again would not round-trip: in bf16/fp16, ``round(round(W + D) - D) != W`` in
        general (the rounding of the merge loses the low bits of W), and even in fp32 the sum is not exactly
        invertible. While merged, the state_dict holds that copy too (key ``unmerged_weight``), so a layer that
        loads it is merged as well and unmerges exactly; an unmerged layer's state_dict has only the usual keys.
        Merging an already merged layer is a no-op.

        DoRA (as PEFT): ``weight = round(g ⊙ (weight + scaling · B @ A))`` with ``g = magnitude / ‖weight +
        scaling · B @ A‖_row`` (the bias is unchanged), which is the layer's output without dropout.
        """
        if self.merged:
            return
        original = self.weight.detach().clone()
        delta = self.delta_weight()
        merged = self.weight.detach().to(delta.dtype) + delta
        if self.use_dora:
            norm = dora.dora_weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling).to(delta.dtype)
            merged = (self.magnitude.detach().to(delta.dtype) / norm)[:, None] * merged
        merged = merged.to(self.weight.dtype)
        self.weight.copy_(merged)
        self._unmerged_weight = original

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight saved by ``merge()`` and drop that copy. No-op if not merged."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    # ------------------------------------------------------------------------------------ state_dict
    _UNMERGED_KEY = "unmerged_weight"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # "weight" is the merged one: record the original so loading restores the merged state
            w = self._unmerged_weight
            destination[prefix + self._UNMERGED_KEY] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + self._UNMERGED_KEY
        original = state_dict.get(key)  # present iff the saved layer was merged
        has_weight = prefix + "weight" in state_dict
        if self.merged and not has_weight:
            raise RuntimeError(
                f"LoRALinear ({prefix or 'root'}): loading a state_dict without 'weight' into a merged layer would "
                "leave the old update folded into the weight; call unmerge() first")
        if original is not None and not has_weight:
            error_msgs.append(f"{key} (a merged layer's original weight) is given without {prefix}weight")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if not has_weight:
            return
        if original is None:  # the loaded weight is an unmerged one
            self._unmerged_weight = None
        elif tuple(original.shape) != tuple(self.weight.shape):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(original.shape)}, "
                              f"the weight in the current model has shape {tuple(self.weight.shape)}")
        else:
            with torch.no_grad():
                self._unmerged_weight = original.detach().to(self.weight.device, self.weight.dtype, copy=True)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}")
        if self.use_rslora:
            s += ", use_rslora=True"
        if self.use_dora:
            s += ", use_dora=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.lora_A.dtype != self.weight.dtype:
            s += f", adapter_dtype={self.lora_A.dtype}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        if self.merged:
            s += ", merged=True"
        return s
