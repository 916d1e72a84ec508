"""Host (CPU) cost of one LoRA layer call, where the GPU work is tiny (M = 16): calibration launches, then
cProfile of the ours-* providers. Prints per-call microseconds; run on the GPU machine.

    python3 bench/tools/host_profile.py [--backends triton,cuda] [--top 25]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "suite"))
from providers import make_case  # noqa: E402
from timing import host_us  # noqa: E402


def per_call_us(fn):
    return host_us(fn, n=300, warmup=10)


def calibrate():
    import triton
    import triton.language as tl

    @triton.jit
    def _k1(x_ptr, n, B: tl.constexpr):
        o = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1, mask=o < n)

    @triton.jit
    def _k30(x_ptr, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
             a21, a22, a23, a24, a25, f1, f2, f3, n, B: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr):
        o = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + f1, mask=o < n)

    x = torch.zeros(1024, device="cuda")
    ints = list(range(3, 28))
    rows = {
        "torch.empty(16, 16)": lambda: torch.empty(16, 16, device="cuda"),
        "x.add_(1)": lambda: x.add_(1),
        "triton launch, 3 args": lambda: _k1[(1,)](x, 1024, B=1024),
        "triton launch, 31 args": lambda: _k30[(1,)](x, *ints, 1.0, 2.0, 3.0, 1024, B=1024, C1=True, C2=16),
    }
    for name, fn in rows.items():
        print(f"  calib {name:28s} {per_call_us(fn):8.1f} us/call", flush=True)


def profile(name, fn, top):
    per = per_call_us(fn)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(100):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    print(f"\n=== {name}: {per:.1f} us/call (host, no sync); cProfile of 100 calls, by tottime:")
    print("\n".join(s.getvalue().splitlines()[4:]), flush=True)


def op_breakdown(name, fn, top, n=50):
    """torch.profiler's self CPU time per op and CUDA runtime call (cudaLaunchKernel, cudaFuncSetAttribute, ...),
    per layer call: where the host time of the C++ and ATen side goes."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    print(f"\n=== {name}: torch.profiler self CPU time per call (profiler overhead included)")
    print(f"  {'op / runtime call':55s} {'calls/call':>10s} {'self us/call':>12s}")
    for e in rows:
        print(f"  {e.key[:55]:55s} {e.count / n:10.1f} {e.self_cpu_time_total / n:12.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--shape", default="16x4096x4096")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print("gpu", torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
    calibrate()
    M, K, N = (int(v) for v in args.shape.split("x"))
    base = make_case("cublas-base", M, K, N, 16, 0.0)
    print(f"  cuBLAS base fwd host {per_call_us(base.fwd[0]):.1f} us/call, fwd+dx {per_call_us(base.fwd_bwd[0]):.1f}")
    peft = make_case("peft-layer", M, K, N, 16, 0.0)
    print(f"  peft-layer fwd host {per_call_us(peft.fwd[0]):.1f} us/call, fwd+bwd {per_call_us(peft.fwd_bwd[0]):.1f}")
    for backend in args.backends.split(","):
        case = make_case(f"ours-{backend}", M, K, N, 16, 0.0)
        profile(f"ours-{backend} fwd (no_grad) M={M}", case.fwd[0], args.top)
        profile(f"ours-{backend} fwd+bwd M={M}", case.fwd_bwd[0], args.top)
        op_breakdown(f"ours-{backend} fwd+bwd M={M}", case.fwd_bwd[0], args.top)


if __name__ == "__main__":
    main()
