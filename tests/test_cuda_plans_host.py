"""The CUDA backend's work splits (csrc/plans.cu: lora_dy_pass_plan, lora_dA_plan, lora_shrink_plan) cover every
row and column exactly once, for any shape.

The plans are host code: nvcc builds csrc/plans.cu (PTX only, no GPU needed) with a small driver that
prints the plans of many shapes; with no GPU present the plans assume 132 SMs, as on an H100/H200. A plan that
left rows or columns out would make the kernels skip work silently (the binding trusts them), so these invariants
are checked here rather than only on the GPU.
"""
from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

from conftest import build_host_driver

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

DRIVER = r"""
#include <cstdio>
#include "plans.cuh"
using namespace lora_kernels;
// stdin: "kind M cols r bps" lines (kind y: dy pass, Y: dy pass with the three bf16x3 pieces of fp32 adapters,
// a: dA, s: shrink; bps: resident blocks per SM for dA and the shrink); stdout: one plan per line, then the dy pass
// kernel's shared memory for that plan (0 for the others)
int main() {
  char kind[8]; long long M, C; int r, bps;
  while (scanf("%7s %lld %lld %d %d", kind, &M, &C, &r, &bps) == 5) {
    const int pieces = kind[0] == 'Y' ? 3 : 1;
    const bool dy = kind[0] == 'y' || kind[0] == 'Y';
    const SplitPlan p = dy ? lora_dy_pass_plan(M, C, r, pieces)
                      : kind[0] == 'a' ? lora_dA_plan(M, C, r, bps) : lora_shrink_plan(M, C, r, bps);
    const long long smem = dy ? (long long)detail::dy_pass_tc_smem(detail::dy_pass_rank_chunk(r, pieces),
                                                                     p.cols_per_group, pieces) : 0;
    printf("%lld %lld %lld %lld %lld\n", (long long)p.row_splits, (long long)p.rows_per_split,
           (long long)p.col_groups, (long long)p.cols_per_group, smem);
  }
  return 0;
}
"""

MS = [1, 2, 31, 32, 33, 127, 128, 129, 1000, 2048, 8192, 65537, 1_000_000]
COLS = [1, 3, 16, 17, 64, 100, 4096, 14336, 100_000]
RANKS = [1, 5, 16, 33, 64, 65, 128, 256]


def _build(tmp_path_factory, defines=()):
    return build_host_driver(tmp_path_factory, "plans", DRIVER, [CSRC / "plans.cu"], flags=defines)


@pytest.fixture(scope="module")
def plans_bin(tmp_path_factory):
    return _build(tmp_path_factory)


def _plans(exe, kind, cases, bps=3):
    stdin = "".join(f"{kind} {M} {C} {r} {bps}\n" for M, C, r in cases)
    # no device: the plans take their no-device values (132 SMs, and the shared memory built in), also on a GPU host
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True,
                         env=env).stdout.split("\n")
    return [tuple(int(v) for v in line.split()) for line in out if line.strip()]


def _check_cover(n, splits, per, what):
    """splits blocks of `per` cover [0, n) exactly, with none empty."""
    assert splits >= 1 and per >= 1, what
    assert splits * per >= n, f"{what}: {splits} x {per} < {n} (items left out)"
    assert (splits - 1) * per < n, f"{what}: {splits} x {per} for {n} (an empty split)"


@pytest.mark.parametrize("kind", ["y", "Y", "a", "s"], ids=["dy_pass", "dy_pass_bf16x3", "dA", "shrink"])
def test_plans_cover_every_row_and_column(plans_bin, kind):
    cases = list(itertools.product(MS, COLS, RANKS if kind != "s" else [16, 64, 256]))
    plans = _plans(plans_bin, kind, cases)
    assert len(plans) == len(cases)
    for (M, C, r), (S, rows, G, cols, smem) in zip(cases, plans):
        what = f"{kind} plan M={M} cols={C} r={r}: ({S}, {rows}, {G}, {cols})"
        _check_cover(M, S, rows, what + " rows")
        _check_cover(C, G, cols, what + " columns")
        # split boundaries fall on whole tiles (the .cuh's promise); one group may span any width
        assert S == 1 or rows % 32 == 0, what
        assert G == 1 or cols % (64 if kind == "s" else 32) == 0, what  # shrink: whole 64-column K chunks
        assert G <= 65535, what  # a grid dimension
        if kind in "yY" and M > 0:  # the dy pass kernel launches with this plan's shared memory
            assert smem <= 227 * 1024, what + f" needs {smem} B of shared memory"
        if kind == "a" and S > 1:
            assert S * r * C * 4 <= 64 << 20, what  # dA partials within the 64 MiB budget


