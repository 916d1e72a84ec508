"""Markdown table + PNG plot from a pytest-benchmark JSON written by bench/suite/test_bench_lora.py.

    python3 bench/tools/make_table.py bench.json --out outdir/      # -> outdir/bench_table.md, outdir/bench_ratio.png
    python3 bench/tools/make_table.py shard0.json shard1.json --out outdir/   # shards of one grid (--shard i/n)

Reads only ``extra_info`` of each benchmark (our CUDA-event medians), not pytest-benchmark's wall clock.
Columns per (shape, M, r, p, mode) group: time ms, TFLOP/s, ratio to the cuBLAS floor (cublas-base: F.linear
for fwd; F.linear + dy@W for fwd_bwd), speed-up vs the PEFT layer (peft_ms / ms), and for fwd_bwd the peak
memory above baseline and the bytes saved for backward.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict

ORDER = ["ours-cuda", "ours-triton", "ours-torch", "compile-formula", "formula-bf16", "addmm", "peft-layer",
         "cublas-base"]
FLOOR = "cublas-base"
ORDER[ORDER.index("peft-layer"):ORDER.index("peft-layer")] = ["ours-dora-cuda", "ours-dora-triton",
                                                              "ours-dora-cuda-recompute", "ours-dora-triton-recompute",
                                                              "ours-dora-cuda-savez", "ours-dora-triton-savez",
                                                              "ours-dora-torch", "peft-dora"]


def _peft_ref(prov: str) -> str:
    """The PEFT provider a row's `vs PEFT` compares with: PEFT's DoRA layer for the DoRA providers."""
    return "peft-dora" if prov.startswith("ours-dora-") or prov == "peft-dora" else "peft-layer"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _mib(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def load(path):
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):  # written line by line by test_bench_lora.py --jsonl (survives a cut run)
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = [r for r in rows if "median_ms" in r]
        env = {k[4:]: v for k, v in rows[0].items() if k.startswith("env_")} if rows else {}
        return rows, env
    data = json.loads(text) if text.strip() else {}  # pytest-benchmark leaves it empty when all skipped
    rows = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
    rows = [r for r in rows if "median_ms" in r]
    env = dict((data.get("machine_info") or {}).get("lora_bench") or {})
    if not env and rows:
        env = {k[4:]: v for k, v in rows[0].items() if k.startswith("env_")}
    env.setdefault("json_datetime", data.get("datetime"))
    return rows, env


def load_many(paths):
    """Rows of several JSON files (shards of one grid, e.g. from separate device calls) and the first file's
    environment; the header then lists every run's date and GPU so that mixed runs are visible."""
    rows, envs = [], []
    for path in paths:
        r, e = load(path)
        rows += r
        envs.append(e)
    env = dict(envs[0]) if envs else {}
    if len(envs) > 1:
        env["date"] = ", ".join(str(e.get("date")) for e in envs)
        gpus = sorted({str(e.get("gpu")) for e in envs})
        env["gpu"] = gpus[0] if len(gpus) == 1 else " + ".join(gpus)
    return rows, env


def group_rows(rows):
    groups = defaultdict(dict)
    for r in rows:
        key = (r["mode"], r["shape"], int(r["M"]), int(r["r"]), float(r["p"]))
        groups[key][r["provider"]] = r
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], [int(x) for x in kv[0][1].split("->")],
                                                        kv[0][2], kv[0][3], kv[0][4])))


def _prov_order(provs):
    return sorted(provs, key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))


def header(env):
    return (f"GPU: {env.get('gpu')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | triton "
            f"{env.get('triton')} | peft {env.get('peft')} | transformers {env.get('transformers')} | "
            f"lora_kernels {env.get('lora_kernels')} (backends {env.get('backends')}) | date {env.get('date')}")


