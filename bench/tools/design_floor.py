"""The GEMM issue's design floor next to our measured ratios, per cell of a targets.py grid.

    python3 bench/tools/design_floor.py targets_8192.json [targets_2048.json ...] [--bw 3.35e12] [--provider ours-cuda]

The design (issue #15) runs the frozen GEMM at cuBLAS's speed and, beside it, bandwidth-bound passes that each read
a large operand once more:
- forward: the shrink reads x (M·K elements) for u = dropout(x) Aᵀ;
- forward+backward: that, plus the backward's dy pass (v = dy B: M·N) and dA (x again: M·K).
Its floor is the measured cuBLAS floor plus those bytes at the HBM peak (`--bw`; default the GPU's datasheet peak
from the file's env: H100 SXM 3.35 TB/s, H200 4.8 TB/s). Philox work, u's products and launch gaps are not counted,
so it is a lower bound of the design. A kernel that reads x once for both the GEMM and the shrink (our fused
forward's split variant at N <= 1024) can go below it.

Prints, per (M, mode, p), each cell's floor time, design floor, our ratio and our ratio over the design floor, then
their geometric means and worst cells (GPU time; bf16 operands, 2 bytes an element).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12}


def peak_bw(env: dict) -> float:
    gpu = str(env.get("gpu", ""))
    for name, bw in PEAK_BW.items():
        if name in gpu:
            return bw
    raise SystemExit(f"no datasheet bandwidth for {gpu!r}: pass --bw")


def extra_bytes(mode: str, M: int, K: int, N: int, elem: int = 2) -> int:
    """The design's reads beyond the GEMM's own: x for the shrink; in fwd_bwd also dy for v and x for dA."""
    return elem * (M * K if mode == "fwd" else 2 * M * K + M * N)


def cells(rows: list, provider: str, bw: float):
    """(M, mode, p) -> [(K, N, r, floor_s, design, ours)] for the provider's rows."""
    out = defaultdict(list)
    for r in rows:
        if r["provider"] != provider:
            continue
        floor_s = r["gpu_ms"] / r["gpu_ratio"] * 1e-3
        design = 1.0 + extra_bytes(r["mode"], r["M"], r["K"], r["N"]) / bw / floor_s
        out[(r["M"], r["mode"], r["p"])].append((r["K"], r["N"], r["r"], floor_s, design, r["gpu_ratio"]))
    return out


def geomean(v):
    return math.exp(sum(math.log(x) for x in v) / len(v))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--bw", type=float, default=None, help="HBM bytes/s (default: the datasheet peak of env's GPU)")
    ap.add_argument("--provider", default="ours-cuda")
    args = ap.parse_args(argv)
    for path in args.files:
        data = json.load(open(path))
        bw = args.bw or peak_bw(data.get("env", {}))
        print(f"{path}: {data.get('env', {}).get('gpu', '?')}, HBM {bw / 1e12:.2f} TB/s")
        for (M, mode, p), cs in sorted(cells(data["rows"], args.provider, bw).items()):
            print(f"\n| M = {M}, {mode}, p = {p} | floor µs | design floor | {args.provider} | ours / design |")
            print("|---|---:|---:|---:|---:|")
            for K, N, r, floor_s, design, ours in cs:
                print(f"| {K}→{N} r = {r} | {floor_s * 1e6:.1f} | {design:.3f} | {ours:.3f} | {ours / design:.3f} |")
            d, o = [c[4] for c in cs], [c[5] for c in cs]
            print(f"| geomean (worst) | | {geomean(d):.3f} ({max(d):.3f}) | {geomean(o):.3f} ({max(o):.3f}) | "
                  f"{geomean([a / b for a, b in zip(o, d)]):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
