"""Shared helpers for bench/train/e2e_train.py and bench/train/fsdp_train.py: a small random-init transformers Llama
(no downloads), PEFT LoRA on all linear layers, deterministic token data."""
from __future__ import annotations

import os
import sys

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ensure_import_path():
    """Fall back to the repo root when lora_kernels is not installed (appended: an install wins)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.append(root)


def add_model_args(ap):
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model, CPU friendly (smoke test)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (LoraConfig(use_dora=True))")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                    help="model dtype (default bf16 on GPU, fp32 on CPU/--tiny)")
    ap.add_argument("--backend", default=None, help="lora_kernels backend for patch_peft (default: auto)")
    ap.add_argument("--lora-b-std", type=float, default=0.02,
                    help="re-init lora_B ~ N(0, std) (PEFT inits it to zero; nonzero makes the patched vs "
                         "unpatched comparison exercise the LoRA path from step 0); 0 keeps PEFT's zeros")


def finalize_args(args):
    if args.tiny:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 2, 64, 128, 4, 2
        args.vocab, args.batch, args.seq = 256, 4, 32
    if args.dtype is None:
        args.dtype = "fp32" if (args.tiny or not torch.cuda.is_available()) else "bf16"
    return args


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_model(args, dropout: float, device):
    """Same seed -> same weights (initialized on CPU in fp32, then cast and moved)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq, 128), use_cache=False)
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:
        pass
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    model = model.to(DTYPES[args.dtype])
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout, target_modules=TARGETS,
                      use_dora=getattr(args, "dora", False))
    model = get_peft_model(model, lcfg)  # default autocast_adapter_dtype=True -> fp32 adapters
    if args.lora_b_std > 0:
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * args.lora_b_std)
    return model.to(device)


def batches(args, steps, device, seed_offset=1000):
    """Deterministic token batches (global batch), identical for every run with the same args."""
    g = torch.Generator().manual_seed(args.seed + seed_offset)
    out = []
    for _ in range(steps):
        out.append(torch.randint(0, args.vocab, (args.batch, args.seq), generator=g))
    return [b.to(device) for b in out]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def patch_peft(model, backend=None):
    """lora_kernels.patch_peft (falls back to lora_kernels.peft_patch while __init__ does not export it)."""
    import lora_kernels

    fn = getattr(lora_kernels, "patch_peft", None)
    if fn is None:
        from lora_kernels.peft_patch import patch_peft as fn
    return fn(model, backend=backend)
