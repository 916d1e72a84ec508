"""Where one call's host time goes, by sampling: the loop that py-spy (with native frames) records.

    py-spy record --native --rate 250 --format raw -o spy.txt -- \
        python3 bench/dev/host_spy.py --provider cuda --mode fwd_bwd --M 16 --p 0 --seconds 15
    python3 bench/dev/spy_report.py spy.txt --calls-file spy.txt.calls

Providers and modes are host_time.py's (4096x4096, r = 16, fp32 adapters): ``linear`` (F.linear), ``cuda``,
``triton``, ``peft``. The GPU never holds the host back: calls run in batches queued behind a ``torch.cuda._sleep``
that outlasts the batch (fewer calls per batch than fill the device's launch queue), and the synchronisation between
batches runs outside ``one_call``, which spy_report.py counts alone. Writes the calls made and their mean host us
(timed without the profiler's pauses being separable, so only as a scale for the sample fractions) to
``<--calls-file>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from host_time import providers  # noqa: E402

NAMES = {"linear": "F.linear", "cuda": "lora_kernels cuda", "triton": "lora_kernels triton",
         "peft": "peft lora.Linear"}


def one_call(fn):
    return fn()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--provider", default="cuda", choices=sorted(NAMES))
    ap.add_argument("--mode", default="fwd_bwd", choices=["fwd", "fwd_bwd"])
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--shape", default="4096x4096", help="KxN")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--batch", type=int, default=60, help="calls queued behind one sleep")
    ap.add_argument("--calls-file", default=None)
    a = ap.parse_args()
    K, N = (int(v) for v in a.shape.split("x"))
    backends = [a.provider] if a.provider in ("cuda", "triton") else []
    ps = providers(a.M, K, N, a.r, a.p, torch.bfloat16, "cuda", backends=backends)
    fwd, fwd_bwd = ps[NAMES[a.provider]]
    fn = fwd if a.mode == "fwd" else fwd_bwd
    for _ in range(20):  # warm-up: compiles, plans, allocator pools
        fn()
    torch.cuda.synchronize()
    calls, host_s = 0, 0.0
    end = time.perf_counter() + a.seconds
    while time.perf_counter() < end:
        torch.cuda._sleep(200_000_000)  # ~100 ms at H100 clocks: longer than a batch's host time
        t0 = time.perf_counter()
        for _ in range(a.batch):
            one_call(fn)
        host_s += time.perf_counter() - t0
        calls += a.batch
        torch.cuda.synchronize()
    info = dict(provider=a.provider, mode=a.mode, M=a.M, shape=a.shape, r=a.r, p=a.p, calls=calls,
                host_us_per_call=1e6 * host_s / max(calls, 1))
    print(json.dumps(info))
    if a.calls_file:
        with open(a.calls_file, "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
