"""The Hopper streaming kernel's plans (csrc/stream_sm90.cuh: stream_sm90_plan, behind lora_dy_pass_sm90_plan,
lora_dA_sm90_plan and lora_shrink_sm90_plan) and its balanced spans, checked on the CPU.

The kernel splits the rows and the 64-column tiles of the streamed matrix evenly (split b of S takes tiles
[n * b / S, n * (b + 1) / S)), needs every column group to span at least stages - 1 tiles (the Up / Gp double buffer of
the warp-specialised loader) and its D sums (dy pass, dA) to fit in shared memory with the ring. nvcc builds the header's
host code (PTX only, no GPU); with no GPU present the plans assume 132 SMs, as on an H100/H200.
"""
from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from conftest import build_host_driver

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

DRIVER = r"""
#include <cstdio>
#include "stream_sm90.cuh"
using namespace lora_kernels;
using namespace lora_kernels::detail;
// stdin: "M cols r pieces mode masked" lines (mode: 0 dy pass, 1 dA, 2 shrink; masked: dA with dropout, its keep
// bits ring); stdout: the plan (row splits, rows per split, column groups, columns per group), the r-chunk count and
// the kernel's shared memory for the plan
int main() {
  long long M, C;
  int r, pieces, mode, masked;
  while (scanf("%lld %lld %d %d %d %d", &M, &C, &r, &pieces, &mode, &masked) == 6) {
    const StreamMode m = static_cast<StreamMode>(mode);
    const SplitPlan p = stream_sm90_plan(M, C, r, pieces, m, false, masked != 0);
    const DsShape sh = ds_shape(r, pieces, m);
    const long long tiles_n = (C + DS_BN - 1) / DS_BN;
    const long long tpg = p.col_groups > 0 ? (tiles_n + p.col_groups - 1) / p.col_groups : 0;
    printf("%lld %lld %lld %lld %d %lld\n", (long long)p.row_splits, (long long)p.rows_per_split,
           (long long)p.col_groups, (long long)p.cols_per_group, sh.z, (long long)ds_smem(sh, m, tpg, masked != 0));
  }
  return 0;
}
"""

MS = [1, 127, 128, 129, 1000, 2048, 8192, 65537]
COLS = [136, 192, 200, 1000, 1024, 4096, 14336, 100_000]
RANKS = [1, 16, 33, 64, 100, 256]
MODES = {"dy": 0, "dA": 1, "shrink": 2}  # csrc/stream_sm90.cuh StreamMode


@pytest.fixture(scope="module")
def plans_bin(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "stream_plans", DRIVER, [CSRC / "plans.cu"])


def _plans(exe, cases, masked=False):
    """The plans of `cases`; masked: one flag for all, or one per case."""
    flags = masked if isinstance(masked, (list, tuple)) else [masked] * len(cases)
    stdin = "".join(f"{M} {C} {r} {p} {m} {int(k)}\n" for (M, C, r, p, m), k in zip(cases, flags))
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split("\n")
    return [tuple(int(v) for v in line.split()) for line in out if line.strip()]


