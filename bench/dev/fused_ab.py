"""GPU time of the cuda backend's forward and of the cuBLAS floor (F.linear) on a few shapes, CUDA events around
`calls` back-to-back calls after a warm-up. For A/B runs of the forward's development switches, one process per
setting (they are read once):

    LORA_KERNELS_FUSED_DEBUG=1 python3 bench/dev/fused_ab.py --tag nowait
"""
import argparse

import torch
import torch.nn.functional as F

from lora_kernels.backends import cuda_backend as cb

ap = argparse.ArgumentParser()
ap.add_argument("--tag", default="")
ap.add_argument("--shapes", default="8192x4096x4096,8192x4096x1024")
ap.add_argument("--r", default="16,64")
ap.add_argument("--calls", type=int, default=20)
args = ap.parse_args()


def gpu_us(fn, calls):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / calls


for shape in args.shapes.split(","):
    M, K, N = map(int, shape.split("x"))
    x = torch.randn(M, K, device="cuda").bfloat16()
    W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
    floor = gpu_us(lambda: F.linear(x, W), args.calls)
    for r in map(int, args.r.split(",")):
        A = torch.randn(r, K, device="cuda") * K ** -0.5
        B = torch.randn(N, r, device="cuda") * r ** -0.5
        t = gpu_us(lambda: cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0), args.calls)
        print(f"{args.tag:10s} {shape} r={r}: ours {t:7.1f} us  floor {floor:7.1f} us  ratio {t / floor:.3f}  "
              f"({cb.forward_path(x, W, None, A, B, 0.0).split(' (')[0]})", flush=True)
