"""What is live at the peak of GPU memory: the CUDA caching allocator's history (torch.cuda.memory) of one call,
replayed to the moment of its highest allocated total, printed as the live blocks with their Python stacks.

    PYTHONPATH=<installed wheel> python bench/dev/peak_trace.py [--p 0.1] [--backend cuda]

It traces LoRA's and DoRA's fwd+bwd at the shape of tests/test_dora.py::test_gpu_peak_memory_against_lora (the
test that bounds DoRA's peak by LoRA's), so a failure of that test can be read block by block.
"""
import argparse
import os

import torch

import lora_kernels
from lora_kernels import dora

_OURS = ("lora_kernels", "peak_trace")


def _where(frames, depth=4):
    """The innermost frames of our code (the package or this script), as file:line name."""
    ours = [f for f in frames if any(k in f.get("filename", "") for k in _OURS)]
    return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in ours[:depth]) or "?"


def live_at_peak(fn):
    """(peak bytes above the start, [(bytes, where)] of the blocks allocated by fn and live at the peak)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for ev in snap["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] in ("free_requested",) and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    return peak, sorted(((s, _where(f)) for s, f in at_peak.values()), reverse=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--budget-mib", type=float, default=1.0)
    a = ap.parse_args()
    M, K, N, r = 4096, 1024, 1024, 16
    dora.BWD_CHUNK_BYTES = int(a.budget_mib * 2**20)
    dt, dev = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    W = (torch.randn(N, K, device=dev) / K**0.5).to(dt)
    A = (torch.randn(r, K, device=dev) / K**0.5).requires_grad_()
    B = torch.randn(N, r, device=dev).requires_grad_()
    m = (torch.rand(N, device=dev) + 0.5).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=dt)

    def lora():
        torch.autograd.grad(lora_kernels.lora_linear(x, W, None, A, B, 2.0, dropout_p=a.p, backend=a.backend),
                            (x, A, B), dy)

    def dora_():
        torch.autograd.grad(lora_kernels.dora_linear(x, W, None, A, B, 2.0, m, dropout_p=a.p, backend=a.backend),
                            (x, A, B, m), dy)

    lora(), dora_()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; M={M} K={K} N={N} r={r} p={a.p} "
          f"backend={a.backend} chunk budget {a.budget_mib} MiB; one M×N buffer = {M * N * 2 / 2**20:.2f} MiB")
    for name, fn in (("lora", lora), ("dora", dora_)):
        peak, blocks = live_at_peak(fn)
        print(f"== {name}: peak {peak / 2**20:.2f} MiB above the start; live blocks at the peak:")
        for s, w in blocks[:12]:
            print(f"   {s / 2**20:8.3f} MiB  {w}")


if __name__ == "__main__":
    main()
