"""Kernel timeline of one LoRA call against the floor's: where a call's GPU time goes besides its kernels.

    python3 bench/dev/timeline.py [--shapes 8192x4096x4096,8192x4096x1024] [--r 16] [--p 0,0.1] [--calls 3]
        [--adapter-dtype bfloat16] [--b-scale 0.05] [--providers cublas-base,ours-cuda,ours-dora-cuda]

For each shape, rank, dropout and mode (fwd, fwd_bwd), each provider (the cuBLAS floor, ours-cuda) runs `calls`
calls back to back queued behind a GPU sleep (so the host's enqueue time never shows), under torch.profiler. From the
kernels' device timestamps it prints, for the middle call: its span (first kernel start to the next call's first
kernel start), the sum of its kernels, and each kernel with the idle gap before it. span - kernels is the time the
GPU spent between the call's kernels (launch latency, a kernel's ramp-up and tail).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "suite"))
from providers import FLOOR, Unavailable, make_case  # noqa: E402


def kernels_of(fn, calls):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        torch.cuda._sleep(200_000_000)  # about 100 ms: the host enqueues every call before the GPU wakes
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    # the sleep is the first and longest activity (its kernel's name varies between torch versions)
    longest = max(range(len(evs)), key=lambda i: evs[i].time_range.end - evs[i].time_range.start)
    evs = evs[longest + 1:]
    return [(e.time_range.start, e.time_range.end, e.name) for e in evs]


def report(name, ks, calls):
    n = len(ks) // calls
    if n == 0 or n * calls != len(ks):
        print(f"    {name:12s} {len(ks)} kernels for {calls} calls: not an even split")
        return None
    mid = ks[n:2 * n]
    nxt = ks[2 * n][0] if calls > 2 else mid[-1][1]
    span = nxt - mid[0][0]
    busy = sum(e - s for s, e, _ in mid)
    print(f"    {name:12s} span {span:8.1f} us  kernels {busy:8.1f} us  idle {span - busy:6.1f} us  ({n} kernels)")
    prev_end = ks[n - 1][1]
    for s, e, kname in mid:
        print(f"        gap {s - prev_end:6.1f}  {e - s:8.1f}  {kname[:100]}")
        prev_end = e
    return span


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x4096x4096,8192x4096x1024")
    ap.add_argument("--r", default="16")
    ap.add_argument("--p", default="0,0.1")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--providers", default=f"{FLOOR},ours-cuda")
    ap.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the adapters' dtype (float32: PEFT's default)")
    ap.add_argument("--b-scale", type=float, default=1.0,
                    help="lora_B times this (the suite's --b-scale: DoRA's saved-y rule reads the adapter's size)")
    args = ap.parse_args()
    adapter_dtype = getattr(torch, args.adapter_dtype)
    print("gpu", torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        for r in (int(v) for v in args.r.split(",")):
            for p in (float(v) for v in args.p.split(",")):
                for mode in ("fwd", "fwd_bwd"):
                    print(f"=== {mode} M={M} {K}->{N} r={r} p={p} {args.adapter_dtype} adapters", flush=True)
                    spans = {}
                    for prov in args.providers.split(","):
                        try:
                            case = make_case(prov, M, K, N, r, p, adapter_dtype=adapter_dtype, b_scale=args.b_scale)
                        except Unavailable as e:
                            print(f"    {prov}: unavailable ({e})")
                            continue
                        fns = getattr(case, mode)
                        ks = kernels_of(fns[0], args.calls)
                        spans[prov] = report(prov, ks, args.calls)
                        del case
                        torch.cuda.empty_cache()
                    if spans.get(FLOOR) and len(spans) > 1:
                        print("    span ratios: " + ", ".join(f"{k} {v / spans[FLOOR]:.3f}" for k, v in spans.items()
                                                          if v and k != FLOOR))


if __name__ == "__main__":
    main()