def test_plans_for_empty_inputs(plans_bin):
    """M = 0: no row splits (the binding launches nothing); the column fields stay valid."""
    for kind in "yYa":
        (S, rows, G, cols, _), = _plans(plans_bin, kind, [(0, 100, 16)])
        assert S == 0 and rows >= 1 and G == 1 and cols >= 100


@pytest.mark.parametrize("bps", [1, 2, 3, 4])
def test_bandwidth_plans_fill_the_gpu(plans_bin, bps):
    """At 8192 tokens of a Llama-3-8B input (K = 4096 and 14336), the shrink and dA grids hold at least one full wave
    (bps blocks on each of 132 SMs), and no block walks more than a wave's share of the tiles: the profile of a
    0.8-wave grid showed a fifth of the SM time idle."""
    wave = bps * 132
    for K in (4096, 14336):
        (S, rows, G, cols, _), = _plans(plans_bin, "s", [(8192, K, 16)], bps)
        blocks, chunks = S * G, -(-cols // 64)
        assert blocks >= 0.8 * wave or G == -(-K // 64), (K, bps, S, G)
        assert chunks <= -(-(64 * S * -(-K // 64)) // wave) + 2, (K, bps, S, G, cols)
        (S, rows, G, cols, _), = _plans(plans_bin, "a", [(8192, K, 16)], bps)
        blocks = S * G
        assert blocks >= 0.8 * wave or rows == 64, (K, bps, S, rows, G)


# The dynamic shared memory per block of an A100 (163 KB) and of an sm_86 / sm_89 GPU (99 KB: RTX 30xx / 40xx, L4,
# L40S), as the plans read it from the device (smem_per_block); built in as the no-device value here.
SMALLER_GPUS = {"A100": 163 * 1024, "sm_89": 99 * 1024}


@pytest.mark.parametrize("gpu", sorted(SMALLER_GPUS))
def test_dy_pass_plans_fit_smaller_gpus(tmp_path_factory, gpu):
    """On GPUs with less shared memory than an H100's 227 KB the dy pass plan still covers every row and column, and
    either fits the tensor-core kernel into the device's shared memory (the launcher takes that kernel when it fits)
    or, where not even one 64-column chunk per group fits, is the FFMA kernel's plan: one column group, so no g
    partials. (The tensor-core plans once assumed 227 KB everywhere and failed to launch on an A100.)"""
    limit = SMALLER_GPUS[gpu]
    exe = _build(tmp_path_factory, [f"-DLORA_KERNELS_NO_DEVICE_SMEM_PER_BLOCK={limit}"])
    ffma = 0
    for kind in "yY":
        cases = list(itertools.product([1, 129, 8192, 65537], [17, 4096, 14336, 100_000], RANKS))
        for (M, C, r), (S, rows, G, cols, smem) in zip(cases, _plans(exe, kind, cases)):
            what = f"{gpu} {kind} plan M={M} cols={C} r={r}: ({S}, {rows}, {G}, {cols}) smem {smem}"
            _check_cover(M, S, rows, what + " rows")
            _check_cover(C, G, cols, what + " columns")
            assert G <= 65535, what
            if smem > limit:
                assert G == 1, what
                ffma += 1
    # fp32 adapters on bf16 at every rank do not fit 99 KB (the three bf16 pieces): FFMA plans exist there
    assert (ffma > 0) == (gpu == "sm_89"), ffma
