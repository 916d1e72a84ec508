"""The CUDA Philox (csrc/philox.cuh, __host__ __device__) is bit-identical to lora_kernels.philox.dropout_mask.

Compiles a host-only program with nvcc (no GPU needed) and compares its masks with the torch reference.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import nvcc_or_skip

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "philox.cuh"
// Prints the mask three times per row: from dropout_keep8 (one call per 8-group, the tensor-core kernels), from
// dropout_keep4 (one call per 4-group, the FFMA kernels) and from dropout_keep_bits8 (an 8-group as one word, the
// kernels that compute a tile's bits before applying them), separated by spaces.
int main(int argc, char** argv) {
  unsigned long long seed = strtoull(argv[1], nullptr, 10), offset = strtoull(argv[2], nullptr, 10);
  long long M = atoll(argv[3]), K = atoll(argv[4]);
  float p = strtof(argv[5], nullptr);
  for (long long m = 0; m < M; ++m) {
    for (long long k8 = 0; 8 * k8 < K; ++k8) {
      bool keep[8];
      lora_kernels::dropout_keep8(seed, lora_kernels::dropout_counter(offset, m, K, k8),
                                  lora_kernels::dropout_threshold(p), keep);
      for (int q = 0; q < 8 && 8 * k8 + q < K; ++q) putchar(keep[q] ? '1' : '0');
    }
    putchar(' ');
    for (long long k = 0; k < K; k += 4) {
      bool keep[4];
      lora_kernels::dropout_keep4(seed, offset, m, K, k, p, keep);
      for (int q = 0; q < 4 && k + q < K; ++q) putchar(keep[q] ? '1' : '0');
    }
    putchar(' ');
    for (long long k8 = 0; 8 * k8 < K; ++k8) {
      const unsigned bits = lora_kernels::dropout_keep_bits8(seed, lora_kernels::dropout_counter(offset, m, K, k8),
                                                             lora_kernels::dropout_threshold(p));
      for (int q = 0; q < 8 && 8 * k8 + q < K; ++q) putchar((bits >> q) & 1u ? '1' : '0');
    }
    putchar('\n');
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def philox_bin(tmp_path_factory):
    nvcc = nvcc_or_skip()
    d = tmp_path_factory.mktemp("philox")
    src = d / "philox_host.cu"
    src.write_text(PROGRAM)
    exe = d / "philox_host"
    res = subprocess.run([nvcc, "-std=c++17", "-O2", f"-I{CSRC}", str(src), "-o", str(exe)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return exe


@pytest.mark.parametrize(
    "seed,offset,M,K,p",
    [
        (0, 0, 3, 8, 0.5),
        (1234, 0, 5, 7, 0.1),
        (2**40 + 17, 2**33 + 5, 4, 13, 0.3),
        (2**63 - 1, 123456789, 2, 33, 0.9),
        (42, 2**32 - 2, 3, 9, 0.25),  # counter crosses 2^32 inside the tensor
        (7, 1, 1, 1, 0.5),
        (99, 0, 17, 64, 0.05),
        (5, 3, 6, 21, 0.1),  # K not a multiple of 8: the last group of each row is partial
        (11, 0, 2, 16, 1.0 / 65536),  # threshold 1: only an all-zero 16-bit value is dropped
        (12, 0, 2, 40, 0.99999),  # threshold 65536 after rounding up: everything is dropped
    ],
)
def test_mask_matches_reference(philox_bin, seed, offset, M, K, p):
    philox = pytest.importorskip("lora_kernels.philox")
    import torch

    out = subprocess.run([str(philox_bin), str(seed), str(offset), str(M), str(K), repr(p)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == M
    ref = philox.dropout_mask(seed, offset, (M, K), p)
    for col, name in ((0, "dropout_keep8"), (1, "dropout_keep4"), (2, "dropout_keep_bits8")):
        got = torch.tensor([[c == "1" for c in row.split(" ")[col]] for row in out], dtype=torch.bool).reshape(M, K)
        assert torch.equal(got, ref), (name, (got.int() - ref.int()).nonzero()[:10])
