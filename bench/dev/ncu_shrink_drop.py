"""One cuda forward with dropout per shrink mode for Nsight Compute: the shrink that makes its mask itself
(csrc/shrink_drop.cu, set_shrink_drop(1)) and the keep-bits pass plus the shrink that reads them (set_shrink_drop(0)),
each warmed up outside the profiled range.

    ncu --profile-from-start off --kernel-name regex:'shrink|keep_bits' --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy --section WarpStateStats \
        python3 bench/dev/ncu_shrink_drop.py [--shape 8192x4096x4096] [--r 16] [--adapters bfloat16] [--p 0.1]

`profile_forwards` is shared with ncu_fused.py.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_passes import profile_once  # noqa: E402


def profile_forwards(name, set_mode, modes, shape, r, adapters, p, reset=-1):
    """One cuda forward per mode (set_mode(mode) before each) inside the profiled range, each after 3 warm-up calls
    outside it; set_mode(reset) at the end."""
    import lora_kernels  # noqa: F401
    from lora_kernels.backends import cuda_backend as cb

    M, K, N = (int(v) for v in shape.split("x"))
    dt = getattr(torch, adapters)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
    A = (torch.randn(r, K, device="cuda") / K ** 0.5).to(dt)
    B = torch.randn(N, r, device="cuda").to(dt)
    for mode in modes:
        set_mode(mode)
        profile_once(lambda: cb.forward(x, W, None, A, B, 2.0, p, 1234, 0))
        print(f"{name}: mode {mode} forward {M}x{K}->{N} r={r} {adapters} p={p} profiled "
              f"({cb.forward_path(x, W, None, A, B, p)})")
    set_mode(reset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x4096x4096")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", default="bfloat16")
    ap.add_argument("--p", type=float, default=0.1)
    a = ap.parse_args()
    from lora_kernels.backends import cuda_backend as cb

    profile_forwards("ncu_shrink_drop", cb.set_shrink_drop, (1, 0), a.shape, a.r, a.adapters, a.p)


if __name__ == "__main__":
    main()
