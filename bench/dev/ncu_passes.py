"""One cuda-backend fwd+bwd for Nsight Compute: warm-up outside the profiled range, then one call inside
torch.cuda.profiler.start()/stop(), so that `ncu --profile-from-start off` sees exactly one launch of each pass.

    ncu --clock-control none --profile-from-start off --kernel-name regex:'lora_' \
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
        python3 bench/dev/ncu_passes.py [--shape 8192x4096x14336] [--r 16] [--p 0.1]

(gpu_session.sh's `ncu` step runs this.) Shape M x K x N; bf16 x, fp32 adapters (PEFT's default).
`profile_once` is shared with ncu_shrink_drop.py and ncu_dx_dA.py.
"""
import argparse
import os
import sys

import torch


def profile_once(call, warmup=3):
    """call() `warmup` times outside the profiled range, then once inside torch.cuda.profiler.start()/stop()."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x4096x14336")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.1)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "suite"))
    from providers import make_case

    M, K, N = (int(v) for v in a.shape.split("x"))
    profile_once(make_case("ours-cuda", M, K, N, a.r, a.p).fwd_bwd[0])
    print(f"ncu_passes: one fwd+bwd of {M}x{K}->{N} r={a.r} p={a.p} profiled")


if __name__ == "__main__":
    main()
