"""One cuda backward with dA inside the dx GEMM and one with the dA pass (set_dA_in_gemm(1) / (0)) for Nsight
Compute: the dx GEMM (CUTLASS's `device_kernel`) with and without dA's K-tiles on the same problem, each call after
3 warm-up calls outside the profiled range.

    ncu --profile-from-start off --kernel-name device_kernel --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        python3 bench/dev/ncu_dx_dA.py [--shape 8192x4096x4096] [--r 16] [--p 0]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_passes import profile_once  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x4096x4096")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.0)
    a = ap.parse_args()
    import lora_kernels  # noqa: F401
    from lora_kernels.backends import cuda_backend as cb

    M, K, N = (int(v) for v in a.shape.split("x"))
    bf = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=bf)
    W = (torch.randn(N, K, device="cuda") / K ** 0.5).to(bf)
    A = (torch.randn(a.r, K, device="cuda") / K ** 0.5).to(bf)
    B = torch.randn(N, a.r, device="cuda").to(bf)
    dy = torch.randn(M, N, device="cuda", dtype=bf)
    _, u = cb.forward(x, W, None, A, B, 2.0, a.p, 1234, 0)
    previous = cb.set_dA_in_gemm(1)
    try:
        for mode in (1, 0):
            cb.set_dA_in_gemm(mode)
            profile_once(lambda: cb.backward(dy, x, W, A, B, u, 2.0, a.p, 1234, 0, True, True, True))
            print(f"ncu_dx_dA: mode {mode} backward {M}x{K}->{N} r={a.r} p={a.p} profiled "
                  f"({cb.dx_path(x, W, A, B, a.p)})")
    finally:
        cb.set_dA_in_gemm(previous)


if __name__ == "__main__":
    main()
