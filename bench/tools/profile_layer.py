"""Where the time of one LoRA layer goes: per-kernel CUDA time (torch.profiler) and host time per call.

    python3 bench/tools/profile_layer.py [--backends triton,cuda] [--shapes 8192x4096x4096,16x4096x4096] [--r 16] \
        [--p 0.1]

For each backend and shape (M x K x N) it prints
  * host us/call: wall time to enqueue 200 calls without synchronizing (the CPU cost of a call: Python, dispatch,
    launches), next to the GPU time per call (CUDA events) -- when host > GPU the layer is launch-bound;
  * the kernels of one fwd and one fwd+bwd (profiler, summed over 10 calls, divided by 10), with the cuBLAS
    floor (F.linear, and F.linear + dy @ W) for comparison, and the frozen GEMMs with beta = 1 (addmm_) that the
    fused backends run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "suite"))
from providers import make_case  # noqa: E402
from timing import bench_ms, host_us  # noqa: E402


def kernel_table(fn, reps=10, top=12):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0)
        if t and ev.count:
            rows.append((t / reps, ev.count // reps, ev.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"      {t:9.1f} us  x{c:<3d} {name[:110]}" for t, c, name in rows[:top]]
    return total, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--shapes", default="8192x4096x4096,8192x4096x14336,16x4096x4096")
    ap.add_argument("--r", default="16", help="ranks, comma-separated")
    ap.add_argument("--p", default="0,0.1")
    ap.add_argument("--adapter-dtype", default="float32")
    args = ap.parse_args()
    import lora_kernels

    print("gpu", torch.cuda.get_device_name(), "| torch", torch.__version__, "| backends",
          lora_kernels.available_backends(), flush=True)
    adt = getattr(torch, args.adapter_dtype)
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        ranks = [int(v) for v in args.r.split(",")]
        base = make_case("cublas-base", M, K, N, ranks[0], 0.0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        dx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        gemms = {
            "F.linear(x, W)": lambda: F.linear(x, W),
            "y.addmm_(x, W.t())  beta=1": lambda: y.addmm_(x, W.t()),
            "dy @ W": lambda: dy @ W,
            "dx.addmm_(dy, W)    beta=1": lambda: dx.addmm_(dy, W),
        }
        print(f"\n=== M={M} K={K} N={N} r={args.r}", flush=True)
        for name, fn in gemms.items():
            print(f"  cuBLAS {name:28s} {bench_ms(fn)['median_ms'] * 1e3:9.1f} us")
        print(f"  floor fwd {bench_ms(base.fwd)['median_ms'] * 1e3:9.1f} us | fwd+dx "
              f"{bench_ms(base.fwd_bwd)['median_ms'] * 1e3:9.1f} us")
        for backend, r, p in ((b, r, float(p)) for b in args.backends.split(",") for r in ranks
                              for p in args.p.split(",")):
            try:
                case = make_case(f"ours-{backend}", M, K, N, r, p, adapter_dtype=adt)
            except Exception as e:
                print(f"  {backend} r={r} p={p}: unavailable ({e})")
                continue
            for mode in ("fwd", "fwd_bwd"):
                fn = getattr(case, mode)[0]
                gpu = bench_ms(getattr(case, mode))["median_ms"] * 1e3
                host = host_us(fn)
                total, lines = kernel_table(fn)
                print(f"  {backend:6s} r={r:<3d} p={p:<4} {mode:7s} gpu {gpu:9.1f} us/call | host {host:7.1f} us/call | "
                      f"kernels {total:9.1f} us", flush=True)
                print("\n".join(lines), flush=True)
            del case
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
