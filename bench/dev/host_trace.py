"""Where the host time of one small LoRA call goes, below Python: torch.profiler's CPU events (ATen ops, CUDA runtime
calls such as cudaLaunchKernel / cudaLaunchKernelExC / cudaFuncSetAttribute) over repeated calls, for the providers
of bench/tools/host_time.py (F.linear, PEFT's layer, the lora_kernels backends). Run on the GPU machine:

    python3 bench/dev/host_trace.py [--backends cuda,triton] [--M 16] [--p 0] [--calls 50] [--row-limit 25]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from host_time import providers  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.0)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--row-limit", type=int, default=25)
    args = ap.parse_args()
    K, N = (int(v) for v in args.shape.split("x"))
    provs = providers(args.M, K, N, args.r, args.p, torch.bfloat16, "cuda", args.backends.split(","))
    for name, fns in provs.items():
        for mode, fn in zip(("fwd", "fwd+bwd"), fns):
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.calls):
                    fn()
            torch.cuda.synchronize()
            print(f"\n===== {name} {mode} M={args.M} {K}x{N} r={args.r} p={args.p}: CPU events over {args.calls} "
                  f"calls (self CPU total / {args.calls} = us per call)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.row_limit,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
