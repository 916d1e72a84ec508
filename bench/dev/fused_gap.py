"""Device time of each kernel of the cuda forward (p = 0) in the fused mode and in the shrink + GEMM mode, and of the
cuBLAS floor, in one process: how far the fused sm_90 kernel stands from our own K-extended GEMM (mode 0's GEMM
kernel) and from cuBLAS on the same problem. Calls are queued behind a GPU sleep under torch.profiler, so host time
never shows; each kernel's mean over the calls. Development switches (LORA_KERNELS_FUSED_DEBUG, _STRIP, _AHEAD,
LORA_KERNELS_SM90_GEMM_CONFIG) are read once: one process per setting.

    python3 bench/dev/fused_gap.py --tag base --shapes 8192x4096x1024,8192x4096x4096 --r 16,64
"""
import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lora_kernels.backends import cuda_backend as cb


def kernel_means(fn, calls):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(100_000_000)
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    longest = max(evs, key=lambda e: e.time_range.end - e.time_range.start)  # the sleep
    tot = defaultdict(float)
    for e in evs:
        if e is not longest and e.time_range.start >= longest.time_range.end:
            tot[e.name] += (e.time_range.end - e.time_range.start) / calls
    return tot


def short(name):
    for key in ("FusedFwd", "GemmUniversal", "gemm_sm90", "shrink", "prep", "nvjet", "gemm", "sm90_xmma"):
        if key in name:
            return (key + ":" + name[:40]) if key in ("nvjet", "gemm", "sm90_xmma") else key
    return name[:40]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="")
    ap.add_argument("--shapes", default="8192x4096x1024,8192x4096x4096")
    ap.add_argument("--r", default="16,64")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--modes", default="2,0")
    a = ap.parse_args()
    for shape in a.shapes.split(","):
        M, K, N = map(int, shape.split("x"))
        x = torch.randn(M, K, device="cuda").bfloat16()
        W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
        floor = kernel_means(lambda: F.linear(x, W), a.calls)
        fl = sum(floor.values())
        for r in map(int, a.r.split(",")):
            A = (torch.randn(r, K, device="cuda") * K ** -0.5).bfloat16()
            B = (torch.randn(N, r, device="cuda") * r ** -0.5).bfloat16()
            parts = []
            for m in map(int, a.modes.split(",")):
                cb.set_fused_forward(m)
                ks = kernel_means(lambda: cb.forward(x, W, None, A, B, 0.5, 0.0, 1234, 0), a.calls)
                total = sum(ks.values())
                each = ", ".join(f"{short(k)} {v:.1f}" for k, v in sorted(ks.items(), key=lambda kv: -kv[1]))
                parts.append(f"mode {m}: {total:7.1f} us ({total / fl:.3f}) [{each}]")
            cb.set_fused_forward(-1)
            print(f"{a.tag:10s} {shape} r={r}: floor {fl:7.1f} us | " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
