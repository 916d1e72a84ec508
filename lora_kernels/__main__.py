"""`python -m lora_kernels`: what is installed, a self-check of every backend that runs on this device against a
float64 reference, then a forward timing table against the unfused PEFT-style formula and the base linear (and,
on a GPU with peft installed, against PEFT's own lora.Linear). Exits with status 1 if a self-check fails.

    python -m lora_kernels [--device cuda|cpu] [--M 2048] [--K 4096] [--N 4096] [--r 16] [--p 0.0]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from . import __version__, available_backends, backend_status, dropout_mask, lora_linear, record_dropout

# Relative error (Frobenius norm, against float64) that a self-check result may have, by input dtype: a few times
# the rounding error of the dtype at these sizes.
LIMITS = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
_SHAPE = (3, 37, 200)  # x of the self-check; weight (72, 200), rank 16


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def _progress(msg: str) -> None:
    """A line that is overwritten by the next one (on a terminal), so a newcomer sees what is running."""
    if sys.stdout.isatty():
        print(f"\r\033[K  ... {msg}", end="", flush=True)


def _done_progress() -> None:
    if sys.stdout.isatty():
        print("\r\033[K", end="", flush=True)


def _formula(x, W, b, A, B, s, p, training=True):
    """The unfused PEFT-style layer: base linear plus three more kernels for the LoRA path."""
    xd = F.dropout(x, p, training) if p > 0 else x
    return F.linear(x, W, b) + s * F.linear(F.linear(xd, A), B)


def _check_one(name, device, dtype, p):
    """Relative errors of y, dx, dA, dB of one backend call against the same computation in float64."""
    x = torch.randn(*_SHAPE, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(72, 200, device=device, dtype=dtype) / 15
    b = torch.randn(72, device=device, dtype=dtype)
    A = (torch.randn(16, 200, device=device) / 15).requires_grad_()
    B = torch.randn(72, 16, device=device).requires_grad_()
    with record_dropout() as calls:
        y = lora_linear(x, W, b, A, B, 2.0, dropout_p=p, backend=name)
    y.float().square().sum().backward()
    keep = dropout_mask(*calls[0], x.shape, p, device=device) if p else None
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    xd = x64 * keep / (1 - p) if p else x64
    ref = x64 @ W.double().t() + b.double() + 2.0 * (xd @ A64.t()) @ B64.t()
    ref.square().sum().backward()
    return {k: ((got.double() - want).norm() / want.norm()).item()
            for k, got, want in (("y", y, ref), ("dx", x.grad, x64.grad), ("dA", A.grad, A64.grad),
                                 ("dB", B.grad, B64.grad))}


def self_check(device: str) -> bool:
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device == "cuda" else [])
    backends = [n for n in available_backends() if device == "cuda" or n == "torch"]
    print(f"\nSelf-check on {device}: each backend computes y = x W^T + b + 2 (dropout(x) A^T) B^T and its grads for "
          f"x {tuple(_SHAPE)}, W (72, 200), r = 16.")
    print("The numbers are relative errors ||got - ref|| / ||ref|| against the same computation in float64.")
    print("Pass: every error below " + ", ".join(f"{v:g} ({_dtype_name(k)})" for k, v in LIMITS.items()
                                                 if k in dtypes) + ".")
    if device == "cuda":
        print("The first call of each backend compiles or tunes its kernels (Triton: up to a minute).")
    print(f"  {'backend':8s} {'dtype':9s} {'p':>3s}  {'y':>8s} {'dx':>8s} {'dA':>8s} {'dB':>8s}  result")
    ok, runs = True, 0
    for name in backends:
        for dtype in dtypes:
            for p in (0.0, 0.2):
                _progress(f"checking {name} {_dtype_name(dtype)} p={p}")
                runs += 1
                try:
                    errs = _check_one(name, device, dtype, p)
                except Exception as e:  # a failing backend is reported, and the check goes on
                    _done_progress()
                    print(f"  {name:8s} {_dtype_name(dtype):9s} {p:3.1f}  FAIL: {type(e).__name__}: {e}")
                    ok = False
                    continue
                good = all(e < LIMITS[dtype] for e in errs.values())
                ok &= good
                _done_progress()
                print(f"  {name:8s} {_dtype_name(dtype):9s} {p:3.1f}  "
                      + " ".join(f"{v:8.1e}" for v in errs.values()) + ("  pass" if good else "  FAIL"))
    print(f"Self-check {'passed' if ok else 'FAILED'} ({runs} runs).")
    return ok


def _time(fn, device, reps=20):
    """Median time of one call in ms (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peft_layer(W, A, B, r, p):
    """PEFT's lora.Linear (made by get_peft_model, fp32 adapters: PEFT's default) around a copy of the base weight,
    with our adapters; None where peft is not installed."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception:
        return None
    base = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype))
    with torch.no_grad():
        base[0].weight.copy_(W)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def timing_table(device, M, K, N, r, p):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(M, K, device=device, dtype=dtype)
    W = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    A = torch.randn(r, K, device=device) / K**0.5  # fp32 adapters, PEFT's default
    B = torch.randn(N, r, device=device)
    rows = [("base linear (the floor)", lambda: F.linear(x, W)),
            ("unfused formula", lambda: _formula(x, W, None, A.to(dtype), B.to(dtype), 2.0, p))]
    peft = _peft_layer(W, A, B, r, p) if device == "cuda" else None
    if peft is not None:
        rows.append(("PEFT lora.Linear", lambda: peft(x)))
    for name in available_backends():
        if device == "cuda" or name == "torch":
            rows.append((f"lora_kernels, {name}",
                         lambda name=name: lora_linear(x, W, None, A, B, 2.0, p, backend=name)))
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\nForward timing on {where}: x ({M}, {K}) {_dtype_name(dtype)} -> N = {N}, r = {r}, dropout p = {p} "
          f"(training); median of 20 calls{', GPU time' if device == 'cuda' else ', wall time'}.")
    if device == "cpu":
        print("On the CPU every call runs the torch reference; the fused kernels need a GPU.")
    print(f"  {'':26s} {'ms':>9s}   {'x floor':>7s}")
    floor = None
    with torch.no_grad():
        for label, fn in rows:
            _progress(f"timing {label}")
            ms = _time(fn, device)
            floor = floor or ms
            _done_progress()
            print(f"  {label:26s} {ms:9.3f}   {ms / floor:6.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lora_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--M", type=int, default=None)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.0)
    args = ap.parse_args(argv)
    print(f"lora_kernels {__version__}: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
          f"Python {platform.python_version()}, device {args.device}")
    print("Backends:")
    for name, status in backend_status().items():
        print(f"  {name:6s} {status}")
    ok = self_check(args.device)
    M = args.M or (8192 if args.device == "cuda" else 256)
    K, N = (args.K, args.N) if args.device == "cuda" or args.M else (min(args.K, 1024), min(args.N, 1024))
    timing_table(args.device, M, K, N, args.r, args.p)
    if not ok:
        print("\nA self-check FAILED (see above): exit status 1.")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