def _gm(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _summaries(groups):
    """{(mode, provider, M or None for all M): {"ratio", "gpu", "vs": [values]}} over the groups."""
    summ = defaultdict(lambda: defaultdict(list))
    for (mode, _shape, M, _r, _p), g in groups.items():
        for prov, r in g.items():
            peft = g.get(_peft_ref(prov), {}).get("median_ms")
            for key in ((mode, prov, None), (mode, prov, M)):
                if r.get("ratio_to_floor"):
                    summ[key]["ratio"].append(r["ratio_to_floor"])
                if r.get("gpu_ratio_to_floor") and (r.get("gpu_hidden_frac") or 1.0) >= 0.5:  # most reps hidden
                    summ[key]["gpu"].append(r["gpu_ratio_to_floor"])
                if peft and r.get("median_ms"):
                    summ[key]["vs"].append(peft / r["median_ms"])
    return summ


def markdown(rows, env):
    groups = group_rows(rows)
    out = ["# LoRA layer benchmark", "", header(env), "",
           "Times are CUDA-event medians (bf16 activations/weights). `ratio` = time / cuBLAS floor "
           "(fwd: F.linear(x, W); fwd_bwd: F.linear(x, W) + dy @ W). Two times per call: `wall` times "
           "back-to-back calls (a host-bound call shows its host time: Python, autograd, launches); `GPU` "
           "queues each call behind a GPU sleep longer than its host time, so only the GPU's execution of the "
           "call is timed (the cost inside a model that keeps the GPU busy; compare it with the roofline). "
           "`GPU ok` = no rep's host enqueue outlasted its sleep; a row where most reps' did stays out of the GPU "
           "means. `vs PEFT` = PEFT-layer wall time / wall time (DoRA rows: PEFT's DoRA layer, peft-dora) "
           "(>1 is faster than PEFT). TFLOP/s counts the LoRA layer's FLOPs (the floor: its own GEMM FLOPs). "
           "`addmm` applies no dropout. Memory columns (fwd_bwd): peak allocated above baseline during one "
           "fwd+bwd with the caller's dy, the same with dy made by autograd (the grad of (y ⊙ dy).sum(), as "
           "in a network, y still held: one more M×N for every provider, and a layer may reuse it), and bytes "
           "saved for backward (x included; parameters excluded).", ""]
    summ = _summaries(groups)
    if summ:
        out += ["## Summary (geometric means over all groups)", "",
                "| mode | provider | wall ratio to floor | GPU ratio to floor | speed-up vs PEFT (wall) | groups |",
                "|---|---|---:|---:|---:|---:|"]
        for mode in sorted({m for m, _, _ in summ}):
            for prov in _prov_order({p for m, p, _ in summ if m == mode}):
                d = summ[(mode, prov, None)]
                out.append(f"| {mode} | {prov} | {_fmt(_gm(d['ratio']), '.3f')} | {_fmt(_gm(d['gpu']), '.3f')} | "
                           f"{_fmt(_gm(d['vs']), '.2f')} | {len(d['ratio'])} |")
        out.append("")
        ms = sorted({M for _, _, M in summ if M is not None})
        if len(ms) > 1:
            out += ["## Summary by M (geometric means over shapes, r and p; each cell wall / GPU ratio to floor)",
                    "", "| mode | provider | " + " | ".join(f"M={M}" for M in ms) + " |",
                    "|---|---|" + "---:|" * len(ms)]
            for mode in sorted({m for m, _, _ in summ}):
                for prov in _prov_order({p for m, p, _ in summ if m == mode}):
                    cells = []
                    for M in ms:
                        d = summ.get((mode, prov, M))
                        cells.append(f"{_fmt(_gm(d['ratio']), '.2f')} / {_fmt(_gm(d['gpu']), '.2f')}" if d else "-")
                    out.append(f"| {mode} | {prov} | " + " | ".join(cells) + " |")
            out.append("")
    out += ["## Per group", ""]
    for (mode, shape, M, r, p), g in groups.items():
        out += [f"### {mode} | {shape} | M={M} | r={r} | p={p}", "",
                "| provider | wall ms | TFLOP/s | wall ratio | GPU ms | GPU ratio | GPU ok | vs PEFT | peak MiB | "
                "peak MiB, autograd dy | saved MiB | note |",
                "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
        for prov in _prov_order(g):
            x = g[prov]
            peft = g.get(_peft_ref(prov), {}).get("median_ms")
            vs = peft / x["median_ms"] if peft and x.get("median_ms") else None
            ok = {True: "yes", False: "no"}.get(x.get("gpu_hidden_ok"), "-")
            if x.get("gpu_hidden_ok") is False and x.get("gpu_hidden_frac") is not None:
                ok = f"{x['gpu_hidden_frac']:.0%}"
            out.append(f"| {prov} | {_fmt(x.get('median_ms'), '.4f')} | {_fmt(x.get('tflops'), '.1f')} | "
                       f"{_fmt(x.get('ratio_to_floor'), '.3f')} | {_fmt(x.get('gpu_ms'), '.4f')} | "
                       f"{_fmt(x.get('gpu_ratio_to_floor'), '.3f')} | {ok} | {_fmt(vs, '.2f')} | "
                       f"{_mib(x.get('peak_bytes'))} | {_mib(x.get('peak_bytes_autograd_dy'))} | "
                       f"{_mib(x.get('saved_bytes'))} | {x.get('note', '')} |")
        out.append("")
    return "\n".join(out)


# The reference backend runs 10-100x the floor; in the plot it would flatten every other bar.
PLOT_SKIP = ("ours-torch",)


def plot(rows, env, path):
    """One panel per (M, mode): a bar per provider and (shape, r, p) group for the wall ratio to the floor, and a
    black dot on it for the GPU ratio. The floor is the dashed line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(rows)
    modes = sorted({k[0] for k in groups})
    ms = sorted({k[2] for k in groups})
    provs = [p for p in _prov_order({p for g in groups.values() for p in g}) if p not in PLOT_SKIP + (FLOOR,)]
    n_keys = max(len([k for k in groups if k[0] == modes[0] and k[2] == M]) for M in ms)
    fig, axes = plt.subplots(len(ms), len(modes), figsize=(max(6.0, 0.09 * n_keys * len(provs)) * len(modes),
                                                          4.2 * len(ms)), squeeze=False)
    width = 0.8 / max(len(provs), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (i_mode, mode), (i_m, M) in ((a, b) for a in enumerate(modes) for b in enumerate(ms)):
        ax = axes[i_m, i_mode]
        keys = [k for k in groups if k[0] == mode and k[2] == M]
        for i, prov in enumerate(provs):
            xs, ys, gx, gy = [], [], [], []
            for j, k in enumerate(keys):
                r = groups[k].get(prov, {})
                x = j + (i - (len(provs) - 1) / 2) * width
                if r.get("ratio_to_floor") is not None:
                    xs.append(x)
                    ys.append(r["ratio_to_floor"])
                if r.get("gpu_ratio_to_floor") is not None:
                    gx.append(x)
                    gy.append(r["gpu_ratio_to_floor"])
            ax.bar(xs, ys, width=width, label=prov, color=colors[i % len(colors)])
            ax.plot(gx, gy, "k.", ms=2.5, label="GPU time" if i == 0 else None)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{k[1]} r={k[3]} p={k[4]:g}" for k in keys], rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("time / cuBLAS floor (bar: wall, dot: GPU)", fontsize=7)
        ax.set_title(f"{mode}, M={M}  (lower is better)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        if i_mode == 0 and i_m == 0:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(header(env) + (f" | not plotted: {', '.join(PLOT_SKIP)} (the reference)" if PLOT_SKIP else ""),
                 fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON or --jsonl file(s); several are merged (shards)")
    ap.add_argument("--out", default=".", help="output directory (or a .md file path)")
    args = ap.parse_args(argv)
    rows, env = load_many(args.json)
    if args.out.endswith(".md"):
        md_path, png_path = args.out, args.out[:-3] + ".png"
        os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    else:
        os.makedirs(args.out, exist_ok=True)
        md_path, png_path = os.path.join(args.out, "bench_table.md"), os.path.join(args.out, "bench_ratio.png")
    with open(md_path, "w") as f:
        f.write(markdown(rows, env) + "\n")
    print(f"wrote {md_path} ({len(rows)} rows)")
    if rows:
        try:
            plot(rows, env, png_path)
            print(f"wrote {png_path}")
        except Exception as e:  # no matplotlib: the table is what matters
            print(f"plot skipped: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
