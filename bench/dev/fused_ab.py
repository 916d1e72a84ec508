"""GPU time of the cuda backend's forward and of the cuBLAS floor (F.linear) on a few shapes, CUDA events around
`calls` back-to-back calls after a warm-up. For A/B runs of the forward's development switches, one process per
setting (they are read once):

    LORA_KERNELS_FUSED_DEBUG=1 python3 bench/dev/fused_ab.py --tag nowait
"""
import argparse

import torch
import torch.nn.functional as F

from lora_kernels.backends import cuda_backend as cb

ap = argparse.ArgumentParser()
ap.add_argument("--tag", default="")
ap.add_argument("--shapes", default="8192x4096x4096,8192x4096x1024")
ap.add_argument("--r", default="16,64")
ap.add_argument("--calls", type=int, default=20)
ap.add_argument("--trace", action="store_true",
                help="with LORA_KERNELS_FUSED_DEBUG=16: summarise the kernel's per-tile trace (returned in u's place)")
args = ap.parse_args()


def gpu_us(fn, calls):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / calls


def summarise(u, N):
    """Per-tile durations from the trace records: [SM | WG << 16, start, main loop end, end] per tile (m, n), tile
    columns n = 0, 1 the u tiles; the producers' waits for u at record 16384 + tile: [SM, start, end]."""
    nt = (N + 127) // 128 + 2
    rec = u.view(torch.int32).reshape(-1)[: 4 * (16384 + 4096)].reshape(-1, 4).cpu().long() & 0xFFFFFFFF
    tiles = rec[:16384]
    n_idx = torch.arange(16384) % nt
    valid = tiles[:, 3] != 0
    t0 = tiles[valid, 1].min()
    rel = (tiles[:, 1:] - t0).float() / 1e3  # us
    for name, sel in (("u tiles", valid & (n_idx < 2)), ("output tiles", valid & (n_idx >= 2))):
        if sel.any():
            main = rel[sel, 1] - rel[sel, 0]
            epi = rel[sel, 2] - rel[sel, 1]
            print(f"    {name:12s} n={int(sel.sum()):5d}  start..main-end  mean {main.mean():6.2f} us  median "
                  f"{main.median():6.2f}  max {main.max():6.2f};  main-end..end mean {epi.mean():6.2f} us;  "
                  f"first start {rel[sel, 0].min():6.1f}  last end {rel[sel, 2].max():7.1f} us")
    waits = rec[16384:]
    wv = waits[:, 2] != 0
    if wv.any():
        w = (waits[wv, 2] - waits[wv, 1]).float() / 1e3
        print(f"    producer waits for u: n={int(wv.sum())} mean {w.mean():6.2f} us  max {w.max():6.2f}  "
              f"sum {w.sum():8.1f} us")
    sms = tiles[valid, 0] & 0xFFFF
    print(f"    SMs used {len(torch.unique(sms))}, tiles per SM max {torch.bincount(sms).max().item()}")


for shape in args.shapes.split(","):
    M, K, N = map(int, shape.split("x"))
    x = torch.randn(M, K, device="cuda").bfloat16()
    W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
    floor = gpu_us(lambda: F.linear(x, W), args.calls)
    for r in map(int, args.r.split(",")):
        A = torch.randn(r, K, device="cuda") * K ** -0.5
        B = torch.randn(N, r, device="cuda") * r ** -0.5
        t = gpu_us(lambda: cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0), args.calls)
        if args.trace:
            summarise(cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0)[1], N)
        print(f"{args.tag:10s} {shape} r={r}: ours {t:7.1f} us  floor {floor:7.1f} us  ratio {t / floor:.3f}  "
              f"({cb.forward_path(x, W, None, A, B, 0.0).split(' (')[0]})", flush=True)
