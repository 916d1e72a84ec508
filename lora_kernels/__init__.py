"""lora_kernels: fused GPU kernels for LoRA linear layers (forward and backward), with a PyTorch reference."""
import warnings as _warnings

from . import _extension
from ._dispatch import available_backends, backend_status
from .dora import dora_linear
from .module import LoRALinear
from .ops import dropout_mask, lora_linear, record_dropout
from .peft_patch import PatchReport, patch_peft, unpatch_peft

__version__ = "0.1.0"

__all__ = ["lora_linear", "dora_linear", "dropout_mask", "record_dropout", "available_backends", "backend_status",
           "LoRALinear", "patch_peft", "unpatch_peft", "PatchReport", "__version__"]

if _extension.stale():  # an extension built for another torch or CUDA: say so now, never load it
    _warnings.warn(f"lora_kernels: the cuda backend is unavailable: its extension was {_extension.problem()}",
                   RuntimeWarning, stacklevel=2)
