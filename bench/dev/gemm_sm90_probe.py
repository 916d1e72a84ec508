"""Development probe of the sm_90 LoRA GEMM (csrc/gemm_sm90.*) through its C entry point, without the extension.

    python3 bench/dev/gemm_sm90_probe.py --lib bench/dev/build/libloragemm_sm90.so [--out results.json]

1. Correctness: D = A·op(B) + Ax·op(Bx) + bias on odd and Llama shapes, both layouts, fp16 and bf16, against a
   float64 reference; the error must stay within 2x of torch's same-precision result (F.linear / matmul in the
   same dtype, plus the rank term) and every element must be written (outputs start as NaN).
2. Speed: the plain GEMM (Kx = 0) for each config, swizzle and raster order against cuBLAS (torch) in the same
   run, then the K-extended GEMM (Kx = 64, 192) for the best config, GPU time by CUDA events (median), every
   candidate timed round-robin with cuBLAS so that clock drift falls on all alike. --regime burst times each
   candidate in pairs with cuBLAS after a GPU sleep, as bench/suite/targets.py times the grid (a GPU's clocks after
   an idle spell differ from those under steady load, and so do the configs' ranks).

Config 6 is the probe's own, built only when asked for (CONFIGS="... 6" in build_gemm_capi.sh): config 4's 128 x 256
cooperative tile on CUTLASS's stream-K scheduler instead of the persistent data-parallel one, which splits the K axis
of a partial last wave of tiles across blocks (a workspace of partial tiles, zeroed before each launch; no mask).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics

import torch
import torch.nn.functional as F

CONFIGS = {0: "coop256x128_c12", 1: "ping128x128_c12", 2: "coop128x256_c21", 3: "coop256x128_c21",
           4: "coop128x256_c12", 5: "ping128x128_c21", 6: "streamk128x256_c12"}  # 6: the probe's stream-K (no mask)
DT = {torch.float16: 1, torch.bfloat16: 2}


class Lib:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        f = self.lib.lk_gemm_sm90
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5 + [ctypes.c_void_p]

    def gemm(self, a, b, ax, bx, bias, d, layout, config=-1, swizzle=0, raster=0):
        M, K = a.shape
        N = d.shape[1]
        Kx = ax.shape[1] if ax is not None else 0
        ptr = lambda t: t.data_ptr() if t is not None else None
        rc = self.lib.lk_gemm_sm90(M, N, K, Kx, ptr(a), ptr(b), ptr(ax), ptr(bx), ptr(bias), ptr(d), DT[a.dtype],
                                   layout, config, swizzle, raster, torch.cuda.current_stream().cuda_stream)
        if rc != 0:
            raise RuntimeError(f"lk_gemm_sm90 returned cudaError {rc}")


def op_b(b, layout):  # the (K, N) operand as math sees it
    return b.t() if layout == 0 else b


def check(lib, M, N, K, Kx, layout, dtype, bias_on, config=-1):
    g = torch.Generator(device="cuda").manual_seed(M * 7 + N * 3 + K + Kx + layout)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)
    a = rnd(M, K)
    b = rnd(N, K) if layout == 0 else rnd(K, N)
    ax = rnd(M, Kx) * 0.1 if Kx else None
    bx = (rnd(N, Kx) if layout == 0 else rnd(Kx, N)) if Kx else None
    bias = rnd(N) if bias_on else None
    d = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    lib.gemm(a, b, ax, bx, bias, d, layout, config)
    torch.cuda.synchronize()
    ref = a.double() @ op_b(b, layout).double()
    same = (a @ op_b(b, layout)).float()
    if Kx:
        ref = ref + ax.double() @ op_b(bx, layout).double()
        same = same + (ax @ op_b(bx, layout)).float()
    if bias_on:
        ref = ref + bias.double()
        same = same + bias.float()
    same = same.to(dtype)
    unwritten = int(torch.isnan(d).sum())
    err = ((d.double() - ref).norm() / ref.norm()).item()
    err_same = ((same.double() - ref).norm() / ref.norm()).item()
    ok = unwritten == 0 and err <= 2 * err_same + 1e-6
    return dict(M=M, N=N, K=K, Kx=Kx, layout=layout, dtype=str(dtype), bias=bias_on, config=config, err=err,
                err_torch=err_same, unwritten=unwritten, ok=ok)


def interleaved_us(fns: dict, reps: int) -> dict:
    """GPU time (median, us) of each callable, measured round-robin so that clock and thermal drift over the run
    fall on every candidate alike (cuBLAS included)."""
    for fn in fns.values():
        fn()
        fn()
    ev = {k: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
          for k in fns}
    for i in range(reps):
        for k, fn in fns.items():
            ev[k][i][0].record()
            fn()
            ev[k][i][1].record()
    torch.cuda.synchronize()
    return {k: statistics.median(s.elapsed_time(e) for s, e in v) * 1e3 for k, v in ev.items()}


def burst_ratios(cublas, fns: dict, rounds: int, sleep_cycles: int = 8_000_000) -> dict:
    """cuBLAS's GPU time over each candidate's (median of per-round ratios; > 1: the candidate is faster), timed in
    the targets grid's burst regime (bench/suite/targets.py): each round is a GPU sleep (an idle spell's clocks; it
    also covers the host's enqueue), one untimed cuBLAS call, then cuBLAS and the candidate back to back between
    events, their order alternating between rounds."""
    out = {}
    for k, fn in fns.items():
        fn()
        ratios = []
        for i in range(rounds):
            torch.cuda.synchronize()
            torch.cuda._sleep(sleep_cycles)
            cublas()
            order = (cublas, fn) if i % 2 == 0 else (fn, cublas)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in order]
            for (s, e), f in zip(ev, order):
                s.record()
                f()
                e.record()
            torch.cuda.synchronize()
            t = [s.elapsed_time(e) for s, e in ev]
            ratios.append(t[0] / t[1] if i % 2 == 0 else t[1] / t[0])
        out[k] = statistics.median(ratios)
    return out


def bench_shape_burst(lib, M, N, K, layout, dtype, configs, swizzles, rasters, kxs, rounds):
    """Every (config, swizzle, raster) against cuBLAS in the burst regime; then the best one and the auto pick with
    the K extension (Kx columns), also in bursts."""
    mk = lambda *s: torch.randn(*s, device="cuda").to(dtype)
    a = mk(M, K)
    b = mk(N, K) if layout == 0 else mk(K, N)
    d = torch.empty(M, N, device="cuda", dtype=dtype)
    cublas = (lambda: F.linear(a, b)) if layout == 0 else (lambda: torch.mm(a, b))

    def ours(c, sw, ra, ax=None, bx=None):
        return lambda: lib.gemm(a, b, ax, bx, None, d, layout, c, sw, ra)

    cands = {}
    for c in configs:
        for sw in swizzles:
            for ra in rasters:
                try:
                    ours(c, sw, ra)()
                except RuntimeError:
                    continue
                cands[(c, sw, ra)] = ours(c, sw, ra)
    try:  # the pick's config may not be in this library (built with a CONFIGS subset): then no auto column
        ours(-1, 0, 0)()
        auto = {"auto": ours(-1, 0, 0)}
    except RuntimeError:
        auto = {}
    r = burst_ratios(cublas, {**auto, **cands}, rounds)
    best = max(cands, key=lambda k: r[k])
    per_config = {CONFIGS[c]: max((v for k, v in r.items() if k != "auto" and k[0] == c), default=None)
                  for c in configs}
    ext = []
    for kx in kxs:
        ax = mk(M, kx)
        bx = mk(N, kx) if layout == 0 else mk(kx, N)
        re = burst_ratios(cublas, {"ext_best": ours(*best, ax, bx),
                                   **({"ext_auto": ours(-1, 0, 0, ax, bx)} if auto else {})}, rounds)
        ext.append(dict(Kx=kx, **re))
    return dict(M=M, N=N, K=K, layout=layout, dtype=str(dtype), regime="burst", auto=r.get("auto"),
                best=dict(config=CONFIGS[best[0]], config_id=best[0], swizzle=best[1], raster=best[2], ratio=r[best]),
                per_config=per_config,
                all={f"{CONFIGS[k[0]]}/sw{k[1]}/r{k[2]}": v for k, v in r.items() if k != "auto"}, ext=ext)


def bench_shape(lib, M, N, K, layout, dtype, configs, swizzles, rasters, kxs):
    mk = lambda *s: torch.randn(*s, device="cuda").to(dtype)
    a = mk(M, K)
    b = mk(N, K) if layout == 0 else mk(K, N)
    d = torch.empty(M, N, device="cuda", dtype=dtype)
    cublas = (lambda: F.linear(a, b)) if layout == 0 else (lambda: torch.mm(a, b))

    def ours(c, sw, ra, ax=None, bx=None):
        return lambda: lib.gemm(a, b, ax, bx, None, d, layout, c, sw, ra)

    # Round 1: every candidate once per rep, few reps.
    cands = {}
    for c in configs:
        for sw in swizzles:
            for ra in rasters:
                try:
                    ours(c, sw, ra)()
                except RuntimeError:
                    continue
                cands[(c, sw, ra)] = ours(c, sw, ra)
    t1 = interleaved_us({"cublas": cublas, **cands}, reps=8)
    top = sorted((k for k in cands), key=lambda k: t1[k])[:4]
    # Round 2: the four best, the auto pick and cuBLAS, more reps.
    t2 = interleaved_us({"cublas": cublas, "auto": ours(-1, 0, 0), **{k: cands[k] for k in top}}, reps=30)
    best = min(top, key=lambda k: t2[k])
    floor = t2["cublas"]
    ext = []
    for kx in kxs:
        ax = mk(M, kx)
        bx = mk(N, kx) if layout == 0 else mk(kx, N)
        t3 = interleaved_us({"cublas": cublas, "plain": cands[best], "ext": ours(*best, ax, bx),
                             "ext_auto": ours(-1, 0, 0, ax, bx)}, reps=20)
        ext.append(dict(Kx=kx, plain_ratio=t3["plain"] / t3["cublas"], ext_ratio=t3["ext"] / t3["cublas"],
                        ext_auto_ratio=t3["ext_auto"] / t3["cublas"]))
    flops = 2 * M * N * K
    return dict(M=M, N=N, K=K, layout=layout, dtype=str(dtype), cublas_us=floor, cublas_tflops=flops / floor / 1e6,
                auto_us=t2["auto"], auto_vs_cublas=floor / t2["auto"],
                best=dict(us=t2[best], config=CONFIGS[best[0]], config_id=best[0], swizzle=best[1], raster=best[2],
                          vs_cublas=floor / t2[best]),
                round1={f"{CONFIGS[k[0]]}/sw{k[1]}/r{k[2]}": floor_r / t1[k] for k in cands
                        for floor_r in (t1["cublas"],)},
                ext=ext)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layouts", default="0,1", help="0: the forward (B as N x K), 1: dx (B as K x N)")
    ap.add_argument("--no-checks", action="store_true", help="timing only (the library's configs were checked before)")
    ap.add_argument("--regime", default="steady", choices=["steady", "burst", "both"],
                    help="steady: candidates back to back (a GPU under load); burst: each pair after a GPU sleep, "
                         "as the targets grid times them")
    ap.add_argument("--configs", default="0,1,2,3,4,5",
                    help="GemmConfig ids to time (those the library has; 6: config 4's tile on stream-K)")
    ap.add_argument("--Ms", default="8192,2048")
    ap.add_argument("--rounds", type=int, default=15, help="burst rounds per candidate")
    ap.add_argument("--dtypes", default="bf16", help="dtypes timed: bf16, fp16 or both (bf16,fp16)")
    args = ap.parse_args()
    lib = Lib(args.lib)
    print("device", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": [], "bench": []}

    fails = 0
    cases = [(1, 8, 64, 0), (1, 136, 72, 64), (7, 136, 200, 64), (300, 264, 4096, 192), (257, 1024, 520, 128),
             (2048, 4096, 4096, 64), (513, 14336, 128, 64)]
    layouts = tuple(int(v) for v in args.layouts.split(","))
    for dtype in (() if args.no_checks else (torch.bfloat16, torch.float16)):
        for layout in layouts:
            for (M, N, K, Kx) in cases:
                for bias_on in ((False, True) if layout == 0 else (False,)):
                    for config in (-1, 0, 1, 2, 3, 4, 5, 6) if (M, N) == (300, 264) else (-1, 1, 6):
                        try:
                            r = check(lib, M, N, K, Kx, layout, dtype, bias_on, config)
                        except RuntimeError as e:  # a (dtype, layout, config) the library was built without
                            if "cudaError 801" not in str(e):
                                raise
                            continue
                        out["checks"].append(r)
                        if not r["ok"]:
                            fails += 1
                            print("CHECK FAIL", r, flush=True)
    print(f"checks: {len(out['checks']) - fails} ok, {fails} failed", flush=True)

    shapes = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N) of the forward
    Ms = tuple(int(v) for v in args.Ms.split(","))
    configs, swizzles, rasters = tuple(int(c) for c in args.configs.split(",")), (1, 2, 4, 8), (1, 2)
    if args.quick:
        swizzles, rasters = (1, 4), (0,)
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16}[d] for d in args.dtypes.split(",")]
    for dtype, M in ((d, m) for d in dtypes for m in Ms) if args.regime != "steady" else ():
        for (K, N) in shapes:
            for layout in layouts:
                n_, k_ = (N, K) if layout == 0 else (K, N)
                r = bench_shape_burst(lib, M, n_, k_, layout, dtype, configs, (1, 4), (1, 2), (64,), args.rounds)
                out["bench"].append(r)
                b = r["best"]
                pc = " ".join(f"{k}:{v:.3f}" for k, v in r["per_config"].items() if v is not None)
                f3 = lambda v: "n/a" if v is None else f"{v:.3f}"  # n/a: the pick's config is not built
                ext = " ".join(f"Kx{e['Kx']} best {e['ext_best']:.3f} auto {f3(e.get('ext_auto'))}" for e in r["ext"])
                print(f"burst {str(dtype)[6:]} M={M} {k_}->{n_} {'fwd' if layout == 0 else 'dx '} cublas/ours: auto {f3(r['auto'])} "
                      f"best {b['ratio']:.3f} [{b['config']} sw{b['swizzle']} r{b['raster']}] | {pc} | {ext}",
                      flush=True)
    for dtype, M in ((d, m) for d in dtypes for m in Ms) if args.regime != "burst" else ():
        for (K, N) in shapes:
            for layout in layouts:
                if layout == 1:  # backward dx = dy W: (M, N) x (N, K) -> (M, K)
                    r = bench_shape(lib, M, K, N, 1, dtype, configs, swizzles, rasters, (64, 192))
                else:
                    r = bench_shape(lib, M, N, K, 0, dtype, configs, swizzles, rasters, (64, 192))
                out["bench"].append(r)
                b = r["best"]
                ext = " ".join(f"Kx{e['Kx']}:{e['ext_ratio']:.3f}(plain {e['plain_ratio']:.3f}, auto {e['ext_auto_ratio']:.3f})"
                               for e in r["ext"])
                print(f"{str(dtype)[6:]} M={M} {r['K']}->{r['N']} {'fwd' if layout == 0 else 'dx '} cublas {r['cublas_us']:.1f}us "
                      f"({r['cublas_tflops']:.0f} TF) auto {r['auto_vs_cublas']:.3f}x best {b['vs_cublas']:.3f}x "
                      f"[{b['config']} sw{b['swizzle']} r{b['raster']}] | time/cublas {ext}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
