"""lora_kernels: fused GPU kernels for LoRA linear layers (forward and backward), with a PyTorch reference."""
from ._dispatch import available_backends, backend_status
from .ops import dropout_mask, lora_linear, record_dropout

__version__ = "0.1.0"

__all__ = ["lora_linear", "dropout_mask", "record_dropout", "available_backends", "backend_status", "__version__"]
