"""tests/test_dora_peft.py's model check (a tiny DoRA Llama patched against unpatched PEFT and a float64 copy), with
every grad's margin printed instead of asserted, and variants that switch one piece of the saved-y backward off:

    python3 bench/dev/dora_model_check.py [--backends cuda,triton,torch] [--p 0] [--dtype bf16] [--device cuda]

Per backend and variant it prints the worst grads by ratio = error / (2 × PEFT's error + floor) against float64
(the test's rule: a ratio above 1 fails) and, on the cuda backend, how the last DoRA backward made dy_c (1: over dy,
0: in a buffer of its own). Variants:
  as is        the call as the test makes it
  dy kept      a hook on every DoRA layer's output keeps its grad, so the cuda node does not own dy and makes dy_c
               in a buffer of its own (no deferred scaling of the recomputed columns by launch_dora_dmag)
  no row rule  the Python path's rule for adapter rows large against W's switched off (Z_FROM_Y_MAX_ADAPTER = inf:
               z from y there, as before session 45); the cuda node's rule is compiled in and stays

Written for a GPU failure of test_gpu_model_matches_peft_bf16_fp32_adapters[0.0] (the model's adapter rows are about
4× W's, so every column takes the recompute of z); it named the Triton backend's forward (FINDINGS, DoRA).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "tests"))
import test_dora_peft as t  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import dora_kernels  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextlib.contextmanager
def _dy_kept():
    """Every DoRA layer's output keeps a reference to its grad (a tensor hook), for the models made inside."""
    kept, real = [], t._dora_llama

    def made(*a, **k):
        model = real(*a, **k)
        def keep(mod, args, out):  # returns None: the output stays as it is
            if out.requires_grad:
                out.register_hook(kept.append)

        for m in t._layers(model).values():
            m.register_forward_hook(keep)
        return model

    t._dora_llama = made
    try:
        yield
    finally:
        t._dora_llama = real


@contextlib.contextmanager
def _no_row_rule():
    real = dora_kernels.Z_FROM_Y_MAX_ADAPTER
    dora_kernels.Z_FROM_Y_MAX_ADAPTER = float("inf")
    try:
        yield
    finally:
        dora_kernels.Z_FROM_Y_MAX_ADAPTER = real


VARIANTS = {"as is": contextlib.nullcontext, "dy kept": _dy_kept, "no row rule": _no_row_rule}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cuda,triton,torch")
    ap.add_argument("--p", type=float, default=0.0)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--floor", type=float, default=1e-3)
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args()
    rows = []

    def record(got, peft_out, ref, floor, name=""):
        e_got, e_ref = t._rel_err(got, ref), t._rel_err(peft_out, ref)
        rows.append((e_got / (2 * e_ref + floor), e_got, e_ref, name))

    t._check_rule = record
    for backend in args.backends.split(","):
        if backend not in lora_kernels.available_backends():
            print(f"{backend}: not available here")
            continue
        for variant, ctx in VARIANTS.items():
            rows.clear()
            try:
                with ctx():
                    t._model_vs_peft(backend, args.p, dtype=DTYPES[args.dtype], device=args.device, floor=args.floor)
            except Exception as e:  # an exception is a finding too: print it and go on
                print(f"{backend:6s} {variant:11s} raised {type(e).__name__}: {e}")
                continue
            how = ""
            if backend == "cuda":
                how = f"  dy_c over dy: {torch.ops.lora_kernels_cuda.dora_last_dyc_in_place()}"
            rows.sort(reverse=True)
            fails = sum(r[0] > 1 for r in rows)
            print(f"{backend:6s} {variant:11s} worst ratio {rows[0][0]:.3f}, {fails} of {len(rows)} above 1{how}")
            for ratio, e_got, e_ref, name in rows[:args.top]:
                print(f"    {ratio:7.3f}  error {e_got:.3e}  PEFT {e_ref:.3e}  {name.replace('base_model.model.', '')}")


if __name__ == "__main__":
    main()
