"""The GEMM issue's target grid, timed side by side: every provider of a group is measured round-robin with the
cuBLAS floor, and each ratio is the median of per-round ratios, so that clock and power drift over the run (which
moved single measurements of the same kernel by 10-15% on the H200) fall on the floor and the provider alike.

    python3 bench/suite/targets.py --providers ours-cuda,lorafusion --out results.json [--M 2048,8192] [--rounds 15]

GPU time: each round queues a GPU sleep (long enough for the host to enqueue the whole round), one untimed call,
then one call per provider with CUDA events around each, back to back, the providers' order rotating between rounds.
The sleep keeps the host's enqueue time out of the events; the untimed call brings the clocks up, so that no
provider is timed first after the GPU idled (the first call after an idle GPU ran up to 25% slower on the H200: the
floor at 8192x4096->4096 0.415-0.456 ms against 0.364 ms back to back, which, when the floor went first after each
round's synchronize, biased the ratios in our favour). With --gpu-batch n, events around n calls of one provider
queued behind a sleep and an untimed call, per call (for small M, where one call is short). Wall time: a host clock
around `calls` back-to-back calls with a synchronize at both ends, per call. --regime sustained replaces each round's
sleep by 50 ms of the floor's own calls: the round then runs at the clocks of a GPU under steady load (power-capped,
as in a training run), where the H200 ran cuBLAS's 8192x4096->4096 GEMM at 0.42 ms against 0.34 ms after an idle
spell (eleventh session). Each group prints one line per
provider: wall and GPU time with their ratios to the floor. The summary gives geometric means and worst cases by
(mode, M) per provider.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from providers import FLOOR, Unavailable, make_case  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N): the Llama-3-8B layer shapes


def gpu_round(fns: dict, i, sleep_cycles, heat=None):
    """One round of single-call GPU times: a sleep, an untimed call, then each provider's call between events, in
    an order rotated by i. Returns {provider: (start, end)} and whether the sleep outlasted the host's enqueue.
    heat: (fn, n) in place of the sleep: n back-to-back calls of fn (the floor), so that the round runs at the clocks
    of a GPU under sustained load rather than after an idle spell (--regime sustained)."""
    keys = list(fns)
    keys = keys[i % len(keys):] + keys[:i % len(keys)]
    torch.cuda.synchronize()
    if heat is None:
        torch.cuda._sleep(sleep_cycles)
    else:
        for _ in range(heat[1]):
            heat[0]()
    woke = torch.cuda.Event()
    woke.record()
    warm = fns[keys[-1]]
    warm[(i + 1) % len(warm)]()
    evs = {}
    for k in keys:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fns[k][i % len(fns[k])]()
        e.record()
        evs[k] = (s, e)
    return evs, not woke.query()


def gpu_batch_round(fns, i, n, sleep_cycles):
    """Events around n back-to-back calls queued behind a GPU sleep: GPU time without the host's enqueue time
    (which a single call's events include when the host is slower than the GPU, as at small M). Returns the event
    pair and an event recorded right after the sleep, to check that the sleep outlasted the host's enqueue."""
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    woke, s, e = torch.cuda.Event(), torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    woke.record()
    fns[(i + n) % len(fns)]()  # untimed: the clocks up before the timed calls
    s.record()
    for j in range(n):
        fns[(i + j) % len(fns)]()
    e.record()
    return s, e, not woke.query()


def wall_round(fns, calls):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e3


def heat_calls(fn, ms: float) -> int:
    """How many back-to-back calls of fn keep the GPU busy for about `ms` milliseconds."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        fn()
    e.record()
    torch.cuda.synchronize()
    return max(1, math.ceil(ms / (s.elapsed_time(e) / 5)))


def measure_group(cases: dict, mode: str, rounds: int, calls: int, gpu_batch: int = 0,
                  regime: str = "burst") -> dict:
    fns = {k: getattr(c, mode) for k, c in cases.items()}
    isolated = {k: 0 for k in fns}
    for f in fns.values():  # warm-up (compiles, autotunes, allocator)
        for i in range(3):
            f[i % len(f)]()
    torch.cuda.synchronize()
    gpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    heat = (fns[FLOOR][0], heat_calls(fns[FLOOR][0], 50.0)) if regime == "sustained" and gpu_batch <= 0 else None
    for rnd in range(rounds):
        if gpu_batch > 0:  # 2 ms of sleep per call: more than any provider's host time per call
            for k, f in fns.items():
                s, e, ok = gpu_batch_round(f, rnd, gpu_batch, gpu_batch * 4_000_000)
                torch.cuda.synchronize()
                gpu[k].append(s.elapsed_time(e) / gpu_batch)
                isolated[k] += ok
            for k, f in fns.items():
                wall[k].append(wall_round(f, calls))
            continue
        # sleep: 4 ms per provider, more than any provider's host time per call at these sizes; sustained: 50 ms
        # of the floor's calls instead (the host enqueues the round meanwhile)
        evs, ok = gpu_round(fns, rnd, len(fns) * 8_000_000, heat)
        torch.cuda.synchronize()
        for k, (s, e) in evs.items():
            gpu[k].append(s.elapsed_time(e))
            isolated[k] += ok
        for k, f in fns.items():
            wall[k].append(wall_round(f, calls))
    out = {}
    for k in fns:
        out[k] = dict(gpu_ms=statistics.median(gpu[k]), wall_ms=statistics.median(wall[k]),
                      gpu_ratio=statistics.median(a / b for a, b in zip(gpu[k], gpu[FLOOR])),
                      wall_ratio=statistics.median(a / b for a, b in zip(wall[k], wall[FLOOR])))
        out[k]["gpu_batch"] = gpu_batch
        out[k]["gpu_isolated_rounds"] = isolated[k]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--providers", default="ours-cuda,lorafusion")
    ap.add_argument("--M", default="2048,8192")
    ap.add_argument("--r", default="16,64")
    ap.add_argument("--p", default="0,0.1")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--shapes", default=None, help="KxN,... (default: the four Llama-3-8B layer shapes)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--gpu-batch", type=int, default=0,
                    help="GPU time from events around this many calls queued behind a GPU sleep (host enqueue time "
                         "excluded: for small M, where one call's events would include it); 0: one call's events")
    ap.add_argument("--regime", default="burst", choices=["burst", "sustained"],
                    help="burst: each round after a GPU sleep (clocks of a GPU that was idle, then one untimed call); "
                         "sustained: each round after 50 ms of the floor's GEMMs (the clocks and power state of a GPU "
                         "under steady load, as in training)")
    ap.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="lora_A/lora_B dtype of the ours-* providers (float32: PEFT's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    provs = [p for p in args.providers.split(",") if p and p != FLOOR]
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "regime": args.regime}
    for mod in ("triton", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    print(env, flush=True)
    rows = []
    for M in [int(v) for v in args.M.split(",")]:
        for (K, N) in shapes:
            for r in [int(v) for v in args.r.split(",")]:
                for p in [float(v) for v in args.p.split(",")]:
                    cases = {}
                    for prov in [FLOOR] + provs:
                        try:
                            cases[prov] = make_case(prov, M, K, N, r, p, dtype=torch.bfloat16, device="cuda",
                                                    n_sets=2, adapter_dtype=getattr(torch, args.adapter_dtype))
                        except Unavailable as e:
                            print(f"  {prov} unavailable: {e}", flush=True)
                    for mode in args.modes.split(","):
                        res = measure_group(cases, mode, args.rounds, args.calls, args.gpu_batch, args.regime)
                        for prov, v in res.items():
                            rows.append(dict(mode=mode, M=M, K=K, N=N, r=r, p=p, provider=prov,
                                             note=cases[prov].note, **v))
                            if prov != FLOOR:
                                print(f"{mode:7s} M={M:5d} {K:5d}->{N:5d} r={r:2d} p={p:.1f} {prov:12s} "
                                      f"wall {v['wall_ms']:.4f} ms ({v['wall_ratio']:.3f}x)  "
                                      f"GPU {v['gpu_ms']:.4f} ms ({v['gpu_ratio']:.3f}x)", flush=True)
                    del cases
                    torch.cuda.empty_cache()
    summary = []
    for mode in args.modes.split(","):
        for M in sorted({r["M"] for r in rows}):
            for prov in provs:
                sel = [r for r in rows if r["mode"] == mode and r["M"] == M and r["provider"] == prov]
                if not sel:
                    continue
                g = lambda key: math.exp(sum(math.log(r[key]) for r in sel) / len(sel))
                summary.append(dict(mode=mode, M=M, provider=prov, groups=len(sel),
                                    gpu_geo=g("gpu_ratio"), gpu_worst=max(r["gpu_ratio"] for r in sel),
                                    wall_geo=g("wall_ratio"), wall_worst=max(r["wall_ratio"] for r in sel)))
    print("\n| mode | M | provider | GPU geomean | GPU worst | wall geomean | wall worst | groups |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for s in summary:
        if "gpu_geo" not in s:
            continue
        print(f"| {s['mode']} | {s['M']} | {s['provider']} | {s['gpu_geo']:.3f} | {s['gpu_worst']:.3f} | "
              f"{s['wall_geo']:.3f} | {s['wall_worst']:.3f} | {s['groups']} |")
    # Head to head: how much faster each of our providers is than each peer, group by group (GPU and wall).
    ours = [p for p in provs if p.startswith("ours-")]
    peers = [p for p in provs if not p.startswith("ours-")]
    for mode in args.modes.split(","):
        for M in sorted({r["M"] for r in rows}):
            for o in ours:
                for peer in peers:
                    pairs = []
                    for r in rows:
                        if r["mode"] == mode and r["M"] == M and r["provider"] == o:
                            q = [x for x in rows if x["provider"] == peer and all(
                                x[k] == r[k] for k in ("mode", "M", "K", "N", "r", "p"))]
                            if q:
                                pairs.append((q[0]["gpu_ratio"] / r["gpu_ratio"], q[0]["wall_ratio"] / r["wall_ratio"]))
                    if pairs:
                        geo = [math.exp(sum(math.log(v[i]) for v in pairs) / len(pairs)) for i in (0, 1)]
                        worst = [min(v[i] for v in pairs) for i in (0, 1)]
                        summary.append(dict(mode=mode, M=M, provider=f"{o} vs {peer}", groups=len(pairs),
                                            speedup_gpu_geo=geo[0], speedup_gpu_worst=worst[0],
                                            speedup_wall_geo=geo[1], speedup_wall_worst=worst[1]))
                        print(f"{mode} M={M}: {o} is {geo[0]:.3f}x faster than {peer} in GPU time (worst group "
                              f"{worst[0]:.3f}x), {geo[1]:.3f}x in wall time (worst {worst[1]:.3f}x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
