"""Timing and memory helpers for the LoRA benchmarks.

* ``bench_ms(fns)``: CUDA-event timing (warm-up, many reps, median), like
  ``triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")``, but cycling through a list of
  callables (one per input set) so that inputs that fit in L2 are not served hot from cache ("L2 rotation").
  ``use_do_bench=True`` calls triton's do_bench instead (which flushes L2 itself between reps).
  It reports two times per call:
  - ``median_ms`` (wall): back-to-back calls, events around each. When the host enqueues a call more slowly
    than the GPU runs it (Python, autograd, launch overhead), this is the host's time: what an isolated layer
    call costs.
  - ``gpu_ms``: each rep is a batch of back-to-back calls queued behind a GPU sleep kernel longer than the
    host's enqueue time, so the events see only the GPU executing the calls' kernels (with their gaps on the GPU
    side). This is the time of a call in a model that keeps the GPU busy, and the one to compare with a roofline.
  Without CUDA it falls back to a perf_counter timer (CPU smoke tests only).
* ``n_rotation_sets(bytes_per_set)``: how many input sets to rotate among (enough to exceed 2x L2).
* ``peak_memory(fwd_bwd)``: peak CUDA memory of one fwd+bwd above the baseline, alone.
* ``measure_memory(fwd_bwd, exclude)``: peak CUDA memory of one fwd+bwd above the baseline, and the bytes
  saved for backward (via ``torch.autograd.graph.saved_tensors_hooks``), deduplicated by storage, parameters
  (and anything else in ``exclude``) left out.
"""
from __future__ import annotations

import functools
import math
import statistics
import time

import torch

DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100 SXM: 50 MB


def l2_bytes() -> int:
    if torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def n_rotation_sets(bytes_per_set: int, max_sets: int = 16) -> int:
    """1 when one input set is already larger than 2x L2, else enough sets to exceed 2x L2 (capped)."""
    limit = 2 * l2_bytes()
    if bytes_per_set >= limit:
        return 1
    return max(2, min(max_sets, math.ceil(limit / max(bytes_per_set, 1)) + 1))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, n: int = 200, warmup: int = 5) -> float:
    """Host time per call in microseconds: n back-to-back calls timed on the host clock, without waiting for the
    device inside the timed loop (a call whose enqueue is cheaper than its kernels shows only its enqueue)."""
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    _sync()
    return (t1 - t0) / n * 1e6


def bench_ms(fns, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 2000,
             use_do_bench: bool = False, gpu_reps: int = 40) -> dict:
    """Median (and quantiles) in ms of one call, cycling through ``fns`` (a callable or a list of them)."""
    if callable(fns):
        fns = [fns]
    n = len(fns)
    if not torch.cuda.is_available():
        return _bench_cpu(fns, warmup_ms, rep_ms, min_reps, max_reps)
    if use_do_bench:
        import triton.testing

        state = {"i": 0}

        def fn():
            fns[state["i"] % n]()
            state["i"] += 1

        med = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return {"median_ms": float(med), "p20_ms": None, "p80_ms": None, "reps": None, "sets": n}
    # first call(s) outside timing: compile / autotune / allocator warm-up
    for f in fns:
        f()
    _sync()
    # estimate
    est_reps = max(5, n)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(est_reps):
        fns[i % n]()
    end.record()
    _sync()
    est = max(start.elapsed_time(end) / est_reps, 1e-4)
    n_warm = max(1, int(warmup_ms / est))
    n_rep = max(min_reps, min(max_reps, int(rep_ms / est)))
    for i in range(n_warm):
        fns[i % n]()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        starts[i].record()
        fns[i % n]()
        ends[i].record()
    _sync()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    out = _summary(times, n)
    if gpu_reps > 0:
        out.update(_gpu_time(fns, est, gpu_reps))
    return out


