"""The forward with dropout: the shrink that makes its mask itself (csrc/shrink_drop.cu, "on") against the keep-bits
pass plus the shrink that reads them ("off", set_shrink_drop(0)), in one process, alternating; "on" is forced
(set_shrink_drop(1)) in every cell, whether or not the default takes it there.

    python3 bench/dev/shrink_drop_ab.py --M 8192 --out ab.json

Per cell (shape, r, adapter dtype) it prints the cuda forward's GPU time (bench_ms' gpu_ms: calls queued behind a GPU
sleep) in each mode against the floor (x @ Wᵀ), and, from one profiled call per mode, the GPU time of the kernels
that make u (the keep bits and the shrink: on, the one kernel). Run it with LORA_KERNELS_SHRINK_DROP_ROWS=16 or 32
for the kernel's two row blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "suite"))
from timing import bench_ms  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
# the kernels of u: the keep bits, the shrinks (the sm_90 one is the forward's only stream_sm90_kernel) and their preps
U_KERNELS = ("shrink", "keep_bits", "dy_sm90_prep", "stream_sm90")


def u_kernels_us(fn):
    """GPU µs of the kernels that make u in one call of fn (torch.profiler), and their names."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total, names = 0.0, []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and any(k in ev.name for k in U_KERNELS):
            total += ev.device_time
            names.append(ev.name.split("<")[0].split("(")[0][-40:])
    return total, sorted(set(names))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="8192")
    ap.add_argument("--r", default="16,32,64")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--adapters", default="bfloat16,float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=float, default=25.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import lora_kernels  # noqa: F401
    from lora_kernels.backends import cuda_backend as cb

    ops = torch.ops.lora_kernels_cuda
    rows = []
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "rows",
          os.environ.get("LORA_KERNELS_SHRINK_DROP_ROWS", "default"))
    for M in [int(v) for v in args.M.split(",")]:
        for K, N in SHAPES:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            W = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
            floor = bench_ms(lambda: x @ W.t(), rep_ms=args.rep_ms)["gpu_ms"]
            for r in [int(v) for v in args.r.split(",")]:
                for adt in args.adapters.split(","):
                    dt = getattr(torch, adt)
                    A = (torch.randn(r, K, device="cuda") / K ** 0.5).to(dt)
                    B = (torch.randn(N, r, device="cuda") / r ** 0.5).to(dt)

                    def fwd():
                        return ops.forward(x, W, None, A, B, 2.0, args.p, 1234, 0, None)

                    times = {"on": [], "off": []}
                    u_us, names, outs = {}, {}, {}
                    for _ in range(args.rounds):
                        for mode in ("on", "off"):
                            cb.set_shrink_drop(1 if mode == "on" else 0)
                            times[mode].append(bench_ms(fwd, rep_ms=args.rep_ms)["gpu_ms"])
                    for mode in ("on", "off"):
                        cb.set_shrink_drop(1 if mode == "on" else 0)
                        u_us[mode], names[mode] = u_kernels_us(fwd)
                        outs[mode] = fwd()
                    cb.set_shrink_drop(-1)
                    on, off = statistics.median(times["on"]), statistics.median(times["off"])
                    du = (outs["on"][1] - outs["off"][1]).abs().max().item()
                    scale = outs["off"][1].abs().max().item()
                    row = {"M": M, "K": K, "N": N, "r": r, "adapters": adt, "p": args.p, "floor_ms": floor,
                           "fwd_on_ms": on, "fwd_off_ms": off, "u_on_us": u_us["on"], "u_off_us": u_us["off"],
                           "u_kernels_on": names["on"], "u_kernels_off": names["off"],
                           "u_max_rel_diff": du / max(scale, 1e-30)}
                    rows.append(row)
                    print(f"M={M} {K}->{N} r={r} {adt:8s} floor {floor * 1e3:7.1f} us | fwd on {on * 1e3:7.1f} "
                          f"({on / floor:.3f}) off {off * 1e3:7.1f} ({off / floor:.3f}) on/off {on / off:.3f} | "
                          f"u kernels on {u_us['on']:6.1f} off {u_us['off']:6.1f} us | u rel diff {row['u_max_rel_diff']:.1e}",
                          flush=True)
    if rows:
        g = statistics.geometric_mean([r["fwd_on_ms"] / r["fwd_off_ms"] for r in rows])
        print(f"geomean fwd on/off {g:.4f} over {len(rows)} cells")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
