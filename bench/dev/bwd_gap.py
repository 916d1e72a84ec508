"""Device time of each kernel of the cuda backward op (dx, dA, dB at p = 0 and 0.1) against the floor's dy @ W, in
one process. Calls are queued behind a GPU sleep under torch.profiler, so host time never shows; each kernel's mean
over the calls. Kernels that overlap are each counted whole: dA beside the dx GEMM, and a launch started early under
PDL (pdl.cuh: a reduce after the GEMM), whose time includes its wait for the launch before it. Development switches
read once (e.g. LORA_KERNELS_SM90_GEMM_TRIM=0) need one process per setting:

    python3 bench/dev/bwd_gap.py --tag trim --shapes 8192x4096x1024,8192x4096x4096 --r 16,64 --p 0,0.1
"""
import argparse
import os
import sys

import torch

from lora_kernels.backends import cuda_backend as cb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_gap import kernel_means  # noqa: E402


def short(name):
    # the K-extended dx GEMM is the CUTLASS kernel with our mainloop; the other CUTLASS kernel is the dA GEMM (session
    # 61's run labelled both "dxGEMM": there the second one listed is the dA GEMM)
    for key, label in (("KExtendedMainloop", "dxGEMM"), ("GemmUniversal", "dA GEMM"), ("stream_sm90_kernel<0", "dy"),
                       ("stream_sm90_kernel<1", "dA"),
                       ("pack", "pack"), ("reduce", "reduce"), ("keep_bits", "bits"), ("prep", "prep"),
                       ("nvjet", "cublas"), ("gemm", "gemm")):
        if key in name:
            return label
    return name[:40]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="")
    ap.add_argument("--shapes", default="8192x4096x1024,8192x4096x4096")
    ap.add_argument("--r", default="16,64")
    ap.add_argument("--p", default="0")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--adapter-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    adt = getattr(torch, a.adapter_dtype)
    for shape in a.shapes.split(","):
        M, K, N = map(int, shape.split("x"))
        x = torch.randn(M, K, device="cuda").bfloat16()
        W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
        dy = torch.randn(M, N, device="cuda").bfloat16()
        fl = sum(kernel_means(lambda: dy @ W, a.calls).values())
        for r in map(int, a.r.split(",")):
            A = (torch.randn(r, K, device="cuda") * K ** -0.5).to(adt)
            B = (torch.randn(N, r, device="cuda") * r ** -0.5).to(adt)
            for p in map(float, a.p.split(",")):
                _, u = cb.forward(x, W, None, A, B, 0.5, p, 1234, 0)
                ks = kernel_means(lambda: cb.backward(dy, x, W, A, B, u, 0.5, p, 1234, 0, True, True, True), a.calls)
                total = sum(ks.values())
                each = ", ".join(f"{short(k)} {v:.1f}" for k, v in sorted(ks.items(), key=lambda kv: -kv[1]))
                print(f"{a.tag:8s} {shape} r={r} p={p}: floor {fl:7.1f} us | kernels {total:7.1f} us "
                      f"({total / fl:.3f}) [{each}]", flush=True)


if __name__ == "__main__":
    main()
