"""Where the host time of a DoRA call goes (GPU machine): synchronisations, Python functions, ATen/CUDA runtime calls.

    python3 bench/dev/dora_host.py [--providers ours-dora-cuda,ours-dora-cuda-savez,ours-cuda] \
        [--shapes 8192x4096x1024] [--r 16] [--p 0] [--calls 20]

For each provider and shape, on one fwd+bwd call after warm-up:
  * every host<->device synchronisation, as torch.cuda.set_sync_debug_mode("warn") reports it (with the line);
  * host time per call (no synchronisation inside the timed loop) next to wall and GPU time per call;
  * cProfile of ``--calls`` calls: the Python functions by own time and by cumulative time;
  * torch.profiler's CPU events by self time (ATen ops, cudaLaunchKernel, cudaMalloc, cudaStreamSynchronize, ...).

``--sections``: instead, the host time of one call with the GPU kept busy by a sleep queued first (no launch-queue
back-pressure, no profiler): the forward and the backward apart, and the host time inside each of DoRA's steps
(the norm, the backend ops, the Triton passes), each wrapped in a host timer.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import warnings

import torch

_BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_BENCH, "suite")]
from providers import make_case  # noqa: E402
from timing import bench_ms, host_us  # noqa: E402


def syncs(fn):
    """The synchronisations one call makes, as torch's sync debug mode warns of them (message @ file:line)."""
    found = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            fn()
        for w in ws:
            msg = str(w.message).splitlines()[0][:120]
            found.append(f"{msg} @ {w.filename}:{w.lineno}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return found


def _sleep_ms(ms: float):
    from timing import _cycles_per_ms

    torch.cuda._sleep(int(ms * _cycles_per_ms()))


def sections(case, reps: int):
    """Host microseconds of one fwd+bwd, forward and backward apart, behind a GPU sleep, and per wrapped step."""
    import time

    from lora_kernels import dora
    from lora_kernels.backends import cuda_backend

    spent: dict = {}

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
        setattr(owner, name, timed)
        return owner, name, fn

    wrapped = [wrap(dora, n, n) for n in ("_norm", "_weight_sq", "weight_norm", "scale_bias", "scale_colsum",
                                          "zero_g_colsum", "masked", "_fwd_impl", "_bwd_impl")]
    wrapped += [wrap(cuda_backend, n, "cuda." + n)
                for n in ("forward", "backward", "forward_scaled", "backward_dx_from")
                if getattr(cuda_backend, n, None) is not None]

    def measure(label, fn):
        """reps calls, each behind a 30 ms GPU sleep: the host time of the call, and of each wrapped step in it."""
        spent.clear()
        tot = []
        for _ in range(reps):
            _sleep_ms(30.0)
            t0 = time.perf_counter()
            fn()
            tot.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        tot.sort()
        print(f"  {label} host behind a sleep: median {tot[len(tot) // 2] * 1e6:8.1f} us, min {tot[0] * 1e6:8.1f} us")
        for k, v in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"    {k:16s} {v / reps * 1e6:8.1f} us/call")

    try:
        for _ in range(3):
            case.fwd_bwd[0]()
        torch.cuda.synchronize()
        measure("fwd+bwd", case.fwd_bwd[0])
        measure("fwd (no grad)", case.fwd[0])
    finally:
        for owner, name, fn in wrapped:
            setattr(owner, name, fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--providers", default="ours-dora-cuda,ours-dora-cuda-savez,ours-cuda")
    ap.add_argument("--shapes", default="8192x4096x1024")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.0)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--sections", action="store_true")
    args = ap.parse_args()
    print("gpu", torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        for prov in args.providers.split(","):
            case = make_case(prov, M, K, N, args.r, args.p)
            fn = case.fwd_bwd[0]
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            print(f"\n===== {prov} M={M} K={K} N={N} r={args.r} p={args.p}", flush=True)
            if args.sections:
                sections(case, args.calls)
                del case
                continue
            for mode in ("fwd", "fwd_bwd"):
                f = getattr(case, mode)[0]
                t = bench_ms(getattr(case, mode))
                print(f"  {mode:7s} host {host_us(f, n=50):8.1f} us/call | wall {t['median_ms'] * 1e3:8.1f} us/call"
                      f" | GPU {t.get('gpu_ms', float('nan')) * 1e3:8.1f} us/call", flush=True)
            s = syncs(fn)
            print(f"  synchronisations in one fwd+bwd: {len(s)}")
            for line in s:
                print("    " + line)
            pr = cProfile.Profile()
            torch.cuda.synchronize()
            pr.enable()
            for _ in range(args.calls):
                fn()
            pr.disable()
            torch.cuda.synchronize()
            for key in ("tottime", "cumulative"):
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(args.top)
                text = buf.getvalue()
                start = text.find("   ncalls")
                print(f"  cProfile of {args.calls} fwd+bwd calls, by {key}:")
                print("\n".join("    " + ln for ln in text[start:].splitlines() if ln.strip()))
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.calls):
                    fn()
                torch.cuda.synchronize()
            print(f"  torch.profiler CPU events over {args.calls} calls (self time):")
            print("\n".join("    " + ln for ln in prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=args.top).splitlines()))
            del case
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
