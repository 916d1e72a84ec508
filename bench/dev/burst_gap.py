"""Why a call costs more in the targets grid's burst regime than back to back: the cuda forward (p = 0) and the cuBLAS
floor timed three ways on the same inputs (rotating input sets, as the grid does, so that no call finds its operands
in L2 from the call before):

- b2b:    CUDA events around `calls` back-to-back calls queued behind a GPU sleep, per call;
- single: the grid's round (bench/suite/targets.py gpu_round): a sleep, one untimed call of the other provider, then
          each provider's call between its own events, the order alternating; the median over the rounds;
- kernel: the same single rounds under torch.profiler: each timed call's own kernels' device time (CUPTI), and the
          time from the call's start event to its first kernel (launch latency, as the events see it).

If `kernel` matches `b2b`, the grid's extra time is outside the kernels (launch and queue latency around a call
timed alone); if it exceeds it, the kernel itself runs slower when timed alone (clocks, a cold L2, its prologue).

    python3 bench/dev/burst_gap.py --shapes 8192x4096x1024,2048x4096x1024 --r 16 [--tag pdl0]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lora_kernels.backends import cuda_backend as cb


def sets_for(M, K, N, r, l2_bytes):
    """Input sets whose x and W together exceed twice the L2 (at least 2)."""
    per = (M * K + N * K) * 2
    n = max(2, -(-2 * l2_bytes // per))
    out = []
    for _ in range(n):
        x = torch.randn(M, K, device="cuda").bfloat16()
        W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
        A = (torch.randn(r, K, device="cuda") * K ** -0.5).bfloat16()
        B = (torch.randn(N, r, device="cuda") * r ** -0.5).bfloat16()
        out.append((x, W, A, B))
    return out


def b2b_us(fn, n_sets, calls):
    for i in range(3):
        fn(i % n_sets)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)
    s.record()
    for i in range(calls):
        fn(i % n_sets)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / calls


def single_round(fns, i, n_sets):
    keys = list(fns)
    keys = keys[i % 2:] + keys[:i % 2]
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)
    fns[keys[-1]]((i + 1) % n_sets)  # untimed: the clocks up, as in the grid
    evs = {}
    for k in keys:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fns[k](i % n_sets)
        e.record()
        evs[k] = (s, e)
    torch.cuda.synchronize()
    return {k: s.elapsed_time(e) * 1e3 for k, (s, e) in evs.items()}


def kernel_rounds(fns, n_sets, rounds):
    """Single rounds under torch.profiler. Per provider, medians over the rounds: the device time of its timed call's
    kernels, and the idle gap on the GPU between the kernel before the call (the untimed call's or the other
    provider's) and the call's first kernel."""
    dur = {k: [] for k in fns}
    gap = {k: [] for k in fns}
    for i in range(rounds):
        keys = list(fns)
        keys = keys[i % 2:] + keys[:i % 2]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            torch.cuda._sleep(20_000_000)
            fns[keys[-1]]((i + 1) % n_sets)
            for k in keys:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                with torch.profiler.record_function("timed:" + k):
                    fns[k](i % n_sets)
                e.record()
            torch.cuda.synchronize()
        kern = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
        kern = [e for e in kern if "sleep" not in e.name.lower() and "spin" not in e.name.lower()]
        # the untimed call's kernels, then each timed call's: split by the providers' kernel counts
        counts = KERNELS
        pos = counts[keys[-1]]
        prev_end = kern[pos - 1].time_range.end if pos > 0 else None
        for k in keys:
            mine = kern[pos:pos + counts[k]]
            pos += counts[k]
            if not mine:
                continue
            dur[k].append(sum(e.time_range.end - e.time_range.start for e in mine))
            if prev_end is not None:
                gap[k].append(mine[0].time_range.start - prev_end)
            prev_end = mine[-1].time_range.end
    return ({k: statistics.median(v) for k, v in dur.items() if v},
            {k: statistics.median(v) for k, v in gap.items() if v})


KERNELS = {}


def count_kernels(fn):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(0)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="")
    ap.add_argument("--shapes", default="8192x4096x1024,2048x4096x1024,2048x4096x4096")
    ap.add_argument("--r", default="16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 * 2 ** 20
    for shape in a.shapes.split(","):
        M, K, N = map(int, shape.split("x"))
        for r in map(int, a.r.split(",")):
            sets = sets_for(M, K, N, r, l2)
            n = len(sets)
            fns = {"floor": lambda i: F.linear(sets[i][0], sets[i][1]),
                   "ours": lambda i: cb.forward(sets[i][0], sets[i][1], None, sets[i][2], sets[i][3], 0.5, 0.0,
                                                1234, 0)}
            for k, f in fns.items():
                for i in range(3):
                    f(i % n)
                KERNELS[k] = count_kernels(f)
            b2b = {k: b2b_us(f, n, a.calls) for k, f in fns.items()}
            singles = [single_round(fns, i, n) for i in range(a.rounds)]
            single = {k: statistics.median(s[k] for s in singles) for k in fns}
            kdur, kgap = kernel_rounds(fns, n, a.rounds)
            line = " | ".join(
                f"{k}: b2b {b2b[k]:7.1f} single {single[k]:7.1f} kernel {kdur.get(k, 0):7.1f} "
                f"gap-before {kgap.get(k, 0):5.1f} ({KERNELS[k]} kernels)" for k in fns)
            print(f"{a.tag:8s} {shape} r={r} sets={n}: {line} | single ratio "
                  f"{statistics.median(s['ours'] / s['floor'] for s in singles):.3f} b2b ratio "
                  f"{b2b['ours'] / b2b['floor']:.3f}", flush=True)


if __name__ == "__main__":
    main()
