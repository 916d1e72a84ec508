"""Where one call's host time goes, by sampling: the loop that py-spy (with native frames) records.

    py-spy record --native --rate 250 --format raw -o spy.txt -- \
        python3 bench/dev/host_spy.py --provider cuda --mode fwd_bwd --M 16 --p 0 --seconds 15
    python3 bench/dev/spy_report.py spy.txt --calls-file spy.txt.calls

Providers and modes are host_time.py's (4096x4096, r = 16, fp32 adapters): ``linear`` (F.linear), ``cuda``,
``triton``, ``peft``; and the cuda backend's pieces, called from this thread (autograd runs a CUDA backward on its
device thread, which py-spy does not sample): ``cuda_fwd_op`` and ``cuda_bwd_op`` (the forward and backward ops
themselves, all grads) and ``cuda_node`` (the C++ autograd op's forward in grad mode: the node's creation, no
backward). Calls run in batches with a synchronisation between them, outside ``one_call``, which spy_report.py counts
alone; under py-spy the host is slower than the GPU, so no batch waits for it (``--sleep-ms`` queues a GPU sleep ahead
of each batch where it could). Writes the calls made and their mean host us (with the profiler's pauses, so only as
a scale for the sample fractions) to ``<--calls-file>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from host_time import _make, providers  # noqa: E402

NAMES = {"linear": "F.linear", "cuda": "lora_kernels cuda", "triton": "lora_kernels triton",
         "peft": "peft lora.Linear"}


def _pieces_inputs(M, K, N, r):
    t = _make(M, K, N, r, torch.bfloat16, "cuda")  # host_time.py's inputs
    return t["x"], t["W"], t["A"], t["B"], t["dy"]


def _fwd_op(M, K, N, r, p):
    from lora_kernels.backends import cuda_backend as cb

    x, W, A, B, _ = _pieces_inputs(M, K, N, r)
    return lambda: cb._OPS[0](x, W, None, A, B, 2.0, p, 1234, 0, None)


def _bwd_op(M, K, N, r, p):
    from lora_kernels.backends import cuda_backend as cb

    x, W, A, B, dy = _pieces_inputs(M, K, N, r)
    u = cb._OPS[0](x, W, None, A, B, 2.0, p, 1234, 0, None)[1]
    return lambda: cb._OPS[1](dy, x, W, A, B, u, 2.0, p, 1234, 0, True, True, True, None)


def _node(M, K, N, r, p):
    from lora_kernels.backends import cuda_backend as cb

    x, W, A, B, _ = _pieces_inputs(M, K, N, r)
    xg, Ag, Bg = x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    return lambda: cb._LINEAR(xg, W, None, Ag, Bg, 2.0, p, 1234, 0, None)


PIECES = {"cuda_fwd_op": _fwd_op, "cuda_bwd_op": _bwd_op, "cuda_node": _node}


def one_call(fn):
    return fn()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--provider", default="cuda", choices=sorted(NAMES) + sorted(PIECES))
    ap.add_argument("--mode", default="fwd_bwd", choices=["fwd", "fwd_bwd"])
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--shape", default="4096x4096", help="KxN")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--batch", type=int, default=60, help="calls queued behind one sleep")
    ap.add_argument("--sleep-ms", type=float, default=0.0, help="GPU sleep queued ahead of each batch")
    ap.add_argument("--calls-file", default=None)
    a = ap.parse_args()
    K, N = (int(v) for v in a.shape.split("x"))
    if a.provider in PIECES:
        fn = PIECES[a.provider](a.M, K, N, a.r, a.p)
    else:
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
        if a.sleep_ms > 0:
            torch.cuda._sleep(int(a.sleep_ms * 2e6))  # about 2e6 cycles per ms at H100 clocks
        t0 = time.perf_counter()
        for _ in range(a.batch):
            one_call(fn)
        host_s += time.perf_counter() - t0
        calls += a.batch
        torch.cuda.synchronize()
    info = dict(provider=a.provider, mode="piece" if a.provider in PIECES else a.mode, M=a.M, shape=a.shape, r=a.r,
                p=a.p, calls=calls, host_us_per_call=1e6 * host_s / max(calls, 1))
    print(json.dumps(info))
    if a.calls_file:
        with open(a.calls_file, "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
