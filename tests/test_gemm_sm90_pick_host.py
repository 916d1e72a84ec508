"""The sm_90 GEMM's per-problem choice (csrc/gemm_sm90.cu: lora_gemm_sm90_pick) on the host, no GPU needed: the tile
config and the tile-order swizzle. CUTLASS's persistent scheduler rounds the grid of tiles up to a multiple of
swizzle x cluster along each mode and runs the padding tiles in full, so the swizzle must not add waves of tiles
where a smaller one would not; on the benchmarked Llama-3-8B shapes it stays 4, the value session 24's probe chose,
except where the wide tile's 4 columns at N = 1024 would be padded to 8."""
from __future__ import annotations

import os
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
using namespace lora_kernels;
// stdin: "M N K Kx" lines; stdout per line: "config swizzle" (132 SMs), then for 132, 124 and 108 SMs the swizzle
// picked there and lora_gemm_sm90_waves (the waves the GEMM runs on that many SMs: dA beside the dx GEMM takes the rest)
int main() {
  long long M, N, K, Kx;
  while (scanf("%lld %lld %lld %lld", &M, &N, &K, &Kx) == 4) {
    LoraGemmArgs a;
    a.M = M; a.N = N; a.K = K; a.Kx = Kx;
    const GemmChoice c = lora_gemm_sm90_pick(a, 132);
    printf("%d %d", (int)c.config, c.swizzle);
    for (int sms : {132, 124, 108})
      printf(" %d %lld", lora_gemm_sm90_pick(a, sms).swizzle, (long long)lora_gemm_sm90_waves(a, sms));
    printf("\n");
  }
  return 0;
}
"""

COOP, PING = 4, 1  # GemmConfig::kCoop128x256_c12, kPing128x128_c12


@pytest.fixture(scope="module")
def pick_bin(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "pick", DRIVER, [CSRC / "gemm_sm90.cu"], flags=())


def _run(exe, cases):
    stdin = "".join(f"{M} {N} {K} {Kx}\n" for M, N, K, Kx in cases)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split("\n")
    return [tuple(int(v) for v in line.split()) for line in out if line.strip()]


def _pick(exe, cases):
    """(config, swizzle) at 132 SMs per case."""
    return [row[:2] for row in _run(exe, cases)]


def _waves(M, N, bn, s, sms=SMS):
    """Waves of `sms` tiles that CUTLASS runs for 128 x bn tiles in 1 x 2 clusters at max swizzle s
    (PersistentTileSchedulerSm90Params: get_log_swizzle_size, then each mode rounded up to swizzle x cluster)."""
    up = lambda v, m: -(-v // m) * m
    tm, tn = -(-M // 128), up(-(-N // bn), 2)
    e = 4 if s >= 4 and min(tm, tn) >= 3 else 2 if s >= 2 and min(tm, tn) >= 2 else 1
    return -(-(up(tm, e) * up(tn, 2 * e)) // sms)


def test_benchmarked_shapes_keep_swizzle_4(pick_bin):
    """Swizzle 4 (session 24's probe) on every benchmarked shape but the one whose 4 wide tile columns it would pad."""
    # forward (N, K) and dx (N = K of the layer, K = its N, with the rank extension) at 2048 and 8192 tokens
    cases = [(M, N, K, Kx) for M in (2048, 8192)
             for (N, K, Kx) in ((4096, 4096, 0), (1024, 4096, 0), (14336, 4096, 0), (4096, 14336, 0),
                                (4096, 4096, 64), (4096, 1024, 64), (4096, 14336, 64), (14336, 4096, 64))]
    for (M, N, K, Kx), (config, swizzle) in zip(cases, _pick(pick_bin, cases)):
        wide_fwd = M == 8192 and N == 1024  # 256 tiles of 128 x 256: at least 1.5 waves on 132 SMs
        # there 4 tile columns: swizzle 4 would pad them to 8 (4 waves where 2 suffice)
        assert swizzle == (2 if wide_fwd else 4), (M, N, K, Kx, config, swizzle)
        assert config == (COOP if K + Kx >= 2048 and (N >= 2048 or wide_fwd) else PING), (M, N, K, Kx, config)


def test_wide_tile_at_small_n_needs_one_and_a_half_waves(pick_bin):
    """Below N = 2048 the forward layout takes the 128 x 256 tile only where its tiles fill 1.5 waves of the SMs
    (8192 x 4096 -> 1024: 256 tiles on 132 SMs) and K >= 2048; M = 2048 at N = 1024 (64 tiles) keeps ping-pong."""
    cases = [(8192, 1024, 4096, 0), (6336, 1024, 4096, 0), (6208, 1024, 4096, 0), (2048, 1024, 4096, 0),
             (8192, 1024, 1024, 0), (8192, 1024, 1984, 64), (8192, 1000, 4096, 0)]
    got = [config for config, _ in _pick(pick_bin, cases)]
    # 6336 rows: 50 x 4 = 200 wide tiles >= 198; 6208: 49 x 4 = 196 < 198
    assert got == [COOP, COOP, PING, PING, PING, COOP, COOP], got


def test_swizzle_setting_forces_it(pick_bin):
    """LORA_KERNELS_SM90_GEMM_SWIZZLE (A/B timing) overrides the choice, read once per process."""
    for v in ("1", "2", "4"):
        out = subprocess.run([str(pick_bin)], input="8192 11008 4096 0\n8192 4096 4096 0\n", capture_output=True,
                             text=True, check=True, env=dict(os.environ, LORA_KERNELS_SM90_GEMM_SWIZZLE=v)).stdout
        assert [line.split()[1] for line in out.split("\n") if line.strip()] == [v, v], (v, out)


def test_swizzle_pads_no_extra_wave(pick_bin):
    """N = 11008 (43 columns of 256) ran as 48 columns at swizzle 4: 24 waves where 22 suffice; N = 5120 (20
    columns) as 24; M = 8200 (65 rows of 128) as 68. Everywhere the choice is the largest swizzle of fewest waves."""
    got = dict(zip([(8192, 11008), (8192, 5120), (8200, 4096)],
                   _pick(pick_bin, [(8192, 11008, 4096, 0), (8192, 5120, 13824, 0), (8200, 4096, 4096, 0)])))
    assert got == {(8192, 11008): (COOP, 2), (8192, 5120): (COOP, 2), (8200, 4096): (COOP, 2)}, got
    Ms = [1, 64, 127, 128, 129, 300, 1000, 2048, 4095, 8192, 8200, 16384, 100_000]
    Ns = [8, 120, 128, 264, 1000, 2048, 2056, 4096, 5120, 6144, 11008, 13824, 14336, 28672]
    cases = [(M, N, 4096, 0) for M in Ms for N in Ns]
    for (M, N, K, Kx), (config, swizzle) in zip(cases, _pick(pick_bin, cases)):
        bn = 256 if config == COOP else 128
        fewest = min(_waves(M, N, bn, s) for s in (4, 2, 1))
        assert _waves(M, N, bn, swizzle) == fewest, (M, N, config, swizzle)
        assert all(_waves(M, N, bn, s) > fewest for s in (4, 2, 1) if s > swizzle), (M, N, config, swizzle)


def test_waves_on_fewer_sms(pick_bin):
    """lora_gemm_sm90_waves, which the choice of dA beside the dx GEMM weighs (csrc/dA_sm90.cu), counts CUTLASS's waves
    on a grid of that many SMs with the swizzle picked for it (padding tiles included), and never fewer on fewer SMs.
    E.g. the dx GEMM at 8192 x 4096 -> 1024 (2048 tiles of 128 x 128) runs 16 waves on 132 SMs and 19 on 108."""
    Ms = [1, 129, 2048, 8192, 8200]
    Ns = [8, 1000, 1024, 4096, 11008, 14336]
    cases = [(M, N, K, Kx) for M in Ms for N in Ns for K, Kx in ((4096, 0), (1024, 64))]
    for (M, N, K, Kx), (config, _, s132, w132, s124, w124, s108, w108) in zip(cases, _run(pick_bin, cases)):
        bn = 256 if config == COOP else 128
        for sms, swizzle, waves in ((132, s132, w132), (124, s124, w124), (108, s108, w108)):
            assert waves == _waves(M, N, bn, swizzle, sms), (M, N, K, Kx, sms, swizzle, waves)
        assert w132 <= w124 <= w108, (M, N, K, Kx, w132, w124, w108)
    (_, _, _, w132, _, _, _, w108), = _run(pick_bin, [(8192, 4096, 1024, 64)])
    assert (w132, w108) == (16, 19)


SPLITS_DRIVER = r"""
#include <cstdio>
#include "gemm_sm90.h"
using namespace lora_kernels;
// stdin: "M K n sms" lines; stdout per line: lora_dA_gemm_sm90_splits
int main() {
  long long M, K, n;
  int sms;
  while (scanf("%lld %lld %lld %d", &M, &K, &n, &sms) == 4)
    printf("%lld\n", (long long)lora_dA_gemm_sm90_splits(M, K, n, sms));
  return 0;
}
"""


def test_dA_gemm_token_ranges(tmp_path_factory):
    """The dA GEMM's token ranges (csrc/gemm_sm90.cu: lora_dA_gemm_sm90_splits): as many tiles (128 of x's columns, in
    clusters of 2, times one per 64 of V's n columns) times ranges as fill one wave, each range a divisor of M of at
    least 64 tokens, at least half the wave's worth, else 0 (the dA pass runs). Past 16384 tokens no range holds more
    than 16384 (the fp32 running sum of a range's K-tile sums rounds with the square root of their count: 65600
    tokens in one range at K = 32768 failed test_large_index, session 63): the first count from ceil(M / 16384) up to
    twice that which divides M, else 0."""
    exe = build_host_driver(tmp_path_factory, "splits", SPLITS_DRIVER, [CSRC / "gemm_sm90.cu"], flags=())
    cases = {(8192, 4096, 16, 132): 4, (8192, 4096, 64, 114): 2, (8192, 14336, 16, 132): 1, (2048, 4096, 48, 132): 4,
             (8192, 1024, 16, 132): 16, (1000, 2056, 16, 132): 5, (1028, 2048, 64, 132): 4, (900, 520, 8, 132): 12,
             (8191, 4096, 16, 132): 0, (8200, 4096, 16, 132): 4, (100, 4096, 16, 132): 0, (130, 14336, 56, 132): 1,
             (8192, 40000, 16, 132): 1, (8192, 4096, 16, 0): 1,
             (8192, 4096, 192, 132): 1, (8192, 4096, 72, 132): 2, (8192, 1024, 192, 132): 4, (2048, 1024, 128, 132): 8,
             (16384, 16384, 48, 132): 1, (65600, 32768, 48, 132): 5, (2 ** 22, 4096, 16, 132): 256,
             (40000, 14336, 64, 132): 4, (20000, 14336, 16, 132): 2, (32768, 4096, 16, 132): 4,
             (16385, 16384, 16, 132): 0, (2 * 32771, 4096, 64, 132): 0}
    stdin = "".join(f"{M} {K} {n} {sms}\n" for M, K, n, sms in cases)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split()
    assert [int(v) for v in out] == list(cases.values())
    for (M, K, n, sms), s in cases.items():
        if s:
            tiles = ((K + 127) // 128 + 1) // 2 * 2 * -(-n // 64)
            assert M % s == 0 and M // s >= 64 and (M // s <= 16384 or s == 1)
            assert s * tiles <= max(sms, tiles) or s <= 2 * -(-M // 16384)  # one wave, or the fewest short ranges
