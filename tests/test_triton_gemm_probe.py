"""bench/dev/triton_gemm_probe.py (does a Triton main loop reach cuBLAS on y = x Wᵀ?) on the CPU: its --smoke run
(every kernel variant, both descriptor modes, both warp-specialisation placements, through the Triton interpreter,
against float64), the correctness checks in a child process as the GPU run does them, and the report's geomean,
worst cell and verdicts on synthetic rows. The timing itself needs a GPU (the probe's own run)."""
import argparse
import math
import os

import pytest

from conftest import HAS_CUDA, INTERPRET, import_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = os.path.join(ROOT, "bench", "dev")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(DEV, "triton_gemm_probe.py")), reason="no bench/")
interpreted = pytest.mark.skipif(HAS_CUDA or not INTERPRET,
                                 reason="the CPU interpreter's run (TRITON_INTERPRET=1, no CUDA); on a GPU, run the "
                                        "probe itself")


def _probe():
    pytest.importorskip("triton")
    return import_from(DEV, "triton_gemm_probe")


@interpreted
def test_smoke_every_variant_matches_float64():
    probe = _probe()
    res = probe.smoke(log=lambda s: None)
    if not any(r["status"] == "ok" for r in res):  # e.g. an interpreter that cannot run these kernels at all
        pytest.skip("the interpreter ran no variant: " + next((r.get("reason", "") for r in res), "")[:300])
    bad = [r for r in res if r["status"] in ("fail", "error")]
    assert not bad, bad
    assert {r["variant"] for r in res if r["status"] == "ok"} >= {"plain"}
    for r in res:
        if r["status"] == "ok":
            assert r["unwritten"] == 0 and r["err"] <= 2 * r["err_torch"] + 1e-6


@interpreted
def test_checks_in_a_child_process():
    # the GPU run's isolation: run_checks in a child (here interpreted, on tiny shapes), records read back from its
    # progress file; every config of the quick lists gets a record
    probe = _probe()
    args = argparse.Namespace(dtypes="fp16", shapes="96x64", desc="auto", quick=True, check_M=64, odd="50x80x72")
    variants = ["plain", "tma_persistent"]
    recs = probe.run_checks_isolated(args, variants, log=lambda s: None)
    want = {f"{v}/{c.name}/fp16" for v in variants for c in probe.configs_for(v, True)}
    assert {r["key"] for r in recs} == want
    ran = [r for r in recs if r["checks"]]
    if not ran:
        pytest.skip("the interpreter ran no variant: " + " | ".join(e for r in recs for e in r["errors"])[:300])
    assert all(r["ok"] for r in ran), ran
    assert [c["M"] for c in ran[0]["checks"]] == [64, 50]


def _row(variant, ratio, N=4096, ws=False):
    return dict(K=4096, N=N, M=2048, dtype="bf16", variant=variant, config="128x256x64_s3_w8", desc=None, us=100.0,
                cublas_us=100.0 * ratio, ratio=ratio, tflops=500.0, cublas_tflops=500.0 * ratio, hidden_frac=1.0,
                cublas_hidden_frac=1.0, kernel={"ws_active": ws})


def test_report_geomean_worst_cell_and_verdicts():
    probe = _probe()
    rows = [_row("plain", 0.9), _row("plain", 1.0, N=1024), _row("tma_persistent", 0.98),
            _row("tma_persistent", 0.96, N=1024), _row("tma_persistent_ws", 1.2, ws=True)]
    s = probe.summarize(rows, ["plain", "tma_persistent", "tma_persistent_ws", "other"], n_cells=2)
    assert s["plain"]["geomean"] == pytest.approx(math.sqrt(0.9))
    assert s["plain"]["worst"]["ratio"] == 0.9 and s["plain"]["worst"]["N"] == 4096
    assert not s["plain"]["reaches"] and s["tma_persistent"]["reaches"]
    assert s["tma_persistent_ws"]["cells"] == 1 and not s["tma_persistent_ws"]["reaches"]  # 1 of 2 cells
    assert s["tma_persistent_ws"]["ws_cells"] == 1 and s["other"]["cells"] == 0
    text = probe.format_report(rows, s, {"other": ["cfg/bf16: RuntimeError: PassManager::run failed"]})
    assert "verdict plain: does NOT reach 0.95x" in text
    assert "verdict tma_persistent: REACHES >= 0.95x" in text
    assert "verdict tma_persistent_ws: geomean 1.200x >= 0.95x but only 1/2 cells measured" in text
    assert "verdict other: could not be measured" in text
    assert "other cfg/bf16: RuntimeError: PassManager::run failed" in text
    assert "| 4096->4096 | 2048 | bf16 | tma_persistent_ws | 128x256x64_s3_w8 (WS) |" in text


def test_tma_alignment_rule():
    probe = _probe()
    import torch

    assert probe.tma_unsupported(300, 1000, 4096, torch.bfloat16) is None  # 2000-byte rows of y
    assert "y row stride 2002 B" in probe.tma_unsupported(300, 1001, 4096, torch.bfloat16)
    assert "x/W row stride" in probe.tma_unsupported(300, 1000, 4092, torch.float16)