def _spans(n, splits):
    """The kernel's balanced spans: split b takes [n * b // splits, n * (b + 1) // splits)."""
    return [(n * b // splits, n * (b + 1) // splits) for b in range(splits)]


@pytest.mark.parametrize("mode,masked", [("dy", False), ("dA", False), ("dA", True), ("shrink", False)])
@pytest.mark.parametrize("pieces", [1, 3])
def test_stream_plans_cover_and_fit(plans_bin, mode, masked, pieces):
    # masked: dA with dropout, whose shared memory also holds a ring of the tiles' keep bits: a plan must still exist
    # and fit at every shape the pass takes (else dA with dropout would fall back to the mma.sync kernel)
    cases = [(M, C, r, pieces, MODES[mode]) for M, C, r in itertools.product(MS, COLS, RANKS)]
    plans = _plans(plans_bin, cases, masked)
    assert len(plans) == len(cases)
    for (M, C, r, *_), (S, rows, G, cols, z, smem) in zip(cases, plans):
        what = f"{mode} P={pieces} masked={masked} M={M} cols={C} r={r}: ({S}, {rows}, {G}, {cols}), z={z}"
        tiles_m, tiles_n = -(-M // 128), -(-C // 64)
        # column groups of >= stages - 1 tiles: the ring's 4 stages; 3 for dA's 192-wide side operand (three pieces
        # above r = 32); 6 for dA with dropout where its side operand is at most 48 wide (r <= 16, or r <= 32 at one
        # piece), which therefore needs 5 column tiles (the pass refuses fewer: lora_dA_sm90_unsupported)
        nw = pieces * (16 if r <= 16 else 32 if r <= 32 else 64) if mode == "dA" else None
        stages = 3 if mode == "dA" and nw > 96 else 6 if masked and nw <= 48 else 4
        if tiles_n < stages - 1:
            assert S == 0, what + ": a plan below the ring's column tiles"
            continue
        assert 1 <= S <= tiles_m and 1 <= G <= 65535, what
        # every row tile and column tile in exactly one span, no span empty
        for n, k in ((tiles_m, S), (tiles_n, G)):
            spans = _spans(n, k)
            assert spans[0][0] == 0 and spans[-1][1] == n and all(a < b for a, b in spans), what
            assert all(spans[i][1] == spans[i + 1][0] for i in range(k - 1)), what
        assert min(b - a for a, b in _spans(tiles_n, G)) >= stages - 1, what
        assert smem <= 232448, what + f" needs {smem} B of shared memory"
        # r-chunks of 16 or 32 columns with three pieces in the dy pass (G's two halves and D in one block), up to 64
        # otherwise: r <= 64 is one read of the streamed matrix in the shrink and in dA
        rj = -(-r // z)
        assert rj <= (32 if pieces == 3 and mode == "dy" else 64), what
        if mode in ("shrink", "dA") and r <= 64:
            assert z == 1, what
        # one wave of 132 SMs unless the column groups and r-chunks alone exceed it
        assert S * G * z <= max(132, G * z), what


def test_stream_plan_at_llama_shapes_fills_the_gpu(plans_bin):
    """At 8192 tokens the dy pass (N = 4096, 14336, 1024), dA and the shrink (K = 4096, 14336) fill most of the 132 SMs
    with one block each."""
    for mode, m in MODES.items():
        for C in (1024, 4096, 14336):
            (S, rows, G, cols, z, smem), = _plans(plans_bin, [(8192, C, 16, 3, m)])
            assert S * G * z >= 0.75 * 132, (mode, C, S, G, z)


def test_stream_plan_largest_span_is_even(plans_bin):
    """The pass lasts as long as its largest span (one wave of blocks streaming at about the same rate): at the Llama
    shapes the plan's largest span holds at most 5% more 128 x 64 tiles than an even share of the 132 SMs (the
    average span once picked 36 tiles of dA's at 8192 x 4096 where 32 is even, 44 of the shrink's), and no split
    could be dropped without a larger span."""
    cases = [(M, C, r, p, m) for M, C in ((8192, 1024), (8192, 4096), (8192, 14336), (2048, 4096), (2048, 14336))
             for r in (16, 64) for p in (1, 3) for m in MODES.values()]
    for (M, C, r, p, m), (S, rows, G, cols, z, smem) in zip(cases, _plans(plans_bin, cases)):
        what = f"mode {m} P={p} M={M} cols={C} r={r}: ({S}, {rows}, {G}, {cols}), z={z}"
        tiles_m, tiles_n = -(-M // 128), -(-C // 64)
        largest = -(-tiles_m // S) * -(-tiles_n // G)
        assert rows == -(-tiles_m // S) * 128 and cols == -(-tiles_n // G) * 64, what
        if S > 1:  # one row split fewer would make the largest span longer
            assert -(-tiles_m // (S - 1)) > -(-tiles_m // S), what
        if r == 16:
            assert largest <= 1.05 * tiles_m * tiles_n * z / 132, what + f": largest span {largest} tiles"


def test_stream_plan_memo_gives_the_searched_plan(plans_bin):
    """stream_sm90_plan remembers its last 8 plans per thread (PlanMemo, csrc/plans.cuh). Asked again in one process,
    in another order, with the last few repeated back to back and with more than 8 other keys in between, every plan
    is the one a fresh process searches for: no key stands for another's plan."""
    cases = [(M, C, r, p, m) for M, C in ((8192, 4096), (2048, 14336), (129, 1000)) for r in (16, 64)
             for p in (1, 3) for m in MODES.values()]
    fresh = {case: _plans(plans_bin, [case])[0] for case in cases}
    order = cases + cases[::-1] + [c for c in cases[:4] for _ in range(3)] + cases[::3]
    for case, plan in zip(order, _plans(plans_bin, order)):
        assert plan == fresh[case], case
    # masked is part of the key: dA with and without its keep bits, the same shape, alternating in one process
    dA = (8192, 4096, 16, 1, MODES["dA"])
    plain, masked = _plans(plans_bin, [dA])[0], _plans(plans_bin, [dA], masked=True)[0]
    assert plain != masked  # the keep bits' ring takes shared memory: another plan or another kernel footprint
    assert _plans(plans_bin, [dA] * 4, masked=[False, True, False, True]) == [plain, masked, plain, masked]
