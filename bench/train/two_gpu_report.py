"""Helpers of bench/train/two_gpu.sh (issue 18): the environment, and the report over its fsdp_train.py launches.

    python3 bench/train/two_gpu_report.py env WORK              # print the environment, write WORK/env.json
    python3 bench/train/two_gpu_report.py backends WORK         # lora_kernels' backends here, WORK/backends.json
    python3 bench/train/two_gpu_report.py report WORK OUT --expect-backend B   # OUT/two_gpu.json, OUT/two_gpu.md

WORK holds one JSON per launch (<name>.json, written by bench/train/fsdp_train.py --variants unpatched,patched --checks)
and launches.tsv (name, nproc, rc, seconds, status) from the shell. The report prints PASS/FAIL lines and the table
and exits 1 when a check fails.

Tolerance rule for the losses at dropout 0 (bf16 training is not bitwise reproducible across world sizes: the GEMMs
see M = 2048 rows per rank instead of 4096 and the gradients are averaged over ranks): over all steps,
d_ours = max |loss(patched, 2 ranks) - loss(patched, 1 rank)| must be at most 2 * d_peft + floor, where d_peft is
the same difference for plain PEFT in the same launches (same model, data and precision) and floor is 1e-3 for
bf16/fp16 (1e-4 relative to losses near 10) and 1e-4 for fp32.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

FLOOR = {"bf16": 1e-3, "fp16": 1e-3, "fp32": 1e-4}
NVLS_VARS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def cmd_env(work):
    import platform

    import torch

    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
            "env": {k: os.environ.get(k) for k in NVLS_VARS}}
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception as e:
        info["nccl"] = f"unavailable ({type(e).__name__}: {e})"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info["gpus"] = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                             "capability": f"{p.major}.{p.minor}"})
    if n >= 2:
        info["peer_access_0_1"] = torch.cuda.can_device_access_peer(0, 1)
    for mod in ("triton", "peft", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:
            info[mod] = f"unavailable ({type(e).__name__})"
    _dump(info, os.path.join(work, "env.json"))
    print("[env] " + json.dumps(info), flush=True)


def cmd_backends(work):
    import lora_kernels

    info = {"file": lora_kernels.__file__, "version": lora_kernels.__version__,
            "available": lora_kernels.available_backends(), "status": lora_kernels.backend_status()}
    try:
        from lora_kernels import _dispatch

        info["auto_cuda"] = _dispatch.resolve(None, "cuda")
    except Exception as e:
        info["auto_cuda"] = f"{type(e).__name__}: {e}"
    _dump(info, os.path.join(work, "backends.json"))
    print("[backends] " + json.dumps(info), flush=True)


def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def _runs(result):
    if not result:
        return []
    return result["runs"] if "runs" in result else [result]


def _run(launches, name, variant):
    for la in launches:
        if la["name"] == name:
            for r in _runs(la.get("result")):
                if r.get("variant") == variant and "losses" in r:
                    return r
    return None


def _max_diff(a, b):
    n = min(len(a), len(b))
    if n == 0:
        return None
    d = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    return float("nan") if any(math.isnan(x) for x in d) else max(d)


def loss_checks(launches, dtype, one="one_ddp_p0"):
    """The dropout-0 loss comparison of every 2-rank launch against the 1-rank one (rule in the module doc)."""
    floor = FLOOR.get(dtype, 1e-3)
    out = []
    for mode in ("fsdp2", "ddp"):
        name = f"{mode}_p0"
        r1u, r1p = _run(launches, one, "unpatched"), _run(launches, one, "patched")
        r2u, r2p = _run(launches, name, "unpatched"), _run(launches, name, "patched")
        c = {"name": f"loss_match_{mode}", "two_rank": name, "one_rank": one, "floor": floor}
        if not all((r1u, r1p, r2u, r2p)):
            c.update(status="FAIL", detail="a run is missing (see launches)")
            out.append(c)
            continue
        d_ours = _max_diff(r2p["losses"], r1p["losses"])
        d_peft = _max_diff(r2u["losses"], r1u["losses"])
        tol = 2 * d_peft + floor
        c.update(steps=min(len(r2p["losses"]), len(r1p["losses"])), d_ours=d_ours, d_peft=d_peft, tol=tol,
                 patched_vs_unpatched_1rank=_max_diff(r1p["losses"], r1u["losses"]),
                 patched_vs_unpatched_2rank=_max_diff(r2p["losses"], r2u["losses"]),
                 status="PASS" if d_ours <= tol else "FAIL",
                 detail=f"max|2 ranks - 1 rank| ours {d_ours:.3e} vs PEFT {d_peft:.3e}: tol 2*{d_peft:.3e}+{floor:g}"
                        f" = {tol:.3e} over {min(len(r2p['losses']), len(r1p['losses']))} steps")
        out.append(c)
    return out


VERDICT_TEXT = {
    "checks_ran": "every per-rank check ran without raising",
    "no_nan": "no NaN/inf in losses, trained parameters and check forwards",
    "lora_outputs_on_own_device": "every LoRA layer's output on the rank's own device",
    "ops_on_own_device": "every lora_kernels call: x and y on the rank's device, that device current",
    "backend_expected": "patched layers run the expected lora_kernels backend",
    "side_stream_matches_default": "forward under a non-default stream (behind a sleep, NaN-poisoned pool) == "
                                   "default-stream forward",
    "ops_saw_side_stream": "every lora_kernels call saw the side stream as current",
    "step0_masks_equal_across_ranks": "training step 0, same seed on every rank: first LoRA dropout mask equal "
                                      "on every rank",
    "step0_ours_not_peft_dropout": "patched step 0: masks came from lora_kernels (PEFT's nn.Dropout not called)",
    "same_seed_same_masks": "torch.manual_seed(s) on every rank: same masks on every rank",
    "per_rank_seed_per_rank_masks": "torch.manual_seed(s + rank): different masks per rank",
    "torch_reference_agrees": "plain torch F.dropout shows the same pattern (same seed: equal; s + rank: differ)",
}


def verdict_checks(launches):
    """One line per verdict kind over every run where it applies."""
    seen: dict = {}
    for la in launches:
        for r in _runs(la.get("result")):
            for k, v in (r.get("verdicts") or {}).items():
                if v is None:
                    continue
                seen.setdefault(k, []).append((f"{la['name']}/{r.get('variant')}", bool(v)))
    out = []
    for k, items in seen.items():
        bad = [w for w, ok in items if not ok]
        out.append({"name": k, "status": "FAIL" if bad else "PASS",
                    "detail": f"{VERDICT_TEXT.get(k, k)} ({len(items) - len(bad)}/{len(items)} runs)"
                              + (f"; failed in {', '.join(bad)}" if bad else "")})
    return out


def table_rows(launches):
    rows = []
    for la in launches:
        res = la.get("result") or {}
        runs = {r.get("variant"): r for r in _runs(res) if "losses" in r}
        base = runs.get("unpatched")
        for variant in ("unpatched", "patched"):
            r = runs.get(variant)
            if r is None:
                continue
            peaks = r.get("peak_mem_gib_per_rank") or []
            row = {"launch": la["name"], "mode": res.get("mode"), "ranks": res.get("world_size"),
                   "dropout": res.get("dropout"), "variant": variant, "step_ms": 1e3 * r["step_s_median"],
                   "tokens_per_s": r["tokens_per_s"], "tokens_per_s_per_gpu": r.get("tokens_per_s_per_gpu"),
                   "peak_gib_per_gpu": peaks, "timed_steps": len(r["step_s"]) - r.get("warmup_steps", 0)}
            if variant == "patched" and base is not None:
                row["speedup_vs_peft"] = r["tokens_per_s"] / base["tokens_per_s"]
                bp = base.get("peak_mem_gib_per_rank") or []
                if peaks and bp and None not in peaks and None not in bp:
                    row["peak_ratio_vs_peft"] = max(peaks) / max(bp)
            rows.append(row)
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rep):
    env, be = rep.get("env") or {}, rep.get("backends") or {}
    gpus = ", ".join(f"{g['index']}: {g['name']}" for g in env.get("gpus", [])) or "none (CPU)"
    cfg = rep.get("config") or {}
    lines = [f"# Two GPUs: patched PEFT vs PEFT under FSDP2 and DDP ({rep['mode']} mode, {rep['date']})", "",
             f"GPUs: {gpus}; torch {env.get('torch')} (CUDA {env.get('cuda')}, NCCL {env.get('nccl')}), "
             f"triton {env.get('triton')}, peft {env.get('peft')}, transformers {env.get('transformers')}, "
             f"python {env.get('python')}. lora_kernels backend: {rep.get('expect_backend')} expected, available "
             f"{be.get('available')} ({be.get('file')}); build: {rep.get('build') or '-'}. "
             f"NVLS env: {env.get('env')}.", "",
             (f"Model: {cfg['model']}. {cfg.get('steps')} steps per run, the first {cfg.get('warmup')} left out of "
              "the median step time; global batch split over the ranks (tokens/s counts all ranks). Peak memory: "
              "torch.cuda.max_memory_allocated per GPU over the run. Each launch trains plain PEFT, then the patched "
              "model, in the same process.") if cfg.get("model") else "No launch wrote results.", "",
             "| mode | ranks | dropout | variant | step ms | tokens/s | tokens/s/GPU | peak GiB per GPU | vs PEFT |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in rep["table"]:
        peaks = "/".join(_fmt(p, ".2f") for p in r["peak_gib_per_gpu"]) if r["peak_gib_per_gpu"] else "-"
        vs = ""
        if "speedup_vs_peft" in r:
            vs = f"{r['speedup_vs_peft']:.2f}x tok/s" + (f", {r['peak_ratio_vs_peft']:.2f}x mem"
                                                         if "peak_ratio_vs_peft" in r else "")
        lines.append(f"| {r['mode']} | {r['ranks']} | {r['dropout']} | {r['variant']} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {_fmt(r['tokens_per_s_per_gpu'], '.0f')} | {peaks} | {vs} |")
    lc = [c for c in rep["checks"] if c["name"].startswith("loss_match_") and "d_ours" in c]
    if lc:
        lines += ["", "Losses at dropout 0, max |difference| over all steps (rule: ours <= 2 x PEFT + floor):", "",
                  "| 2-rank launch | ours 2 vs 1 rank | PEFT 2 vs 1 rank | bound | patched vs PEFT, 1 rank | "
                  "patched vs PEFT, 2 ranks |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['two_rank']} | {c['d_ours']:.3e} | {c['d_peft']:.3e} | {c['tol']:.3e} | "
                  f"{c['patched_vs_unpatched_1rank']:.3e} | {c['patched_vs_unpatched_2rank']:.3e} |" for c in lc]
    lines += ["", "## Checks", ""]
    lines += [f"- **{c['status']}** {c['name']}: {c.get('detail', '')}" for c in rep["checks"]]
    lines += ["", "## Launches", "", "| launch | ranks | rc | s | status |", "|---|---|---|---|---|"]
    lines += [f"| {la['name']} | {la['nproc']} | {la['rc']} | {la['secs']} | {la['status']} |"
              for la in rep["launches"]]
    lines += ["", f"Overall: **{rep['overall']}** ({rep.get('total_s')} s in all)", ""]
    return "\n".join(lines)


def cmd_report(work, out, expect_backend, mode, total_s=None):
    launches = []
    tsv = os.path.join(work, "launches.tsv")
    if os.path.exists(tsv):
        for line in open(tsv):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 5:
                continue
            name, nproc, rc, secs, status = parts[:5]
            res = _load(os.path.join(work, f"{name}.json"))
            errs = [r.get("error") for r in _runs(res) if r.get("error")]
            if status == "ran":
                status = "ok" if rc == "0" and res and not errs else ("timeout" if rc in ("124", "137") else "failed")
            launches.append({"name": name, "nproc": int(nproc), "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                             "secs": int(secs) if secs.isdigit() else secs, "status": status, "errors": errs,
                             "result": res})
    args0 = next((la["result"]["args"] for la in launches if la.get("result")), {})
    dtype = args0.get("dtype", "bf16")
    cfg = {"model": (f"random-init Llama, {args0.get('layers')} layers, hidden {args0.get('hidden')}, intermediate "
                     f"{args0.get('intermediate')}, {args0.get('heads')} heads / {args0.get('kv_heads')} kv, vocab "
                     f"{args0.get('vocab')}, {dtype}; PEFT LoRA r={args0.get('rank')} on q,k,v,o,gate,up,down "
                     f"(fp32 adapters); global batch {args0.get('batch')} x {args0.get('seq')} tokens")
                    if args0 else None,
           "steps": args0.get("steps"), "warmup": args0.get("warmup"), "args": args0}
    checks = []
    for la in launches:
        checks.append({"name": f"launch_{la['name']}", "status": "PASS" if la["status"] == "ok" else "FAIL",
                       "detail": f"{la['nproc']} rank(s), rc {la['rc']}, {la['secs']} s, {la['status']}"
                                 + (f": {la['errors'][0][:300]}" if la["errors"] else "")})
    checks += loss_checks(launches, dtype)
    checks += verdict_checks(launches)
    rep = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": mode, "expect_backend": expect_backend,
           "env": _load(os.path.join(work, "env.json")), "backends": _load(os.path.join(work, "backends.json")),
           "build": open(os.path.join(work, "build.txt")).read().strip()
           if os.path.exists(os.path.join(work, "build.txt")) else None,
           "config": cfg, "table": table_rows(launches), "checks": checks,
           "overall": "PASS" if checks and all(c["status"] == "PASS" for c in checks) else "FAIL",
           "total_s": total_s, "launches": launches}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "two_gpu.json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)
    md = markdown(rep)
    with open(os.path.join(out, "two_gpu.md"), "w") as f:
        f.write(md)
    print(md.split("\n## Checks")[0])  # the header and the table; the checks as plain lines, last
    for la in launches:
        print(f"launch {la['name']}: {la['nproc']} rank(s), rc {la['rc']}, {la['secs']} s, {la['status']}")
    for c in checks:
        print(f"{c['status']} {c['name']}: {c.get('detail', '')}")
    print(f"OVERALL {rep['overall']}")
    return 0 if rep["overall"] == "PASS" else 1


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["env", "backends", "report"])
    ap.add_argument("work")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--expect-backend", default=None)
    ap.add_argument("--mode", default="gpu")
    ap.add_argument("--total-s", type=int, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "env":
        cmd_env(a.work)
        return 0
    if a.cmd == "backends":
        cmd_backends(a.work)
        return 0
    return cmd_report(a.work, a.out, a.expect_backend, a.mode, a.total_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
