"""End-to-end LoRA training benchmark on a small random-init transformers Llama (no downloads).

    python3 bench/train/e2e_train.py --out e2e.json [--compile] [--tiny]

1. throughput: tokens/s and peak memory of a training step (fwd+bwd+AdamW) for PEFT unpatched vs
   lora_kernels.patch_peft, at lora_dropout 0 and 0.05 (batch x seq configurable);
2. loss curve: --loss-steps (20) steps at dropout 0 from the same init and data, patched vs unpatched,
   with the max abs difference of the losses;
3. --compile: torch.compile(fullgraph=True) of one patched lora.Linear (fwd+bwd), and
   torch._dynamo.explain of the whole patched model: graph/graph-break counts, break reasons, and which
   breaks come from LoRA layers (peft/tuners/lora or lora_kernels frames).
Runs on CPU with --tiny (fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_common import add_model_args, batches, build_model, ensure_import_path, finalize_args, patch_peft, sync  # noqa

ensure_import_path()
import torch  # noqa: E402


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def make_model(args, dropout, patched, device):
    model = build_model(args, dropout, device)
    report = None
    if patched:
        report = patch_peft(model, backend=args.backend)
    model.train()
    return model, report


def _report_str(report):
    if report is None:
        return None
    for attr in ("summary", "as_dict", "to_dict"):
        f = getattr(report, attr, None)
        if callable(f):
            try:
                return f()
            except Exception:
                pass
    return str(report)[:2000]


def throughput(args, dropout, patched, device):
    model, report = make_model(args, dropout, patched, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    data = batches(args, args.warmup + args.steps, device)
    cuda = torch.device(device).type == "cuda"

    def step(ids):
        loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for ids in data[:args.warmup]:
        step(ids)
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for ids in data[args.warmup:]:
        t0 = time.perf_counter()
        step(ids)
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    res = {"patched": patched, "dropout": dropout, "step_ms_median": med * 1e3,
           "step_ms_mean": statistics.mean(times) * 1e3, "tokens_per_s": args.batch * args.seq / med,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "patch_report": _report_str(report)}
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return res


def loss_curve(args, patched, device):
    model, _ = make_model(args, 0.0, patched, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for ids in batches(args, args.loss_steps, device, seed_offset=2000):
        loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().float()))
    del model, opt
    return losses


def _is_lora_frame(text):
    return any(s in text for s in ("tuners/lora", "lora_kernels"))


def compile_check(args, device):
    out = {}
    import torch._dynamo as dynamo
    from peft.tuners.lora import Linear as LoraLinear

    model, _ = make_model(args, 0.0, True, device)
    ids = batches(args, 1, device, seed_offset=3000)[0]
    # (a) one patched lora.Linear, fullgraph=True, fwd + bwd, also at dropout > 0
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(args.batch, args.seq, layer.in_features, device=device,
                    dtype=layer.base_layer.weight.dtype, requires_grad=True)
    for p_drop in (0.0, 0.05):
        key = f"layer_fullgraph_p{p_drop}"
        try:
            dynamo.reset()
            for d in layer.lora_dropout.values():
                if isinstance(d, torch.nn.Dropout):
                    d.p = p_drop
            cl = torch.compile(layer, fullgraph=True)
            y = cl(x)
            y.float().sum().backward()
            ref = layer(x) if p_drop == 0 else None
            out[key] = {"ok": True, "max_abs_diff_vs_eager": None if ref is None else
                        float((y.detach() - ref.detach()).abs().max())}
        except Exception as e:
            out[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000]}
    try:
        dynamo.reset()
        ex = dynamo.explain(layer)(x)
        out["layer_explain"] = {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count,
                                "break_reasons": [str(getattr(b, "reason", b))[:500] for b in ex.break_reasons]}
    except Exception as e:
        out["layer_explain"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    # (b) the whole patched model
    try:
        dynamo.reset()
        ex = dynamo.explain(model)(input_ids=ids, labels=ids)
        reasons, lora_reasons = [], []
        for b in ex.break_reasons:
            stack = "".join(str(f) for f in (getattr(b, "user_stack", None) or []))
            r = {"reason": str(getattr(b, "reason", b))[:500], "where": stack[-600:]}
            reasons.append(r)
            if _is_lora_frame(stack) or _is_lora_frame(r["reason"]):
                lora_reasons.append(r)
        out["model_explain"] = {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count,
                                "break_reasons": reasons, "lora_break_count": len(lora_reasons),
                                "lora_break_reasons": lora_reasons}
    except Exception as e:
        out["model_explain"] = {"error": f"{type(e).__name__}: {e}"[:3000]}
    # (c) the whole patched model, compiled, one training step
    try:
        dynamo.reset()
        cm = torch.compile(model)
        loss = loss_of(cm, ids)
        loss.backward()
        out["model_compiled_step"] = {"ok": True, "loss": float(loss.detach().float())}
    except Exception as e:
        out["model_compiled_step"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000]}
    del model
    return out


def env_info(device):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for mod in ("triton", "peft", "transformers", "lora_kernels"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:
            info[mod] = f"unavailable ({type(e).__name__})"
    try:
        import lora_kernels

        info["backends"] = lora_kernels.available_backends()
    except Exception:
        pass
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per throughput config")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loss-steps", type=int, default=20)
    ap.add_argument("--dropouts", default="0,0.05")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="e2e.json")
    args = finalize_args(ap.parse_args(argv))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 3), 1
    res = {"args": vars(args), "env": env_info(device), "throughput": [], "errors": []}

    def guarded(name, fn):
        try:
            return fn()
        except Exception as e:
            res["errors"].append({"stage": name, "error": f"{type(e).__name__}: {e}"[:3000],
                                  "traceback": traceback.format_exc()[-3000:]})
            print(f"[e2e] {name} FAILED: {type(e).__name__}: {e}", flush=True)
            return None

    if not args.skip_throughput:
        for d in [float(s) for s in args.dropouts.split(",")]:
            for patched in (False, True):
                r = guarded(f"throughput patched={patched} p={d}", lambda: throughput(args, d, patched, device))
                if r:
                    res["throughput"].append(r)
                    print(f"[e2e] patched={patched!s:5} p={d:<4} {r['tokens_per_s']:10.0f} tok/s  "
                          f"step {r['step_ms_median']:8.2f} ms  peak "
                          f"{r['peak_mem_gib'] if r['peak_mem_gib'] is not None else float('nan'):.2f} GiB",
                          flush=True)
        for d in {r["dropout"] for r in res["throughput"]}:
            u = [r for r in res["throughput"] if r["dropout"] == d and not r["patched"]]
            p = [r for r in res["throughput"] if r["dropout"] == d and r["patched"]]
            if u and p:
                res.setdefault("speedup", {})[str(d)] = p[0]["tokens_per_s"] / u[0]["tokens_per_s"]
    lu = guarded("loss unpatched", lambda: loss_curve(args, False, device))
    lp = guarded("loss patched", lambda: loss_curve(args, True, device))
    res["loss_unpatched"], res["loss_patched"] = lu, lp
    if lu and lp:
        res["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(lu, lp))
        print(f"[e2e] loss curve ({len(lu)} steps, p=0): unpatched {lu[0]:.4f}->{lu[-1]:.4f}, patched "
              f"{lp[0]:.4f}->{lp[-1]:.4f}, max |diff| {res['loss_max_abs_diff']:.3e}", flush=True)
    if args.compile:
        res["compile"] = guarded("compile", lambda: compile_check(args, device))
        c = res["compile"] or {}
        print("[e2e] compile:", json.dumps({k: ({kk: vv for kk, vv in v.items() if kk in (
            "ok", "graph_count", "graph_break_count", "lora_break_count", "error")} if isinstance(v, dict) else v)
            for k, v in c.items()})[:2000], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"[e2e] wrote {args.out}; {len(res['errors'])} error(s)")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
