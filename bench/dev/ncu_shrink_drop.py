"""One cuda forward with dropout per shrink mode for Nsight Compute: the shrink that makes its mask itself
(csrc/shrink_drop.cu, set_shrink_drop(1)) and the keep-bits pass plus the shrink that reads them (set_shrink_drop(0)),
each warmed up outside the profiled range.

    ncu --profile-from-start off --kernel-name regex:'shrink|keep_bits' --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy --section WarpStateStats \
        python3 bench/dev/ncu_shrink_drop.py [--shape 8192x4096x4096] [--r 16] [--adapters bfloat16] [--p 0.1]
"""
import argparse

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x4096x4096")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", default="bfloat16")
    ap.add_argument("--p", type=float, default=0.1)
    a = ap.parse_args()
    import lora_kernels  # noqa: F401
    from lora_kernels.backends import cuda_backend as cb

    M, K, N = (int(v) for v in a.shape.split("x"))
    dt = getattr(torch, a.adapters)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
    A = (torch.randn(a.r, K, device="cuda") / K ** 0.5).to(dt)
    B = torch.randn(N, a.r, device="cuda").to(dt)
    for mode in (1, 0):
        cb.set_shrink_drop(mode)
        for _ in range(3):
            cb.forward(x, W, None, A, B, 2.0, a.p, 1234, 0)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        cb.forward(x, W, None, A, B, 2.0, a.p, 1234, 0)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"ncu_shrink_drop: mode {mode} forward {M}x{K}->{N} r={a.r} {a.adapters} p={a.p} profiled")
    cb.set_shrink_drop(-1)


if __name__ == "__main__":
    main()
