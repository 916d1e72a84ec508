"""Host time of the pieces of one small LoRA call, each isolated behind a GPU sleep (no profiler): what an empty
allocation, a dispatcher round trip and each layer of lora_linear cost on this machine. Run on the GPU machine:

    python3 bench/dev/host_probe.py [--M 16,2048] [--shape 4096x4096] [--r 16]

Prints microseconds per call (median of batches), to compare with F.linear's own in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from host_time import _cpu_batch_us, _GpuClock  # noqa: E402

SLEEP_US = 100_000.0  # each batch queued behind ~100 ms of GPU sleep: the GPU is still asleep when the host is done


def host_us(clock, fn, n=100, batches=7):
    """(median host us per call over the batches that the GPU sleep isolated, whether any was); when none was (fn
    waits for the GPU), its wall time per call instead, as bench/tools/host_time.py reports it."""
    for _ in range(5):
        fn()
    runs = [us for us in (clock.batch_us(fn, n, SLEEP_US) for _ in range(batches)) if us is not None]
    if runs:
        return statistics.median(runs), True
    torch.cuda.synchronize()
    return statistics.median(_cpu_batch_us(fn, n) for _ in range(batches)), False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="16,2048")
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--r", type=int, default=16)
    a = ap.parse_args()
    import lora_kernels
    from lora_kernels.backends import cuda_backend as cb

    K, N = (int(v) for v in a.shape.split("x"))
    dev = "cuda"
    rows = []
    clock = _GpuClock()

    def probe(name, fn):
        us, iso = host_us(clock, fn)
        rows.append((name, us, iso))
        print(f"  {name:58s} {us:8.1f} us{'' if iso else '  (not isolated)'}", flush=True)

    probe("torch.empty((16, 16), device=cuda)", lambda: torch.empty((16, 16), device=dev))
    probe("op round trip: lora_kernels_cuda.set_small_m (catch-all)",
          lambda: torch.ops.lora_kernels_cuda.set_small_m.default(True))
    for M in (int(v) for v in a.M.split(",")):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5
        A = torch.randn(a.r, K, device=dev) * K ** -0.5
        B = torch.randn(N, a.r, device=dev) * a.r ** -0.5
        dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        xg, Ag, Bg = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
        y, u = cb._OPS[0](x, W, None, A, B, 2.0, 0.0, 0, 0, None)
        print(f"M={M} {K}x{N} r={a.r} bf16 x, fp32 adapters")
        with torch.no_grad():
            probe(f"M={M} F.linear fwd (no_grad)", lambda: F.linear(x, W))
            probe(f"M={M} cuda op forward, direct (_OPS[0])", lambda: cb._OPS[0](x, W, None, A, B, 2.0, 0.0, 0, 0, None))
            probe(f"M={M} cuda op lora_linear below autograd (direct)",
                  lambda: cb._LINEAR(x, W, None, A, B, 2.0, 0.0, 0, 0, None))
            probe(f"M={M} lora_linear fwd (no_grad), cuda",
                  lambda: lora_kernels.lora_linear(x, W, None, A, B, 2.0, backend="cuda"))
            probe(f"M={M} cuda op backward, direct (_OPS[1]), all grads",
                  lambda: cb._OPS[1](dy, x, W, A, B, u, 2.0, 0.0, 0, 0, True, True, True, None))
            probe(f"M={M} cuda op backward, direct, dx only",
                  lambda: cb._OPS[1](dy, x, W, A, B, u, 2.0, 0.0, 0, 0, True, False, False, None))
            probe(f"M={M} cuda op backward, direct, dA dB only",
                  lambda: cb._OPS[1](dy, x, W, A, B, u, 2.0, 0.0, 0, 0, False, True, True, None))
            probe(f"M={M} dy @ W (cuBLAS, the dx GEMM alone)", lambda: dy @ W)
        probe(f"M={M} F.linear fwd+bwd (grad of x)",
              lambda: torch.autograd.grad(F.linear(xg, W), (xg,), dy))
        probe(f"M={M} C++ autograd op + autograd.grad (x, A, B)",
              lambda: torch.autograd.grad(cb._LINEAR(xg, W, None, Ag, Bg, 2.0, 0.0, 0, 0, None), (xg, Ag, Bg), dy))
        probe(f"M={M} lora_linear fwd+bwd, cuda",
              lambda: torch.autograd.grad(lora_kernels.lora_linear(xg, W, None, Ag, Bg, 2.0, backend="cuda"),
                                          (xg, Ag, Bg), dy))
        probe(f"M={M} C++ autograd op fwd only (grad mode, no backward)",
              lambda: cb._LINEAR(xg, W, None, Ag, Bg, 2.0, 0.0, 0, 0, None))
        probe(f"M={M} F.linear fwd only (grad mode, no backward)", lambda: F.linear(xg, W))
        if "triton" in lora_kernels.available_backends():
            probe(f"M={M} lora_linear fwd (no_grad), triton",
                  lambda: torch.no_grad()(lora_kernels.lora_linear)(x, W, None, A, B, 2.0, backend="triton"))
            probe(f"M={M} lora_linear fwd+bwd, triton",
                  lambda: torch.autograd.grad(lora_kernels.lora_linear(xg, W, None, Ag, Bg, 2.0, backend="triton"),
                                              (xg, Ag, Bg), dy))
    if "triton" in lora_kernels.available_backends():
        from lora_kernels.backends.triton import kernels as tk, launch

        names = {id(getattr(tk, n)): n for n in dir(tk)}
        print("triton fast launch:", launch._FAST_LAUNCH, "| hooks set:", launch._launch_hooks_set(),
              "| launch keys kept:", len(launch._LAUNCHED))
        for kid, layout in launch._LAYOUTS.items():
            print(f"  layout of {names.get(kid, kid)}: {'JIT path (no fast layout)' if layout is None else 'fast'}")


if __name__ == "__main__":
    main()
