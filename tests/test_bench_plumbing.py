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
