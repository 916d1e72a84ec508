"""GPU time of the cuda backend's forward in each fused-forward mode and of the cuBLAS floor (F.linear), CUDA events
around `calls` back-to-back calls after a warm-up, round-robin over `rounds` rounds (floor, then each mode) so that
clock drift over a long run (power limits at the large shapes) reaches every column alike; medians of the rounds.
Modes are switched in-process (cuda_backend.set_fused_forward); development switches (LORA_KERNELS_FUSED_DEBUG) are
read once, so one process per setting:

    python3 bench/dev/fused_ab.py --modes 0,1,2 --r 16,64
    LORA_KERNELS_FUSED_DEBUG=16 python3 bench/dev/fused_ab.py --modes 1 --trace
"""
import argparse

import torch
import torch.nn.functional as F

from lora_kernels.backends import cuda_backend as cb

ap = argparse.ArgumentParser()
ap.add_argument("--tag", default="")
ap.add_argument("--shapes", default="8192x4096x4096,8192x4096x1024")
ap.add_argument("--r", default="16,64")
ap.add_argument("--calls", type=int, default=10)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--modes", default="0,2",
                help="fused-forward modes (set_fused_forward): 0 off, 1 u tiles, 2 lead tiles")
ap.add_argument("--adapter-dtype", default="fp32", choices=("fp32", "bf16"))
ap.add_argument("--p", type=float, default=0.0, help="dropout (mode 1's u tiles mask x; the default mode does not)")
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


def summarise(u, N, lead=0, tile_n=128):
    """Per-tile durations from the trace records: [SM | WG << 16, start, main loop end, end] per tile (m, n), tile
    columns n = 0, 1 the u tiles (unused by the lead-tile kernel), 2 .. 2 + lead - 1 the lead tiles; the producers'
    waits for u at record 16384 + tile: [SM, start, end]."""
    nt = 2 * -(-N // (2 * tile_n)) + 2  # the kernel's tile columns: clusters of 2 tiles of tile_n, then 2 u tiles
    rec = u.view(torch.int32).reshape(-1)[: 4 * (16384 + 4096)].reshape(-1, 4).cpu().long() & 0xFFFFFFFF
    tiles = rec[:16384]
    n_idx = torch.arange(16384) % nt
    valid = tiles[:, 3] != 0
    t0 = tiles[valid, 1].min()
    rel = (tiles[:, 1:] - t0).float() / 1e3  # us
    for name, sel in (("u tiles", valid & (n_idx < 2)), ("lead tiles", valid & (n_idx >= 2) & (n_idx < 2 + lead)),
                      ("output tiles", valid & (n_idx >= 2 + lead))):
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


ADT = torch.float32 if args.adapter_dtype == "fp32" else torch.bfloat16
modes = [int(m) for m in args.modes.split(",")]
for shape in args.shapes.split(","):
    M, K, N = map(int, shape.split("x"))
    x = torch.randn(M, K, device="cuda").bfloat16()
    W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
    for r in map(int, args.r.split(",")):
        A = (torch.randn(r, K, device="cuda") * K ** -0.5).to(ADT)
        B = (torch.randn(N, r, device="cuda") * r ** -0.5).to(ADT)
        if args.trace and M * r < 4 * (16384 + 4096):
            raise SystemExit(f"--trace: u ({M} x {r} fp32) is smaller than the kernel's trace records")
        fns = {"floor": lambda: F.linear(x, W)}
        paths = {}
        for m in modes:
            def run(m=m):
                cb.set_fused_forward(m)
                return cb.forward(x, W, None, A, B, 0.5, args.p, 1234, 0)
            fns[m] = run
            cb.set_fused_forward(m)
            paths[m] = cb.forward_path(x, W, None, A, B, args.p).split(" (")[0]
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times[k].append(gpu_us(fn, args.calls))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        for m in modes:
            if args.trace:
                cb.set_fused_forward(m)
                lead = 0
                if cb.forward_path(x, W, None, A, B, 0.0).startswith("sm90 fused lead"):  # csrc/fused_fwd_sm90.h Split
                    narrow = (-(-r // 8) <= -(-N // 128) and -(-M // 128) * -(-r // 8)
                              <= torch.cuda.get_device_properties(0).multi_processor_count)  # fused_fwd_sm90.cu
                    lead = -(-r // 8) if ADT == torch.float32 or narrow else -(-r // 32)
                # the records land in u's memory, which torch.empty leaves as it was: zero a block of u's size
                # and free it, so that the traced call's u (the caching allocator's same block) starts at zero
                y0, u0 = cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0)[:2]
                u0.zero_()
                del y0, u0
                tile_n = 256 if cb.forward_path(x, W, None, A, B, 0.0).endswith("128x256 cooperative") else 128
                summarise(cb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0)[1], N, lead, tile_n)
            print(f"{args.tag:8s} {shape} r={r} {args.adapter_dtype} p={args.p} mode {m}: ours {med[m]:7.1f} us  floor "
                  f"{med['floor']:7.1f} us  ratio {med[m] / med['floor']:.3f}  ({paths[m]})", flush=True)
