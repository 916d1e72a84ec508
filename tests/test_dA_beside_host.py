"""dA beside the dx GEMM (csrc/dA_sm90.cu: lora_dA_sm90_beside) on the host, no GPU needed: the dA plan for a budget
of blocks (stream_sm90_plan's `blocks`), and the cost model's choice of SMs. nvcc builds the host code (PTX only);
with no GPU present the plans assume 132 SMs and 227 KB of shared memory per block, as on an H100/H200."""
from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from conftest import build_host_driver

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SMS = 132

DRIVER = r"""
#include <cstdio>
#include "gemm_sm90.h"
#include "stream_sm90.cuh"
using namespace lora_kernels;
using namespace lora_kernels::detail;
// stdin: "M K N r pieces masked blocks" lines (x is M x K, W is N x K; blocks as lora_dA_sm90_beside takes it:
// < 0 the model, > 0 forced); stdout: the SMs chosen, the plan (row splits, rows per split, column groups, columns per
// group), its r-chunks, its shared memory, and the dx GEMM's waves on all SMs and on the rest
int main() {
  long long M, K, N;
  int r, pieces, masked, blocks;
  while (scanf("%lld %lld %lld %d %d %d %d", &M, &K, &N, &r, &pieces, &masked, &blocks) == 7) {
    LoraGemmArgs a;  // dx = dy W: (M, K) from (M, N) x (N, K), the rank-r term as extension K-tiles
    a.M = M; a.N = K; a.K = N; a.Kx = (r + 63) / 64 * 64;
    a.layout_b = GemmLayoutB::kKN;
    const DaBeside b = lora_dA_sm90_beside(a, M, K, r, pieces, masked != 0, blocks);
    const DsShape sh = ds_shape(r, pieces, kDA);
    const long long tiles_n = (K + DS_BN - 1) / DS_BN;
    const long long tpg = b.plan.col_groups > 0 ? (tiles_n + b.plan.col_groups - 1) / b.plan.col_groups : 0;
    printf("%d %lld %lld %lld %lld %d %lld %lld %lld\n", b.blocks, (long long)b.plan.row_splits,
           (long long)b.plan.rows_per_split, (long long)b.plan.col_groups, (long long)b.plan.cols_per_group, sh.z,
           (long long)ds_smem(sh, kDA, tpg, masked != 0), (long long)lora_gemm_sm90_waves(a, 132),
           (long long)(b.blocks > 0 ? lora_gemm_sm90_waves(a, 132 - b.blocks) : 0));
  }
  return 0;
}
"""

LLAMA = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


@pytest.fixture(scope="module")
def beside_bin(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "beside", DRIVER,
                             [CSRC / "plans.cu", CSRC / "gemm_sm90.cu", CSRC / "dA_sm90.cu"])


def _run(exe, cases):
    stdin = "".join(" ".join(str(v) for v in c) + "\n" for c in cases)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split("\n")
    return [tuple(int(v) for v in line.split()) for line in out if line.strip()]


def test_forced_plans_stay_within_their_blocks(beside_bin):
    # The plan for a budget of blocks: at most that many blocks (row splits x column groups x r-chunks), every row and
    # column tile in one span, column groups of at least the ring's stages - 1 tiles, shared memory within the
    # block's; or no plan (0 SMs chosen) where none fits, never a larger grid.
    cases = [(M, K, 1024, r, pieces, masked, blocks)
             for M, K, r, pieces, masked, blocks in itertools.product(
                 (129, 1000, 8192), (640, 1024, 4096, 14336), (1, 16, 40, 64, 100), (1, 3), (0, 1), (1, 2, 5, 12, 33))]
    got = _run(beside_bin, cases)
    assert len(got) == len(cases)
    fitted = 0
    for (M, K, N, r, pieces, masked, blocks), (b, S, rows, G, cols, z, smem, *_) in zip(cases, got):
        what = f"M={M} K={K} r={r} P={pieces} masked={masked} blocks={blocks}: {b} ({S}, {rows}, {G}, {cols}) z={z}"
        if b == 0:
            assert S == 0, what
            continue
        fitted += 1
        assert b == blocks and S * G * z <= blocks, what
        tiles_m, tiles_n = -(-M // 128), -(-K // 64)
        assert rows == -(-tiles_m // S) * 128 and cols == -(-tiles_n // G) * 64, what
        nw = pieces * (16 if r <= 16 else 32 if r <= 32 else 64)
        stages = 3 if nw > 96 else 6 if masked and nw <= 48 else 4
        assert tiles_n // G >= stages - 1, what
        assert smem <= 232448, what + f" needs {smem} B of shared memory"
    assert fitted > len(cases) // 2


def test_model_takes_dA_beside_where_it_was_measured_faster(beside_bin):
    # Session 50's sweep on an H200 (bench/dev/beside_sweep.py, the backward's GPU time at M = 8192, r = 16, p = 0,
    # both adapter dtypes): beside was faster at 4096 -> 1024 (24 SMs: 0.97x / 0.93x, the dx GEMM a quarter of
    # 4096 -> 4096's) and at 4096 -> 14336 (4 SMs: 0.97x, the GEMM's last wave leaves SMs idle), and slower at every
    # SM count at 4096 -> 4096 (4 SMs make dA the longer of the two; 8 or more cost the GEMM a wave). The model's
    # choices: an even count (whole clusters of 2 left to the GEMM), at most a quarter of the SMs, a plan within it.
    cases = [(8192, K, N, 16, pieces, 0, -1) for K, N in ((4096, 1024), (4096, 14336), (4096, 4096))
             for pieces in (1, 3)]
    for case, (b, S, rows, G, cols, z, smem, waves_all, waves_rest) in zip(cases, _run(beside_bin, cases)):
        if case[2] == 4096:
            assert b == 0, case
            continue
        assert 2 <= b <= SMS // 4 and b % 2 == 0, (case, b)
        assert 1 <= S * G * z <= b, (case, b, S, G, z)
        assert waves_all <= waves_rest, (case, waves_all, waves_rest)


def test_model_keeps_dA_after_small_problems(beside_bin):
    # Below 16 Mi elements of x dA's few microseconds are not worth a smaller GEMM grid (M = 2048 at K = 4096, and any
    # M <= 1024 at the Llama shapes)
    cases = [(M, K, N, 16, 3, 0, -1) for M in (1, 64, 1024, 2048) for K, N in LLAMA if M * K < 1 << 24]
    for case, (b, *_) in zip(cases, _run(beside_bin, cases)):
        assert b == 0, case

