"""`python -m lora_kernels`: self-check every available backend against the reference, then time them against
the unfused PEFT-style formula and the base linear on this machine's device.

    python -m lora_kernels [--device cuda|cpu] [--M 2048] [--K 4096] [--N 4096] [--r 16] [--p 0.0]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from . import available_backends, backend_status, dropout_mask, lora_linear, record_dropout


def _formula(x, W, b, A, B, s, p, training=True):
    """The unfused PEFT-style layer: base linear plus three more kernels for the LoRA path."""
    xd = F.dropout(x, p, training) if p > 0 else x
    return F.linear(x, W, b) + s * F.linear(F.linear(xd, A), B)


def self_check(device: str) -> bool:
    ok = True
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device == "cuda" else [])
    print(f"self-check on {device}:")
    for name in available_backends():
        if device == "cpu" and name != "torch":
            continue
        for dtype in dtypes:
            for p in (0.0, 0.2):
                x = torch.randn(3, 37, 200, device=device, dtype=dtype, requires_grad=True)
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
                errs = {k: ((got.double() - want).norm() / want.norm()).item()
                        for k, got, want in (("y", y, ref), ("dx", x.grad, x64.grad), ("dA", A.grad, A64.grad),
                                             ("dB", B.grad, B64.grad))}
                limit = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
                good = all(e < limit for e in errs.values())
                ok &= good
                print(f"  {name:6s} {str(dtype).split('.')[-1]:8s} p={p:.1f}  "
                      + "  ".join(f"{k}={v:.1e}" for k, v in errs.items()) + ("  ok" if good else "  FAIL"))
    return ok


def _time(fn, device, reps=20):
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


def timing_table(device, M, K, N, r, p):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(M, K, device=device, dtype=dtype)
    W = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    A = torch.randn(r, K, device=device, dtype=dtype) / K**0.5
    B = torch.randn(N, r, device=device, dtype=dtype)
    rows = [("base linear (floor)", lambda: F.linear(x, W)),
            ("unfused PEFT formula", lambda: _formula(x, W, None, A, B, 2.0, p))]
    for name in available_backends():
        if device == "cpu" and name != "torch":
            continue
        rows.append((f"lora_kernels[{name}]", lambda name=name: lora_linear(x, W, None, A, B, 2.0, p, backend=name)))
    print(f"\nforward timing on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"{str(dtype).split('.')[-1]}, M={M} K={K} N={N} r={r} p={p}:")
    floor = None
    with torch.no_grad():
        for label, fn in rows:
            ms = _time(fn, device)
            floor = floor or ms
            print(f"  {label:24s} {ms:9.3f} ms   {ms / floor:5.2f}x floor")


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
    print("lora_kernels backends:")
    for name, status in backend_status().items():
        print(f"  {name:6s} {status}")
    ok = self_check(args.device)
    M = args.M or (8192 if args.device == "cuda" else 256)
    K, N = (args.K, args.N) if args.device == "cuda" or args.M else (min(args.K, 1024), min(args.N, 1024))
    timing_table(args.device, M, K, N, args.r, args.p)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