@functools.cache
def _cycles_per_ms() -> float:
    """GPU clock cycles of torch.cuda._sleep per millisecond (measured once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 2_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    _sync()
    return cycles / max(start.elapsed_time(end), 1e-3)


def _gpu_time(fns, wall_est_ms: float, reps: int = 40, batch_ms: float = 2.0, max_calls: int = 16) -> dict:
    """Median GPU time of one call, the host's enqueue hidden behind a sleep kernel: each rep is a batch of calls
    queued back to back behind one sleep, timed by events around the batch, divided by its calls.

    Why batches: on the H200 the call right after a sleep ran slower than the same call back to back (the floor at
    8192x4096->4096: 0.415 ms against 0.364 ms; the clock drops while the GPU idles), so one call per sleep
    overstated GPU time. A batch of about ``batch_ms`` of GPU work (at most ``max_calls`` calls) spreads that first
    call's slowdown over the batch. The sleep lasts 2x the batch's wall-time estimate plus 0.1 ms (the wall time of
    a host-bound call bounds its host time), so the host has queued the whole batch before the GPU reaches the start
    event. A rep whose host enqueue outlasted its sleep let the GPU wait on the host inside the timed region:
    ``gpu_hidden_frac`` is the fraction of reps without that, ``gpu_hidden_ok`` whether all were. The median is
    only trustworthy while most reps were hidden (fraction >= 0.5). ``gpu_calls_per_rep`` says the batch size."""
    n = len(fns)
    calls = max(1, min(max_calls, int(batch_ms / max(wall_est_ms, 1e-4))))
    sleep_ms = 2.0 * wall_est_ms * calls + 0.1
    cycles = int(sleep_ms * _cycles_per_ms())
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    hidden = 0
    for i in range(reps):
        _sync()
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        starts[i].record()
        for j in range(calls):
            fns[(i * calls + j) % n]()
        ends[i].record()
        hidden += (time.perf_counter() - t0) * 1e3 <= 0.9 * sleep_ms
    _sync()
    times = sorted(s.elapsed_time(e) / calls for s, e in zip(starts, ends))
    return {"gpu_ms": float(statistics.median(times)), "gpu_hidden_ok": hidden == reps,
            "gpu_hidden_frac": hidden / reps, "gpu_calls_per_rep": calls}


def _bench_cpu(fns, warmup_ms, rep_ms, min_reps, max_reps):
    n = len(fns)
    for f in fns:
        f()
    t0 = time.perf_counter()
    fns[0]()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for i in range(max(1, int(warmup_ms / est))):
        fns[i % n]()
    times = []
    for i in range(max(min_reps, min(max_reps, int(rep_ms / est)))):
        t0 = time.perf_counter()
        fns[i % n]()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return _summary(times, n)


def _summary(times, n_sets):
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": float(statistics.median(times)), "p20_ms": float(q[1]), "p80_ms": float(q[7]),
            "reps": len(times), "sets": n_sets}


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (t.device.type, st.data_ptr()), st.nbytes()
    except Exception:  # tensor subclasses / fake tensors without storage
        return (t.device.type, id(t)), t.numel() * t.element_size()


def peak_memory(fwd_bwd):
    """Peak CUDA memory of one fwd+bwd above what was allocated before it (bytes), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    _sync()
    return int(torch.cuda.max_memory_allocated() - base)


def measure_memory(fwd_bwd, exclude=(), inputs=()) -> dict:
    """Peak memory of one fwd+bwd above the baseline (CUDA only) and bytes saved for backward.

    ``fwd_bwd`` must run forward and backward once; ``exclude`` are tensors (parameters, weights) whose
    storage does not count as saved activations; ``inputs`` (the layer input x) are counted, and also
    reported separately as ``saved_input_bytes`` (in a network x is often shared with the previous layer).
    """
    input_keys = {_storage_key(t)[0] for t in inputs if t is not None}
    excluded = {_storage_key(t)[0] for t in exclude if t is not None}
    saved: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            key, nbytes = _storage_key(t)
            if key not in excluded:
                saved[key] = nbytes
        return t

    out = {"peak_bytes": peak_memory(fwd_bwd), "saved_bytes": None, "saved_count": None}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fwd_bwd()
        _sync()
        out["saved_bytes"] = int(sum(saved.values()))
        out["saved_count"] = len(saved)
        out["saved_input_bytes"] = int(sum(v for k, v in saved.items() if k in input_keys))
    except Exception as e:  # e.g. a compiled graph that refuses saved-tensor hooks
        out["saved_error"] = f"{type(e).__name__}: {e}"[:300]
    return out
