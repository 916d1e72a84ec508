"""One cuda forward (p = 0) in the fused mode and one in the shrink + GEMM mode for Nsight Compute: the fused sm_90
kernel against our K-extended GEMM kernel on the same problem, each warmed up outside the profiled range (both
kernels are CUTLASS's `device_kernel` template).

    ncu --profile-from-start off --kernel-name device_kernel --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section LaunchStats \
        python3 bench/dev/ncu_fused.py [--shape 8192x4096x1024] [--r 16] [--adapters bfloat16]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_shrink_drop import profile_forwards  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x4096x1024")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", default="bfloat16")
    a = ap.parse_args()
    from lora_kernels.backends import cuda_backend as cb

    profile_forwards("ncu_fused", cb.set_fused_forward, (2, 0), a.shape, a.r, a.adapters, 0.0)


if __name__ == "__main__":
    main()
