"""The benchmark suite's plumbing on the CPU: sharded runs of the pytest-benchmark grid (tiny fp32 shapes,
LORA_KERNELS_BENCH_CPU_SMOKE=1) merge into one table with every group, and the floor's ratio is 1."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "bench", "suite", "test_bench_lora.py")
MAKE_TABLE = os.path.join(ROOT, "bench", "tools", "make_table.py")


@pytest.mark.skipif(not os.path.exists(SUITE), reason="no bench/")
def test_sharded_grid_merges_into_one_table(tmp_path):
    pytest.importorskip("pytest_benchmark")
    # the CPU smoke grid, also on GPU hosts
    env = dict(os.environ, LORA_KERNELS_BENCH_CPU_SMOKE="1", CUDA_VISIBLE_DEVICES="")
    # Under pytest-xdist (the GPU runner) the worker's PYTEST_XDIST_* variables would reach the child, and
    # pytest-benchmark disables itself when it sees them: the child would write an empty JSON.
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST_XDIST")}
    paths = []
    for shard in ("0/2", "1/2"):
        path = tmp_path / f"shard{shard[0]}.json"
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             SUITE, "--benchmark-json", str(path),
             "--providers", "ours-torch,cublas-base", "--shard", shard,
             "--rep-ms", "2", "--warmup-ms", "1", "--jsonl", str(path) + "l"],
            env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert path.read_text().strip(), "empty benchmark JSON:\n" + run.stdout[-3000:]
        paths.append(str(path))
    ids = [[b["extra_info"]["provider"] + str((b["extra_info"]["shape"], b["extra_info"]["M"], b["extra_info"]["p"],
                                              b["extra_info"]["mode"])) for b in json.load(open(p))["benchmarks"]]
           for p in paths]
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])  # disjoint halves
    out = tmp_path / "table"
    run = subprocess.run([sys.executable, MAKE_TABLE, *paths, "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (out / "bench_table.md").read_text()
    # SMOKE grid: 2 shapes x 2 M x 1 r x 2 p groups, 2 modes each
    assert table.count("\n### ") == 16
    assert "## Summary by M" in table  # the smoke grid has two M values
    floor_rows = [line for line in table.splitlines() if line.startswith("| cublas-base |")]
    assert len(floor_rows) == 16 and all("| 1.000 |" in line for line in floor_rows)
    # the JSON-lines files (written row by row) give the same table
    out2 = tmp_path / "table_jsonl"
    run = subprocess.run([sys.executable, MAKE_TABLE, *[p + "l" for p in paths], "--out", str(out2)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out2 / "bench_table.md").read_text().count("\n### ") == 16


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "bench", "dev", "timeline.py")), reason="no bench/")
def test_timeline_splits_calls_and_measures_idle_time(capsys):
    # bench/dev/timeline.py on a synthetic trace: 3 calls of 2 kernels each, the middle call's span runs from its
    # first kernel's start to the next call's, and its idle time is that span less its kernels
    sys.path.insert(0, os.path.join(ROOT, "bench", "dev"))
    try:
        import timeline
    finally:
        sys.path.pop(0)
    ks = [(0.0, 5.0, "a"), (6.0, 16.0, "b"),      # call 1
          (18.0, 23.0, "a"), (25.0, 35.0, "b"),   # call 2: kernels 15 us, span 18 -> 37
          (37.0, 42.0, "a"), (43.0, 53.0, "b")]   # call 3
    assert timeline.report("x", ks, 3) == pytest.approx(19.0)
    out = capsys.readouterr().out
    assert "span     19.0 us  kernels     15.0 us  idle    4.0 us  (2 kernels)" in out
    assert "gap    2.0       5.0  a" in out and "gap    2.0      10.0  b" in out
    assert timeline.report("x", ks[:5], 3) is None  # 5 kernels do not split into 3 calls


ENV_AB = os.path.join(ROOT, "bench", "dev", "env_ab.py")

_FAKE_TARGETS = r'''
import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
on = os.environ.get("LK_FAKE_SWITCH") == "1"
rows = [dict(mode="fwd", M=2048, K=4096, N=n, r=16, p=0.0, provider=prov,
             gpu_ratio=1.0 if prov == "cublas-base" else (1.10 if on else 1.25) * (1 + n / 1e5))
        for n in (1024, 4096) for prov in ("cublas-base", "ours-cuda")]
with open(out, "w") as f:
    json.dump({"env": {}, "rows": rows, "summary": []}, f)
'''


@pytest.mark.skipif(not os.path.exists(ENV_AB), reason="no bench/")
def test_env_ab_alternates_the_setting_and_compares(tmp_path, monkeypatch):
    from conftest import import_from

    env_ab = import_from(os.path.dirname(ENV_AB), "env_ab")
    fake = tmp_path / "fake_targets.py"
    fake.write_text(_FAKE_TARGETS)
    monkeypatch.setattr(env_ab, "TARGETS", str(fake))
    monkeypatch.setenv("LK_FAKE_SWITCH", "1")  # A's processes must not inherit it
    out = tmp_path / "ab.json"
    monkeypatch.setattr(sys, "argv", ["env_ab.py", "--env", "LK_FAKE_SWITCH=1", "--repeats", "2", "--out", str(out),
                                      "--workdir", str(tmp_path), "--", "--M", "2048"])
    env_ab.main()
    ab = json.loads(out.read_text())
    assert [os.path.basename(p) for p in ab["a_runs"] + ab["b_runs"]] == ["a_0.json", "a_1.json", "b_0.json",
                                                                          "b_1.json"]
    cells = {c["N"]: c for c in ab["cells"]}
    assert set(cells) == {1024, 4096} and all(c["provider"] == "ours-cuda" for c in cells.values())  # no floor rows
    for n, c in cells.items():
        assert c["a"] == pytest.approx(1.25 * (1 + n / 1e5)) and c["b"] == pytest.approx(1.10 * (1 + n / 1e5))
        assert c["b_over_a"] == pytest.approx(1.10 / 1.25)
    (s,) = ab["summary"]
    assert s["cells"] == 2 and s["geomean_b_over_a"] == pytest.approx(1.10 / 1.25)
    # the same comparison from the files already written, and the median over a side's runs
    cells, summary = env_ab.compare([ab["a_runs"][0], ab["b_runs"][1], ab["a_runs"][1]], ab["b_runs"])
    assert [round(q, 6) for _, _, _, q in cells] == [round(1.10 / 1.25, 6)] * 2


SPY_REPORT = os.path.join(ROOT, "bench", "dev", "spy_report.py")


@pytest.mark.skipif(not os.path.exists(SPY_REPORT), reason="no bench/")
def test_spy_report_counts_samples_inside_one_call(tmp_path):
    # bench/dev/spy_report.py on a synthetic py-spy raw record: 10 samples, 8 of them inside one_call (6 in the
    # backward op, 4 of those launching, 2 planning; 2 in the op's wrapper itself), 2 outside (the loop's sync).
    # Shares are of one_call's 8 samples, scaled by the loop's 40 us per call; a driver frame without a symbol counts
    # under its library; Python line numbers and paths are dropped.
    loop = "<module> (host_spy.py:90);main (host_spy.py:80);one_call (host_spy.py:31);op (/x/y/_ops.py:12)"
    raw = tmp_path / "spy.raw"
    raw.write_text(
        f"{loop};backward_impl (binding.cpp:700);cuLaunchKernelEx (libcuda.so.1) 3\n"
        f"{loop};backward_impl (binding.cpp:701);0x7f00 (libcuda.so.1) 1\n"
        f"{loop};backward_impl (binding.cpp:650);stream_sm90_plan (stream_sm90.cuh:560) 2\n"
        f"{loop} 2\n"
        "<module> (host_spy.py:90);main (host_spy.py:95);synchronize (cuda/__init__.py:1000) 2\n")
    calls = tmp_path / "spy.calls"
    calls.write_text(json.dumps(dict(provider="cuda_bwd_op", mode="piece", M=2048, shape="4096x4096", r=16, p=0.0,
                                     calls=100, host_us_per_call=40.0)))
    out = subprocess.run([sys.executable, SPY_REPORT, str(raw), "--calls-file", str(calls)], capture_output=True,
                         text=True, check=True).stdout
    assert "# 8 of 10 samples inside one_call" in out
    incl = out.split("## inclusive")[1].split("## self")[0]
    leaf = out.split("## self (leaf frames)")[1].split("## self by library")[0]
    assert "100.0%     40.0 us  op (_ops.py)" in incl
    assert " 75.0%     30.0 us  backward_impl (binding.cpp)" in incl
    assert " 37.5%     15.0 us  cuLaunchKernelEx (libcuda.so.1)" in leaf
    assert " 12.5%      5.0 us  [libcuda.so.1]" in leaf
    assert " 25.0%     10.0 us  stream_sm90_plan (stream_sm90.cuh)" in leaf
    assert " 25.0%     10.0 us  op (_ops.py)" in leaf  # the samples that end in the wrapper itself
    libs = out.split("## self by library or file")[1]
    assert " 50.0%     20.0 us  libcuda.so.1" in libs


def test_design_floor_adds_the_passes_reads_at_hbm_peak(tmp_path, capsys):
    """bench/tools/design_floor.py: the design floor is 1 + the passes' extra bytes (x for the forward's shrink; x
    twice and dy once in fwd_bwd) over the HBM peak, per cell of a targets.py grid, against the cell's floor time."""
    sys.path.insert(0, os.path.join(ROOT, "bench", "tools"))
    try:
        import design_floor
    finally:
        sys.path.pop(0)
    M, K, N = 1000, 300, 200
    rows = [dict(provider="ours-cuda", mode=mode, M=M, K=K, N=N, r=16, p=0.0, gpu_ms=2e-3 * ratio, gpu_ratio=ratio)
            for mode, ratio in (("fwd", 1.5), ("fwd_bwd", 1.25))]
    rows.append(dict(rows[0], provider="lorafusion"))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"env": {"gpu": "NVIDIA H100 80GB HBM3"}, "rows": rows}))
    got = design_floor.cells(rows, "ours-cuda", 3.35e12)
    floor_s = 2e-6  # gpu_ms / gpu_ratio
    want_fwd = 1 + 2 * M * K / 3.35e12 / floor_s
    want_fb = 1 + 2 * (2 * M * K + M * N) / 3.35e12 / floor_s
    assert [c[4] for c in got[(M, "fwd", 0.0)]] == pytest.approx([want_fwd], rel=1e-12)
    assert [c[4] for c in got[(M, "fwd_bwd", 0.0)]] == pytest.approx([want_fb], rel=1e-12)
    assert len(got) == 2  # the other provider's row left out
    assert design_floor.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "HBM 3.35 TB/s" in out and f"{want_fb:.3f}" in out and f"{1.25 / want_fb:.3f}" in out
