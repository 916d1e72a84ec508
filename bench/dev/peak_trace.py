"""What is live at the peak of GPU memory: the CUDA caching allocator's history (torch.cuda.memory) of one call,
replayed to the moment of its highest allocated total, printed as the live blocks with their Python stacks.

    PYTHONPATH=<installed wheel> python bench/dev/peak_trace.py [--p 0.1] [--backend cuda]

It traces LoRA's and DoRA's fwd+bwd at the shape of the test that bounds DoRA's peak by LoRA's
(tests/test_dora_memory.py::test_gpu_peak_memory_against_lora), so a failure of that test can be read block by block.
"""
import argparse
import os
import sys

import torch

from lora_kernels import dora

# the replay of the allocator's history (tests/conftest.py) and the peak-memory test's case (tests/test_dora_memory.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "tests"))
from conftest import live_at_peak  # noqa: E402
from test_dora_memory import PEAK_SHAPE, peak_case  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--budget-mib", type=float, default=1.0)
    ap.add_argument("--autograd-dy", action="store_true",
                    help="y's grad made by autograd (the layer may reuse it) instead of the caller's dy")
    a = ap.parse_args()
    M, K, N, r = PEAK_SHAPE
    dora.BWD_CHUNK_BYTES = int(a.budget_mib * 2**20)
    torch.manual_seed(0)
    lora, dora_ = peak_case(a.p, a.backend, owned_dy=a.autograd_dy)
    lora(), dora_()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; M={M} K={K} N={N} r={r} p={a.p} "
          f"backend={a.backend} autograd dy={a.autograd_dy} chunk budget {a.budget_mib} MiB; "
          f"one M×N buffer = {M * N * 2 / 2**20:.2f} MiB")
    for name, fn in (("lora", lora), ("dora", dora_)):
        peak, blocks = live_at_peak(fn, ours=("lora_kernels", "peak_trace", "test_dora_memory"))
        print(f"== {name}: peak {peak / 2**20:.2f} MiB above the start; live blocks at the peak:")
        for s, w in blocks[:12]:
            print(f"   {s / 2**20:8.3f} MiB  {w}")


if __name__ == "__main__":
    main()
