"""A/B of one environment setting (a development switch read once per process) on the targets grid.

    python3 bench/dev/env_ab.py --env LORA_KERNELS_PDL=0 --repeats 2 --out ab.json -- \
        --providers ours-cuda --M 2048,8192 --r 16,64 --p 0 --modes fwd --adapter-dtype bfloat16

Runs bench/suite/targets.py (the arguments after `--`) 2 × repeats times in fresh processes, without the setting (A)
and with it (B) in turn, A first: each process times its cells against the cuBLAS floor of that process, so the
two sides share nothing but the machine, and alternating them spreads the machine's drift over both. Per cell
(mode, M, K, N, r, p, provider) it prints the median GPU-time ratio to the floor over each side's runs, B / A, and
the geometric mean of B / A per (mode, M, provider). `--compare A.json... --vs B.json...` does the same on
targets.py outputs already written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = os.path.join(os.path.dirname(HERE), "suite", "targets.py")
KEY = ("mode", "M", "K", "N", "r", "p", "provider")


def ratios(paths):
    """Per cell, the GPU-time ratios to the floor of the runs in `paths` (targets.py JSON; the floor's rows left out)."""
    out = defaultdict(list)
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        for row in rows:
            if row["provider"] == "cublas-base" or row.get("gpu_ratio") is None:
                continue
            out[tuple(row[k] for k in KEY)].append(float(row["gpu_ratio"]))
    return out


def compare(a_paths, b_paths):
    """Rows (cell, median A, median B, B / A) for the cells both sides have, and per (mode, M, provider) the
    geometric mean of B / A with its cell count."""
    a, b = ratios(a_paths), ratios(b_paths)
    cells = []
    groups = defaultdict(list)
    for key in sorted(set(a) & set(b), key=lambda k: tuple(str(v) for v in k)):
        ma, mb = statistics.median(a[key]), statistics.median(b[key])
        cells.append((key, ma, mb, mb / ma))
        groups[(key[0], key[1], key[6])].append(mb / ma)
    summary = {g: (math.exp(sum(math.log(v) for v in vs) / len(vs)), len(vs)) for g, vs in groups.items()}
    return cells, summary


def report(cells, summary, label_b):
    lines = [f"GPU time / floor, median per side; B = {label_b}",
             f"{'mode':8}{'M':>6}{'K':>7}{'N':>7}{'r':>4}{'p':>5}  {'provider':14}{'A':>8}{'B':>8}{'B/A':>8}"]
    for (mode, M, K, N, r, p, prov), ma, mb, q in cells:
        lines.append(f"{mode:8}{M:>6}{K:>7}{N:>7}{r:>4}{p:>5}  {prov:14}{ma:8.3f}{mb:8.3f}{q:8.3f}")
    for (mode, M, prov), (geo, n) in sorted(summary.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        lines.append(f"geomean B/A  {mode} M={M} {prov}: {geo:.3f} over {n} cells")
    return "\n".join(lines)


def main():
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", help="NAME=VALUE set in B's processes (unset in A's)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per side")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per targets.py process")
    ap.add_argument("--out", help="the A/B as JSON (cells and summary)")
    ap.add_argument("--workdir", default=".", help="where the targets.py outputs go (a_<i>.json, b_<i>.json)")
    ap.add_argument("--compare", nargs="+", help="targets.py outputs of side A (no runs)")
    ap.add_argument("--vs", nargs="+", help="targets.py outputs of side B (with --compare)")
    args = ap.parse_args(argv)
    if args.compare:
        if not args.vs:
            ap.error("--compare needs --vs")
        a_paths, b_paths, label = args.compare, args.vs, "the --vs files"
    else:
        if not args.env or "=" not in args.env:
            ap.error("--env NAME=VALUE is required (or --compare ... --vs ...)")
        name, value = args.env.split("=", 1)
        a_paths, b_paths = [], []
        for i in range(args.repeats):
            for side, paths in (("a", a_paths), ("b", b_paths)):
                env = dict(os.environ)
                env.pop(name, None)
                if side == "b":
                    env[name] = value
                path = os.path.join(args.workdir, f"{side}_{i}.json")
                cmd = [sys.executable, TARGETS, *rest, "--out", path]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                if done.returncode != 0 or not os.path.exists(path):
                    sys.exit(f"targets.py ({side}, run {i}) failed:\n{(done.stdout + done.stderr)[-3000:]}")
                paths.append(path)
        label = args.env
    cells, summary = compare(a_paths, b_paths)
    if not cells:
        sys.exit("no cell in common between the two sides")
    print(report(cells, summary, label))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"b": label, "a_runs": a_paths, "b_runs": b_paths,
                       "cells": [dict(zip(KEY, key), a=ma, b=mb, b_over_a=q) for key, ma, mb, q in cells],
                       "summary": [dict(mode=g[0], M=g[1], provider=g[2], geomean_b_over_a=geo, cells=n)
                                   for g, (geo, n) in summary.items()]}, f, indent=1)


if __name__ == "__main__":
    main()
