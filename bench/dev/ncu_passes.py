"""One cuda-backend fwd+bwd for Nsight Compute: warm-up outside the profiled range, then one call inside
torch.cuda.profiler.start()/stop(), so that `ncu --profile-from-start off` sees exactly one launch of each pass.

    ncu --clock-control none --profile-from-start off --kernel-name regex:'lora_' \
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
        python3 bench/dev/ncu_passes.py [--shape 8192x4096x14336] [--r 16] [--p 0.1]

(gpu_session.sh's `ncu` step runs this.) Shape M x K x N; bf16 x, fp32 adapters (PEFT's default).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "suite"))
from providers import make_case  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x4096x14336")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.1)
    a = ap.parse_args()
    M, K, N = (int(v) for v in a.shape.split("x"))
    case = make_case("ours-cuda", M, K, N, a.r, a.p)
    fwd_bwd = case.fwd_bwd[0]
    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ncu_passes: one fwd+bwd of {M}x{K}->{N} r={a.r} p={a.p} profiled")


if __name__ == "__main__":
    main()
