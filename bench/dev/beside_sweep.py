"""dA beside the dx GEMM (csrc/dA_sm90.cu, lora_dA_sm90_beside): the cuda backward's GPU time with dA after the GEMM
(mode 0), beside it on the cost model's SMs (-1) and on fixed SM counts, against the floor's dx GEMM (dy @ W).

    python3 bench/dev/beside_sweep.py --M 8192 --modes 0,-1,4,8,12,16,24,32 --out sweep.json

Per cell (shape, r, adapter dtype, p) it prints the GPU time of the backward op (dy pass, pack, dx GEMM, dA and its
reduce) in each mode, the model's SMs, and each mode's largest relative difference from mode 0 in dx, dA and dB
(the dA sums are split differently, so not bit for bit: expect float32 rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "suite"))
from timing import bench_ms  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="8192")
    ap.add_argument("--r", default="16,64")
    ap.add_argument("--p", default="0,0.1")
    ap.add_argument("--adapters", default="float32,bfloat16")
    ap.add_argument("--modes", default="0,-1,4,8,16,24")
    ap.add_argument("--rep-ms", type=float, default=60.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import lora_kernels  # noqa: F401
    from lora_kernels.backends import cuda_backend as cb

    ops = torch.ops.lora_kernels_cuda
    modes = [int(m) for m in args.modes.split(",")]
    rows = []
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for M in [int(v) for v in args.M.split(",")]:
        for K, N in SHAPES:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            W = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
            dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            floor = bench_ms(lambda: dy @ W, rep_ms=args.rep_ms)["gpu_ms"]
            for r in [int(v) for v in args.r.split(",")]:
                for adt in args.adapters.split(","):
                    dt = getattr(torch, adt)
                    A = (torch.randn(r, K, device="cuda") / K ** 0.5).to(dt)
                    B = (torch.randn(N, r, device="cuda") / r ** 0.5).to(dt)
                    for p in [float(v) for v in args.p.split(",")]:
                        _, u = ops.forward(x, W, None, A, B, 2.0, p, 1234, 0)

                        def bwd():
                            return ops.backward(dy, x, W, A, B, u, 2.0, p, 1234, 0, True, True, True)

                        row = {"M": M, "K": K, "N": N, "r": r, "adapters": adt, "p": p, "floor_dx_ms": floor,
                               "model_blocks": cb.dA_beside_blocks(x, W, A, B, p)}
                        ref = None
                        for mode in modes:
                            cb.set_dA_beside(mode)
                            out = bwd()
                            torch.cuda.synchronize()
                            if ref is None:
                                ref = [t.float() for t in out]
                            diff = max(((o.float() - q).abs().max() / q.abs().max().clamp_min(1e-30)).item()
                                       for o, q in zip(out, ref))
                            t = bench_ms(bwd, rep_ms=args.rep_ms)
                            row[f"gpu_ms[{mode}]"] = t["gpu_ms"]
                            row[f"diff[{mode}]"] = diff
                        cb.set_dA_beside(-1)
                        base = row["gpu_ms[0]"]
                        cells = " ".join(f"{m}:{row[f'gpu_ms[{m}]'] * 1e3:7.1f}" for m in modes)
                        best = min(modes, key=lambda m: row[f"gpu_ms[{m}]"])
                        print(f"M={M} {K:>5}->{N:<5} r={r:<3} {adt:8} p={p:<4} floor {floor * 1e3:7.1f} us | {cells}"
                              f" | model {row['model_blocks']:>2} auto/off {row['gpu_ms[-1]'] / base:.3f}"
                              f" best {best} {row[f'gpu_ms[{best}]'] / base:.3f}"
                              f" | maxdiff {max(row[f'diff[{m}]'] for m in modes):.1e}", flush=True)
                        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
