"""Probe: the Triton main GEMM variants (pointer-based, TMA persistent with and without warp specialization,
a few tile configs) against cuBLAS at the target shapes. Prints one table; used to pick the design and
configs of the Triton backend.  python bench/gemm_probe.py [--quick]"""
import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from lora_kernels.backends import triton_backend as tb
import triton_tma_gemm as th


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shapes = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (2048, 4096, 4096), (16, 4096, 4096)]
    if args.quick:
        shapes = shapes[:2] + shapes[-1:]
    r, s = 16, 2.0
    configs = [dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
               dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
               dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
               dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3)]
    print(f"{'M':>6} {'K':>6} {'N':>6} {'variant':40s} {'ms':>8} {'TFLOP/s':>8} {'x cuBLAS':>8} {'relerr':>8}")
    for M, K, N in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
        u = s * (x.float() @ A.float().t())
        ref = (x.float() @ W.float().t() + u @ B.float().t())
        flops = 2 * M * N * K
        t0 = bench(lambda: F.linear(x, W))

        def row(name, fn, check=True):
            try:
                out = fn()
                torch.cuda.synchronize()
                e = ((out.float() - ref).norm() / ref.norm()).item() if check else float("nan")
                t = bench(fn)
                print(f"{M:6d} {K:6d} {N:6d} {name:40s} {t:8.4f} {flops / t / 1e9:8.1f} {t / t0:8.3f} {e:8.1e}")
            except Exception as exc:  # report and go on: this is a probe
                print(f"{M:6d} {K:6d} {N:6d} {name:40s} FAILED {type(exc).__name__}: {str(exc)[:200]}")

        print(f"{M:6d} {K:6d} {N:6d} {'cuBLAS F.linear':40s} {t0:8.4f} {flops / t0 / 1e9:8.1f} {1.0:8.3f}")
        row("triton pointer (backend forward)", lambda: tb.forward(x, W, None, A, B, s, 0.0, 0, 0)[0])
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        for cfg, ws in itertools.product(configs if M > 64 else [None], (False, True)):
            name = f"tma ws={int(ws)} " + ("default" if cfg is None else
                                           "{BM}x{BN}x{BK} w{num_warps} s{num_stages}".format(**cfg))
            row(name, lambda cfg=cfg, ws=ws: th.gemm_lora(
                x, W, True, u, u.stride(), B, (B.stride(1), B.stride(0)), None, c, r, 16, 1.0, 0.0, 0, 0,
                (K + 3) // 4, config=cfg, warp_specialize=ws))
        row("triton pointer forward, p=0.1", lambda: tb.forward(x, W, None, A, B, s, 0.1, 1234, 0)[0],
            check=False)


if __name__ == "__main__":
    main()
