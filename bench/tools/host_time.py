"""Host time per call of one LoRA layer: how long the CPU takes to enqueue a call, next to F.linear's own.

    python3 bench/tools/host_time.py [--out host_time.json] [--shape 4096x4096] [--ms 16,2048] [--ps 0,0.1] [--quick]

Providers: ``F.linear`` (the floor: the linear a LoRA layer replaces), PEFT's ``lora.Linear`` (default config, fp32
adapters) and ``lora_linear`` on every available backend (fp32 adapters, as PEFT and patch_peft hand them over).
Modes: ``fwd`` under no_grad (training-mode dropout still applied) and ``fwd+bwd`` (x and the adapters require
grad, the frozen weight does not; torch.autograd.grad of a fixed dy; for F.linear the grad of x).

On a GPU every timed batch is queued behind a ``torch.cuda._sleep`` long enough that the GPU is still asleep when
the host has enqueued the last call (checked with an event), so the host clock measures enqueue time only: Python,
autograd, allocations and launches, never a wait for the GPU. The calls per batch and the sleep are calibrated per
provider and mode (``_GpuClock.calibrate``): a provider that launches many kernels per call fills the device's
launch queue within a long batch and then waits for the GPU, so it gets fewer calls per batch; one that
synchronises cannot be isolated and is reported with its wall time and a flag (``*`` in the table).

Without a GPU it runs the same providers on CPU tensors (the triton backend only under TRITON_INTERPRET=1, where it
is not a host-time measurement, so it is left out) and measures plain wall time per call.

Every case (provider, mode, M, p) is timed once per round, round-robin, the order rotated between rounds, and the
ratio to F.linear (same mode and M) is the median over rounds of the ratio within a round: drift of the machine over
the run falls on every provider alike (two runs of the same code, timed one case after another, gave ratios 1.7x
apart on the H200's host, eleventh session). Prints a table (host microseconds per call, median over rounds, and that
ratio) and writes JSON. Takes about a minute on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SCALING = 2.0


def _make(M, K, N, r, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt)

    return dict(x=rn(M, K), W=rn(N, K, std=K ** -0.5), A=rn(r, K, dt=torch.float32, std=K ** -0.5),
                B=rn(N, r, dt=torch.float32, std=r ** -0.5), dy=rn(M, N))


def providers(M, K, N, r, p, dtype, device, backends=None):
    """{name: (fwd callable, fwd+bwd callable)} for the providers that run here (``backends``: the lora_kernels
    backends to time, default all available)."""
    import lora_kernels

    t = _make(M, K, N, r, dtype, device)
    x, W, A, B, dy = t["x"], t["W"], t["A"], t["B"], t["dy"]
    xg = x.clone().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
    out = {}
    if p == 0.0:
        def lin_fwd():
            with torch.no_grad():
                return F.linear(x, W)

        out["F.linear"] = (lin_fwd, lambda: torch.autograd.grad(F.linear(xg, W), (xg,), dy))

    try:
        from peft import LoraConfig, get_peft_model

        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)

        pm = get_peft_model(One(), LoraConfig(r=r, lora_alpha=int(SCALING * r), lora_dropout=p,
                                              target_modules=["lin"]))
        layer = pm.base_model.model.lin
        with torch.no_grad():
            layer.base_layer.weight.copy_(W)
        pm.train()
        la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight

        def peft_fwd():
            with torch.no_grad():
                return layer(x)

        out["peft lora.Linear"] = (peft_fwd, lambda: torch.autograd.grad(layer(xg), (xg, la, lb), dy))
    except ImportError:
        pass

    for backend in lora_kernels.available_backends():
        if backends is not None and backend not in backends:
            continue
        if device == "cpu" and backend != "torch":
            continue  # the triton interpreter's time is not host time; cuda needs a GPU

        def fwd(backend=backend):
            with torch.no_grad():
                return lora_kernels.lora_linear(x, W, None, A, B, SCALING, dropout_p=p, backend=backend)

        def fwd_bwd(backend=backend):
            y = lora_kernels.lora_linear(xg, W, None, Ag, Bg, SCALING, dropout_p=p, backend=backend)
            return torch.autograd.grad(y, (xg, Ag, Bg), dy)

        out[f"lora_kernels {backend}"] = (fwd, fwd_bwd)
    return out


class _GpuClock:
    """Host time of n calls while the GPU sleeps behind them (see the module docstring).

    A batch is isolated when the GPU is still asleep after the host has queued all n calls (checked with an event).
    It can fail two ways. The sleep was too short for the host's time: a longer sleep fixes that. Or the host waited
    for the GPU: the device's launch queue holds about a thousand pending kernels, and a provider that launches
    dozens per call (PEFT's layer with dropout, fwd+bwd) fills it within a batch, after which every launch waits for
    the sleeping GPU; the same happens to a provider that synchronises. There a longer sleep only lengthens the wait
    (the host's time grows with the sleep), and fewer calls per batch are the fix. ``calibrate`` finds, per provider
    and mode, calls per batch and a sleep that isolate the host time; a provider that cannot be isolated even one
    call at a time (it synchronises) is timed without the sleep and flagged."""

    MAX_SLEEP_US = 4_000_000.0  # one batch never sleeps longer than this

    def __init__(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # load the sleep kernel
        torch.cuda.synchronize()
        rates = []
        for _ in range(3):  # the GPU clock may still be ramping up on the first one: the slowest rate is kept
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            torch.cuda.synchronize()
            rates.append(20_000_000 / (start.elapsed_time(end) * 1000.0))
        self.cycles_per_us = min(rates)  # fewer cycles per us -> sleeps at least as long as asked

    def _batch(self, fn, n, sleep_us):
        """(host us for n calls queued behind a sleep of sleep_us, whether the GPU was still asleep at the end).

        The test is an event recorded right after the sleep, before the calls: if it has not completed when the host
        is done, the sleep was still running, so no call can have waited for the GPU (a wait for anything queued
        after the sleep implies the sleep ended). An event recorded after the calls would not do: a host that
        waited for the sleep to end (full launch queue) can still finish while the GPU runs the queued calls."""
        torch.cuda.synchronize()
        torch.cuda._sleep(int(sleep_us * self.cycles_per_us))
        woke = torch.cuda.Event()
        woke.record()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        asleep = not woke.query()
        torch.cuda.synchronize()
        return (t1 - t0) * 1e6, asleep

    def calibrate(self, fn, n, guess_us, attempts=16):
        """(calls per batch, sleep us) that isolate fn's host time, or None when no batch of one call is isolated
        under the longest sleep (fn waits for the GPU: a synchronisation). guess_us: an upper bound of one call's
        host time (a synchronised call's wall time)."""
        sleep_us = min(self.MAX_SLEEP_US, max(2000.0, 3.0 * n * guess_us))
        for _ in range(attempts):
            span_us, asleep = self._batch(fn, n, sleep_us)
            if asleep:
                return n, sleep_us
            if span_us < 0.8 * sleep_us:  # the host was done well within the sleep, yet the GPU woke: sleep longer
                if sleep_us >= self.MAX_SLEEP_US:
                    return None
                sleep_us = min(self.MAX_SLEEP_US, 2.0 * sleep_us)
                continue
            # The host took about as long as the sleep or longer: it was slow, or it waited for the GPU (a full launch
            # queue, a sync). Fewer calls per batch and a sleep covering the time seen cover both.
            if n == 1 and sleep_us >= self.MAX_SLEEP_US:
                return None
            n = max(1, n // 2)
            sleep_us = min(self.MAX_SLEEP_US, max(2.0 * sleep_us, 3.0 * span_us))
        return None

    def batch_us(self, fn, n, sleep_us, retries=3):
        """Host us per call of one isolated batch (a batch that outran its sleep is redone with a longer one), or
        None when none was isolated."""
        for _ in range(retries + 1):
            span_us, asleep = self._batch(fn, n, sleep_us)
            if asleep:
                return span_us / n
            sleep_us = min(self.MAX_SLEEP_US, 2.0 * sleep_us)
        return None


def _cpu_batch_us(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def plan(fn, n, gpu_clock) -> dict:
    """How fn's batches are timed: without a GPU, n calls of CPU wall time; on a GPU, the calls per batch and the
    sleep that isolate its host time (see _GpuClock), or, for a provider that synchronises, wall time per call."""
    if gpu_clock is None:
        return {"calls_per_batch": n, "isolated": False}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    guess = (time.perf_counter() - t0) / 3 * 1e6  # an upper bound of the host time: includes the GPU's
    cal = gpu_clock.calibrate(fn, n, guess)
    if cal is None:
        return {"calls_per_batch": n, "isolated": False,
                "note": "waits for the GPU (synchronises): wall time, not host time"}
    return {"calls_per_batch": cal[0], "sleep_us": cal[1], "isolated": True}


def one_batch(fn, how: dict, gpu_clock):
    """Host us per call of one batch timed as plan() decided, or None when a GPU batch could not be isolated."""
    n = how["calls_per_batch"]
    if gpu_clock is None or not how["isolated"]:
        if gpu_clock is not None:
            torch.cuda.synchronize()
        us = _cpu_batch_us(fn, n)
        if gpu_clock is not None:
            torch.cuda.synchronize()
        return us
    return gpu_clock.batch_us(fn, n, how["sleep_us"])


def measure_rounds(fns: list, n: int, batches: int, gpu_clock) -> list:
    """Every callable's batches, round-robin: each round times one batch of each, in an order rotated by the round,
    so that drift of the machine over the run (clocks, other processes) falls on every provider alike and a ratio
    taken within a round cancels it. Returns, per callable, plan()'s dict with "batches" (host us per call of each
    round, None where a GPU batch was not isolated)."""
    hows = [plan(fn, n, gpu_clock) for fn in fns]
    for how in hows:
        how["batches"] = [None] * batches
    for b in range(batches):
        order = list(range(len(fns)))
        order = order[b % len(order):] + order[:b % len(order)]
        for i in order:
            hows[i]["batches"][b] = one_batch(fns[i], hows[i], gpu_clock)
    for fn, how in zip(fns, hows):
        if how["isolated"] and all(v is None for v in how["batches"]):  # never isolated after all: wall time
            how.update(isolated=False, note="waits for the GPU (synchronises): wall time, not host time")
            how.pop("sleep_us")
            how["batches"] = [one_batch(fn, how, gpu_clock) for _ in range(batches)]
    return hows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default=None, help="KxN of the layer (default 4096x4096 on a GPU, 256x256 on CPU)")
    ap.add_argument("--ms", default=None, help="token counts M, comma separated (default 16,2048; 16,128 on CPU)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--ps", default="0,0.1", help="dropout probabilities, comma separated")
    ap.add_argument("--calls", type=int, default=50, help="calls per timed batch (at most: see _GpuClock)")
    ap.add_argument("--batches", type=int, default=7)
    ap.add_argument("--backends", default=None,
                    help="lora_kernels backends, comma separated (default: triton,cuda on a GPU, where the torch "
                         "reference backend is not a host-time contender; torch on CPU)")
    ap.add_argument("--quick", action="store_true", help="a few calls per batch (smoke test)")
    ap.add_argument("--out", default="host_time.json")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    K, N = (int(v) for v in (args.shape or ("4096x4096" if gpu else "256x256")).split("x"))
    ms = [int(v) for v in (args.ms or ("16,2048" if gpu else "16,128")).split(",")]
    if not gpu:
        torch.set_num_threads(1)  # tiny CPU ops: threads only add scheduling noise
    ps = [float(v) for v in args.ps.split(",")]
    backends = (args.backends or ("triton,cuda" if gpu else "torch")).split(",")
    n, batches, warmup = (2, 1, 1) if args.quick else (args.calls, args.batches, 5)
    clock = _GpuClock() if gpu else None

    import lora_kernels

    env = {"device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
           "torch": torch.__version__, "python": platform.python_version(),
           "backends": lora_kernels.backend_status(), "dtype": str(dtype).replace("torch.", ""),
           "adapters": "float32", "K": K, "N": N, "r": args.r,
           "method": "host enqueue time behind a GPU sleep" if gpu else "CPU wall time (no GPU)"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    # Every case is built and warmed up before any is timed, so that no case pays the process's own warm-up (the
    # autograd thread's lazy CUDA context, first cuBLAS handles): timed first, an F.linear forward at M = 16 once
    # measured 45 us against 19 us at M = 2048 (H200, seventh session).
    cases = [(M, p, name, mode, fn) for M in ms for p in ps
             for name, (fwd, fwd_bwd) in providers(M, K, N, args.r, p, dtype, device, backends).items()
             for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd))]
    for *_, fn in cases:
        for _ in range(warmup):
            fn()
    rows = []
    for M, p, name, mode, _ in cases:
        rows.append(dict(provider=name, mode=mode, M=M, p=p))
    for res, row in zip(measure_rounds([c[-1] for c in cases], n, batches, clock), rows):
        runs = [v for v in res["batches"] if v is not None]
        row.update(res, median_us=statistics.median(runs) if runs else float("nan"),
                   min_us=min(runs) if runs else float("nan"))
        flag = "" if res["isolated"] or clock is None else "  (not isolated: " + res.get("note", "") + ")"
        print(f"  {row['provider']:22s} {row['mode']:8s} M={row['M']:<5d} p={row['p']:<4} {row['median_us']:9.1f} us"
              f"  ({res['calls_per_batch']} calls/batch){flag}", flush=True)
    # The ratio to F.linear (same mode and M, F.linear runs at p = 0 only): the median over rounds of the ratio within
    # each round.
    floor = {(r["mode"], r["M"]): r for r in rows if r["provider"] == "F.linear"}
    for r in rows:
        base = floor.get((r["mode"], r["M"]))
        ratios = [a / b for a, b in zip(r["batches"], base["batches"]) if a is not None and b] if base else []
        r["x_floor"] = statistics.median(ratios) if ratios else None

    print(f"\nhost us per call ({env['method']}; {env['device']}; {K}x{N}, r={args.r}, {env['dtype']})")
    print(f"{'provider':22s} {'mode':8s} {'M':>5s} {'p':>5s} {'us':>9s} {'x F.linear':>10s}")
    for r in rows:
        ratio = f"{r['x_floor']:10.2f}" if r["x_floor"] is not None else f"{'':10s}"
        star = " *" if gpu and not r["isolated"] else ""
        print(f"{r['provider']:22s} {r['mode']:8s} {r['M']:5d} {r['p']:5.2f} {r['median_us']:9.1f} {ratio}{star}")
    if gpu and any(not r["isolated"] for r in rows):
        print("* waits for the GPU (synchronises): wall time per call, not host time")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
