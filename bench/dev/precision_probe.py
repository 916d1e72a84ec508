"""Error of a backend (default cuda) against float64, relative to the same-precision PyTorch computation's error (the
tolerance rule's ratio; it must stay <= ~2), at training shapes: fp32 or bf16 adapters on a bf16 base.

    PYTHONPATH=<installed wheel> python bench/dev/precision_probe.py [--M 8192] [--adapter-dtype float32] \
        [--backend cuda|triton] [--r 16,64,100] [--shapes KxN,...]
    (triton's "ieee" dots instead of bf16x3: LORA_KERNELS_TRITON_FP32_SPLIT=0)
"""
import argparse
import json
import os
import sys

import torch

import lora_kernels
from lora_kernels.ops import record_dropout

# the tolerance rule's reference and baseline formula (PEFT's unfused computation): tests/conftest.py's
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "tests"))
from conftest import formula  # noqa: E402




def err(a, ref):
    return (a.double() - ref).abs().max().item()


def probe(M, K, N, r, p, adapter_dtype, dev="cuda", backend="cuda"):
    torch.manual_seed(M + K + N + r)
    x = torch.randn(M, K, device=dev).bfloat16()
    W = (torch.randn(N, K, device=dev) / K**0.5).bfloat16()
    b = torch.randn(N, device=dev).bfloat16()
    A = (torch.randn(r, K, device=dev) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, device=dev) / r**0.5).to(adapter_dtype)
    s = 2.0
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    with record_dropout() as calls:
        y = lora_kernels.lora_linear(xg, W, b, Ag, Bg, s, dropout_p=p, backend=backend)
    keep = lora_kernels.dropout_mask(*calls[0], x.shape, p, device=dev) if p > 0 else None
    dy = torch.randn_like(y)
    y.backward(dy)
    out = {}
    res = {}
    for name, prec in (("ref", torch.float64), ("base", None)):
        ts = [t.detach().clone().to(prec or t.dtype).requires_grad_() for t in (x, A, B)]
        o = formula(ts[0], W.to(ts[0].dtype), b.to(ts[0].dtype), ts[1], ts[2], s, keep, p)
        o.backward(dy.to(o.dtype))
        res[name] = (o.detach(), *[t.grad for t in ts])
    for i, (name, got) in enumerate(zip(("y", "dx", "dA", "dB"), (y, xg.grad, Ag.grad, Bg.grad))):
        ref = res["ref"][i].double()
        e, e0 = err(got, ref), err(res["base"][i], ref)
        out[name] = round(e / max(e0, 1e-30), 3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--adapter-dtype", default="float32")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--r", default="16,64,100", help="ranks, comma-separated")
    ap.add_argument("--shapes", default="4096x4096,4096x1024,4096x14336,14336x4096", help="KxN,...")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ad = getattr(torch, a.adapter_dtype)
    rows = []
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}, backend {a.backend}; "
          "error / same-precision PyTorch error")
    for K, N in (tuple(int(v) for v in kn.split("x")) for kn in a.shapes.split(",")):
        for r in (int(v) for v in a.r.split(",")):
            for p in (0.0, 0.1):
                o = probe(a.M, K, N, r, p, ad, backend=a.backend)
                rows.append(dict(M=a.M, K=K, N=N, r=r, p=p, adapters=a.adapter_dtype, backend=a.backend, **o))
                worst = max(o.values())
                print(f"M={a.M} {K}->{N} r={r} p={p}: " + " ".join(f"{k} {v:.2f}" for k, v in o.items())
                      + ("  <-- over 2" if worst > 2 else ""), flush=True)
    if a.out:
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
