"""One cuda forward (p = 0) in the fused mode and one in the shrink + GEMM mode for Nsight Compute: the fused sm_90
kernel against our K-extended GEMM kernel on the same problem, each warmed up outside the profiled range.

    ncu --profile-from-start off --kernel-name device_kernel --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section LaunchStats \
        python3 bench/dev/ncu_fused.py [--shape 8192x4096x1024] [--r 16] [--adapters bfloat16]
"""
import argparse

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x4096x1024")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", default="bfloat16")
    a = ap.parse_args()
    import lora_kernels  # noqa: F401
    from lora_kernels.backends import cuda_backend as cb

    M, K, N = (int(v) for v in a.shape.split("x"))
    dt = getattr(torch, a.adapters)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
    A = (torch.randn(a.r, K, device="cuda") / K ** 0.5).to(dt)
    B = torch.randn(N, a.r, device="cuda").to(dt)
    for mode in (2, 0):
        cb.set_fused_forward(mode)
        for _ in range(3):
            cb.forward(x, W, None, A, B, 2.0, 0.0, 1234, 0)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        cb.forward(x, W, None, A, B, 2.0, 0.0, 1234, 0)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"ncu_fused: mode {mode} forward {M}x{K}->{N} r={a.r} {a.adapters} profiled ({cb.forward_path(x, W, None, A, B, 0.0)})")
    cb.set_fused_forward(-1)


if __name__ == "__main__":
    main()
