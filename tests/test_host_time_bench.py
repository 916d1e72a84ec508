"""bench/tools/host_time.py runs (here on whatever device the machine has, in its quick mode) and writes its table as
JSON: every provider in both modes, for every M and p, with the ratio to F.linear."""
import json
import os
import subprocess
import sys

import lora_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_time_bench_quick(tmp_path):
    out = tmp_path / "host_time.json"
    # ROOT after the caller's path: an installed build (the GPU run's wheel) must win over the source tree
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in (os.environ.get("PYTHONPATH"), ROOT) if p]))
    script = os.path.join(ROOT, "bench", "tools", "host_time.py")
    res = subprocess.run([sys.executable, script, "--quick", "--shape", "40x24",
                          "--ms", "3,17", "--ps", "0,0.2", "--r", "4", "--out", str(out),
                          "--backends", ",".join(lora_kernels.available_backends())],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["env"]["K"] == 40 and data["env"]["N"] == 24 and data["env"]["r"] == 4
    got = {(r["provider"], r["mode"], r["M"], r["p"]) for r in rows}
    providers = {r["provider"] for r in rows}
    assert "F.linear" in providers and "lora_kernels torch" in providers
    expected_backends = [b for b in lora_kernels.available_backends()
                         if data["env"]["method"].startswith("host") or b == "torch"]
    assert {f"lora_kernels {b}" for b in expected_backends} <= providers
    for prov in providers:
        for mode in ("fwd", "fwd+bwd"):
            for M in (3, 17):
                for p in ((0.0,) if prov == "F.linear" else (0.0, 0.2)):
                    assert (prov, mode, M, p) in got, (prov, mode, M, p)
    for r in rows:
        assert r["median_us"] > 0 and r["min_us"] > 0 and len(r["batches"]) >= 1
        assert r["x_floor"] is not None and r["x_floor"] > 0
    assert "x F.linear" in res.stdout


def _host_time_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("host_time", os.path.join(ROOT, "bench", "tools", "host_time.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _simulated_clock(mod, host_us, launches, queue=1024, syncs=False):
    """_GpuClock with its GPU simulated: each call takes host_us of host time and queues `launches` kernels behind
    the sleep; the launch queue holds `queue` of them, and a host that fills it (or a call that synchronises) waits
    for the sleep to end."""

    class Sim(mod._GpuClock):
        def __init__(self):
            self.cycles_per_us = 1.0
            self.seen = []

        def _batch(self, fn, n, sleep_us):
            self.seen.append((n, sleep_us))
            span = n * host_us
            if syncs or n * launches > queue:
                return max(span, sleep_us) + host_us, False  # waited for the sleep: the GPU woke
            return span, span < sleep_us

    return Sim()


def test_gpu_clock_calibration():
    """The calibration of the GPU clock (simulated here): a provider that would fill the launch queue within a batch
    (PEFT's layer with dropout: the crash of bench/results/h200_2026-11-30 run 8) gets fewer calls per batch, a slow
    one a longer sleep, and one that synchronises is reported as not isolatable instead of failing the run."""
    mod = _host_time_module()
    many = _simulated_clock(mod, host_us=300.0, launches=60)  # 50 calls x 60 kernels > 1024
    n, sleep_us = many.calibrate(None, 50, guess_us=400.0)
    assert n * 60 <= 1024 and sleep_us > n * 300.0
    assert many.batch_us(None, n, sleep_us) == 300.0
    slow = _simulated_clock(mod, host_us=5000.0, launches=4)  # the guess under-estimates the host time
    n, sleep_us = slow.calibrate(None, 50, guess_us=100.0)
    assert sleep_us > n * 5000.0 and slow.batch_us(None, n, sleep_us) == 5000.0
    sync = _simulated_clock(mod, host_us=50.0, launches=2, syncs=True)
    assert sync.calibrate(None, 50, guess_us=60.0) is None
    assert sync.batch_us(None, 1, 1000.0) is None
    assert all(s <= mod._GpuClock.MAX_SLEEP_US for _, s in sync.seen)


def test_rounds_are_round_robin():
    """measure_rounds times one batch of every callable per round, the order rotated between rounds, so that drift of
    the machine falls on every provider alike (the ratio to F.linear is then taken within each round)."""
    mod = _host_time_module()
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    res = mod.measure_rounds(fns, 2, 3, None)
    assert calls == [0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 0, 0, 2, 2, 0, 0, 1, 1]
    for r in res:
        assert len(r["batches"]) == 3 and all(v > 0 for v in r["batches"]) and r["calls_per_batch"] == 2
