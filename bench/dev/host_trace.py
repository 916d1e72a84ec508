"""Where the host time of one small LoRA call goes, below Python: torch.profiler's CPU events (ATen ops, CUDA
runtime calls such as cudaLaunchKernel / cudaLaunchKernelExC / cudaFuncSetAttribute) over repeated calls at M = 16,
next to F.linear's. Run on the GPU machine:

    python3 bench/dev/host_trace.py [--backends cuda,triton] [--M 16] [--calls 50] [--row-limit 25]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def cases(M, K, N, r, backend, p):
    import lora_kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16().requires_grad_()
    W = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    A = (torch.randn(r, K, device="cuda", generator=g) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, r, device="cuda", generator=g) * r ** -0.5).requires_grad_()
    dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    if backend == "F.linear":
        return (lambda: F.linear(x.detach(), W),
                lambda: torch.autograd.grad(F.linear(x, W), (x,), dy))

    def fwd():
        with torch.no_grad():
            return lora_kernels.lora_linear(x, W, None, A, B, 2.0, dropout_p=p, backend=backend)

    def fwd_bwd():
        return torch.autograd.grad(lora_kernels.lora_linear(x, W, None, A, B, 2.0, dropout_p=p, backend=backend),
                                   (x, A, B), dy)

    return fwd, fwd_bwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--p", type=float, default=0.0)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--row-limit", type=int, default=25)
    args = ap.parse_args()
    K, N = (int(v) for v in args.shape.split("x"))
    for backend in ["F.linear"] + args.backends.split(","):
        for mode, fn in zip(("fwd", "fwd+bwd"), cases(args.M, K, N, 16, backend, args.p)):
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.calls):
                    fn()
            torch.cuda.synchronize()
            print(f"\n===== {backend} {mode} M={args.M} {K}x{N} p={args.p}: CPU events over {args.calls} calls "
                  f"(self CPU total / {args.calls} = us per call)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.row_limit,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
