"""The forward's shrink with dropout (csrc/shrink_drop.cu) with x through plain loads (ring 0) and through its
cp.async ring (2 or 4 steps per warp): each kernel's device time of the cuda forward at p > 0 with that shrink forced
on, and the cuBLAS floor, in one process (set_shrink_drop_ring between settings, the settings alternating). Calls are
queued behind a GPU sleep under torch.profiler (fused_gap.kernel_means), so host time never shows.

    python3 bench/dev/shrink_drop_ring.py --shapes 8192x4096x1024,8192x4096x4096 --r 16,64 --rings 0,2,4,0
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_gap import kernel_means, short  # noqa: E402

from lora_kernels.backends import cuda_backend as cb  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x4096x1024,8192x4096x4096,8192x14336x4096,2048x4096x4096")
    ap.add_argument("--r", default="16,32,64")
    ap.add_argument("--adapters", default="bfloat16")
    ap.add_argument("--rings", default="0,2,4,0,2,4")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args()
    cb.set_shrink_drop(1)
    for shape in a.shapes.split(","):
        M, K, N = map(int, shape.split("x"))
        x = torch.randn(M, K, device="cuda").bfloat16()
        W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
        fl = sum(kernel_means(lambda: F.linear(x, W), a.calls).values())
        for adt in a.adapters.split(","):
            for r in map(int, a.r.split(",")):
                A = (torch.randn(r, K, device="cuda") * K ** -0.5).to(getattr(torch, adt))
                B = (torch.randn(N, r, device="cuda") * r ** -0.5).to(getattr(torch, adt))
                parts = []
                for ring in map(int, a.rings.split(",")):
                    cb.set_shrink_drop_ring(ring)
                    ks = kernel_means(lambda: cb.forward(x, W, None, A, B, 0.5, a.p, 1234, 0), a.calls)
                    total = sum(ks.values())
                    drop = sum(v for k, v in ks.items() if "shrink_drop_kernel" in k)
                    parts.append(f"ring {ring}: {total:7.1f} ({total / fl:.3f}) shrink {drop:5.1f}")
                print(f"{shape} {adt} r={r}: floor {fl:7.1f} us | " + " | ".join(parts), flush=True)
                cb.set_shrink_drop_ring(0)
                ks = kernel_means(lambda: cb.forward(x, W, None, A, B, 0.5, a.p, 1234, 0), a.calls)
                print("   kernels (ring 0): " + ", ".join(f"{short(k)} {v:.1f}" for k, v in
                                                       sorted(ks.items(), key=lambda kv: -kv[1])), flush=True)


if __name__ == "__main__":
    main()
