"""The shrink with dropout's plan, choice and ring default (csrc/shrink_drop.cu, plans.cuh) on the host, no GPU
needed: nvcc builds the host code (PTX only); with no GPU present the plan assumes 132 SMs and the choice a device
with tensor cores, as on an H100/H200."""
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
#include "plans.cuh"
using namespace lora_kernels;
using namespace lora_kernels::detail;
// stdin: "M K r blocks_per_sm" lines; stdout: the plan (row splits, rows per split, column groups, columns per
// group); last, the reason the kernel does not run here without a GPU
int main() {
  long long M, K;
  int r, bps;
  while (scanf("%lld %lld %d %d", &M, &K, &r, &bps) == 4) {
    const SplitPlan p = lora_shrink_drop_plan(M, K, r, bps);
    printf("%lld %lld %lld %lld\n", (long long)p.row_splits, (long long)p.rows_per_split, (long long)p.col_groups,
           (long long)p.cols_per_group);
  }
  // the choice: "why <reason>" per case, mode by mode (-1 the default, 1 forced, 0 off)
  struct C { DType x, a; long long M, K; int r; float p; unsigned long long xp, ap; };
  const DType b = DType::kBFloat16, h = DType::kFloat16, f = DType::kFloat32;
  const C cases[] = {{b, b, 8192, 4096, 16, 0.1f, 256, 256}, {b, f, 8192, 4096, 16, 0.1f, 256, 256},
                     {b, f, 8192, 4096, 17, 0.1f, 256, 256}, {b, b, 8192, 4096, 32, 0.1f, 256, 256},
                     {h, h, 8192, 4096, 33, 0.1f, 256, 256}, {h, f, 8192, 4096, 16, 0.1f, 256, 256},
                     {b, b, 8192, 4096, 16, 0.0f, 256, 256}, {b, b, 8192, 1028, 16, 0.1f, 256, 256},
                     {b, b, 8192, 4096, 16, 0.1f, 264, 256}, {b, b, 8192, 4096, 65, 0.1f, 256, 256},
                     {b, f, 8192, 4096, 64, 0.1f, 256, 256}};
  for (int mode : {-1, 1, 0}) {
    set_shrink_drop(mode);
    for (const C& c : cases) {
      const char* why = lora_shrink_drop_unsupported((const void*)c.xp, c.x, (const void*)c.ap, c.a, c.M, c.K, c.r, c.p);
      printf("why %s\n", why ? why : "none");
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def plan_bin(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "shrink_drop", DRIVER, [CSRC / "plans.cu", CSRC / "shrink_drop.cu"])


def _run(exe, cases):
    """The plans of `cases` and the driver's choices (one reason, or "none", per case and mode)."""
    stdin = "".join(" ".join(str(v) for v in c) + "\n" for c in cases)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split("\n")
    lines = [line for line in out if line.strip()]
    plans = [tuple(int(v) for v in line.split()) for line in lines if not line.startswith("why ")]
    return plans, [line[4:] for line in lines if line.startswith("why ")]


def test_plans_cover_every_row_and_column_once(plan_bin):
    # Row blocks of 32 rows up to r = 16 (two 16-row tiles), else 16; K in whole 32-column steps, the column groups
    # covering K exactly (the last one may be shorter), each at least two steps per warp where K has them, the
    # partials at most 1/16 of x's bytes where there are several, about two waves of blocks or fewer.
    cases = list(itertools.product((1, 17, 1000, 2048, 8192, 65600), (8, 40, 1000, 4096, 14336), (1, 9, 16, 24, 64),
                                   (1, 2, 3, 4)))
    plans, _ = _run(plan_bin, cases)
    assert len(plans) == len(cases)
    for (M, K, r, bps), (rows, per_rows, groups, cols) in zip(cases, plans):
        rb = 32 if r <= 16 else 16
        steps = -(-K // 32)
        assert per_rows == rb and rows == -(-M // rb), (M, K, r, bps)
        assert cols % 32 == 0 and 1 <= groups <= 65535, (M, K, r, bps)
        assert (groups - 1) * cols < K <= groups * cols, (M, K, r, bps)  # every column once, no empty group
        if groups > 1:
            assert cols // 32 >= 16 or cols // 32 >= steps // groups, (M, K, r, bps)  # two steps per warp
            assert groups * M * r * 4 <= M * K * 2 / 16 * 1.0001 + M * r * 4, (M, K, r, bps)
            assert rows * groups <= 2 * bps * 132 + rows, (M, K, r, bps)  # about two waves, never more than needed


def test_llama_plans(plan_bin):
    # M = 8192 at 3 blocks per SM (the 32-row kernel's 80 registers): 256 row blocks, K split in 4 (two waves of 396
    # slots fit 1024 blocks); at K = 14336, 4 groups of 112 steps
    plans, _ = _run(plan_bin, [(8192, 4096, 16, 3), (8192, 14336, 16, 3), (2048, 4096, 16, 3), (8192, 4096, 64, 2)])
    assert plans[0] == (256, 32, 4, 1024)
    assert plans[1] == (256, 32, 4, 3584)
    assert plans[2] == (64, 32, 8, 512)
    assert plans[3] == (512, 16, 2, 2048)


def test_where_it_runs(plan_bin):
    # (with no GPU the host code takes the device for an H100/H200: tensor cores present)
    _, why = _run(plan_bin, [])
    above = "r above 32 (above 16 with fp32 adapters): the keep bits and the shrink that reads them measured faster"
    default = ["none", "none", above, "none", above, "x and lora_A are not (bf16, bf16), (fp16, fp16) or (bf16, fp32)",
               "no dropout", "K must be a multiple of 8 and x, lora_A 16-byte aligned",
               "K must be a multiple of 8 and x, lora_A 16-byte aligned", "r above 64", above]
    forced = ["none"] * 5 + default[5:10] + ["none"]
    off = ["off (LORA_KERNELS_SHRINK_DROP=0 or set_shrink_drop(0))"] * 11
    assert len(why) == 33
    assert [w.split(" (set_shrink_drop(1)")[0] for w in why[:11]] == default
    assert why[11:22] == forced
    assert why[22:] == off


RING_DRIVER = r"""
#include <cstdio>
#include "plans.cuh"
using namespace lora_kernels;
using namespace lora_kernels::detail;
// x's loads per ring setting (-1 the default, 0, 2, 4), n8-tile count (1, 2, 4, 8: r up to 8, 16, 32, 64) and
// lora_A pieces (1: 16-bit adapters, 3: fp32 ones), and the kernel's shared memory with and without the ring
int main() {
  for (int s : {-1, 0, 2, 4})
    for (int nt : {1, 2, 4, 8})
      for (int p : {1, 3}) printf("%d %d %d %d\n", s, nt, p, sd_ring(s, nt, p));
  printf("smem %zu %zu %zu\n", shrink_drop_smem(2, 2), shrink_drop_smem(2, 2, 2), shrink_drop_smem(8, 1, 4));
  return 0;
}
"""


def test_ring_default(tmp_path_factory):
    # a ring of 2 steps above 16 u columns with 16-bit adapters (measured faster there, session 54), plain loads
    # elsewhere; a forced setting wins everywhere
    exe = build_host_driver(tmp_path_factory, "shrink_drop_ring", RING_DRIVER, [])
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    got = {tuple(int(v) for v in line.split()[:3]): int(line.split()[3]) for line in out if line and line[0] != "s"}
    for (s, nt, p), ring in got.items():
        want = s if s >= 0 else (2 if nt >= 4 and p == 1 else 0)
        assert ring == want, (s, nt, p)
    assert len(got) == 32
    # the tree: 4 warps' accumulators (tiles x n8-tiles x 4 floats x 32 lanes); the ring: 8 warps x steps x 2 tiles'
    # rows x 32 lanes x 16 bytes
    tree = 4 * 2 * 2 * 4 * 32 * 4
    assert [line for line in out if line.startswith("smem")] == [
        f"smem {tree} {tree + 8 * 2 * 2 * 2 * 32 * 16} {4 * 8 * 4 * 32 * 4 + 8 * 4 * 1 * 2 * 32 * 16}"]
