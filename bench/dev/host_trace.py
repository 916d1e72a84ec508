"""Where the host time of one small LoRA call goes, below Python: torch.profiler's CPU events (ATen ops, CUDA runtime
calls such as cudaLaunchKernel / cudaLaunchKernelExC / cudaFuncSetAttribute) over repeated calls, for the providers
of bench/tools/host_time.py (F.linear, PEFT's layer, the lora_kernels backends). Run on the GPU machine:

    python3 bench/dev/host_trace.py [--backends cuda,triton] [--M 16] [--p 0] [--calls 50] [--row-limit 25]

Then, for the triton backend, a breakdown of its host time per call without the profiler: the whole call; the same
with every Triton launch replaced by a no-op (the Python and torch work around the launches; the plans' relaunches
of compiled kernels, launch._fast_launch_op, made no-ops); and how many launches per call took triton's JIT path
(JITFunction.run) instead of the backend's fast relaunch; then cProfile's top functions per call (the Python under
the launches too: triton's launcher wrappers and TMA descriptor encoding, the plans' steps, torch's ops).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

_BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_BENCH, "tools"), os.path.join(_BENCH, "suite")]
from host_time import providers  # noqa: E402
from timing import host_us  # noqa: E402


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
    if "lora_kernels triton" in provs:
        triton_breakdown(provs["lora_kernels triton"], args.calls)


def triton_breakdown(fns, calls):
    """Host microseconds per call of the triton backend: as is, with its launches made no-ops, and the number of
    launches per call that went through triton's JIT (the slow path) after warm-up."""
    import triton

    from lora_kernels.backends.triton import launch

    jit_calls = [0]
    real_run = triton.runtime.JITFunction.run

    def counting_run(self, *a, **k):
        jit_calls[0] += 1
        return real_run(self, *a, **k)

    print("\n===== triton backend host time per call (us), no profiler")
    for mode, fn in zip(("fwd", "fwd+bwd"), fns):
        for _ in range(10):
            fn()
        full = host_us(fn, calls, warmup=0)
        triton.runtime.JITFunction.run = counting_run
        try:
            host_us(fn, calls, warmup=0)
        finally:
            triton.runtime.JITFunction.run = real_run
        # the plans' direct relaunches made no-ops: new plans, whose first run (in the warm-up) launches through the
        # JIT and whose later runs launch nothing
        real_op = launch._fast_launch_op
        launch._fast_launch_op = launch._no_launch_op
        launch._PLANS.clear()
        try:
            bare = host_us(fn, calls, warmup=2)
        finally:
            launch._fast_launch_op = real_op
            launch._PLANS.clear()
        print(f"{mode:8s} whole call {full:8.1f} | launches made no-ops {bare:8.1f} | launches {full - bare:8.1f} | "
              f"JIT-path launches per call after warm-up {jit_calls[0] / calls:.2f}")
        jit_calls[0] = 0
    # Where the Python time of a call goes, launches included (triton's launcher wrappers, its TMA descriptor
    # encoding, the plans' steps, torch's ops): cProfile's top functions by their own time, per call.
    for mode, fn in zip(("fwd", "fwd+bwd"), fns):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"\n===== triton backend {mode}: cProfile over {calls} calls (tottime / {calls} = us per call, "
              f"inflated by the profiler)")
        stats = pstats.Stats(prof)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]
        for (file, line, func), (cc, nc, tt, ct, _) in rows:
            print(f"{tt / calls * 1e6:9.1f} us  {ct / calls * 1e6:9.1f} us cum  {nc / calls:6.1f} calls  "
                  f"{os.path.basename(file)}:{line}({func})")


if __name__ == "__main__":
    main()
