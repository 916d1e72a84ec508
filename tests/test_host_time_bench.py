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
                          "--ms", "3,17", "--ps", "0,0.2", "--r", "4", "--out", str(out)],
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
