"""No Triton JIT work after warm-up: per-call scalars (the dropout seed and offset, the keep threshold, the scales)
must not select a new kernel specialization.

Triton specializes every non-constexpr integer argument on its value class (== 1 becomes a constant, divisible by 16
is an attribute, 32- or 64-bit is the type), and each class is a separate compiled kernel. A seed drawn per call
from [0, 2^62) lands in a new class about once every 16 calls, which compiled kernels mid-training.

The check runs the backend's host code on CPU tensors with the kernels replaced by recorders, and computes the key
triton's JIT would look its cache up with (the binder's specialization and the launch options, for an sm_90 target),
for the very arguments the backend passes. No GPU and no interpreter are needed (a subprocess without
TRITON_INTERPRET): triton's real JITFunction objects build the binder.
"""
import pytest

from conftest import TRITON_PYTHONS
from triton_recorder import run_script

pytest.importorskip("triton")

_SCRIPT = r"""
import json, os, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton_recorder import LORA_KERNELS, install

from lora_kernels.backends.triton import launch as tb

backend = make_backend(GPUTarget("cuda", 90, 32))
keys = {}  # launch site (kernel, problem, phase, index of the launch within the call) -> set of cache keys seen
problem = None
launches = []  # the kernels launched so far by the current forward or backward call


def record(rec, args, kwargs, bound, spec, options):
    key = json.dumps([[str(s) for s in spec], sorted((k, str(v)) for k, v in options.items())])
    launches.append(rec.name)
    site = f"{rec.name} {problem} launch{len(launches)}"
    keys.setdefault(site, set()).add(key)


install(tb, LORA_KERNELS, backend, record)
# cuBLAS's main loop (the plans' Tensor.addmm_) selects no Triton kernel: a no-op here, so that the check does not
# spend minutes in half-precision CPU matmuls (it timed out at 600 s on a 2-core CI machine)
torch.Tensor.addmm_ = lambda self, *args, **kwargs: self

gen = torch.Generator().manual_seed(0)
seeds = [7, 16, 1, 0, 2**31 + 5, 2**40, 2**40 + 3, 2**62 - 1, 2**63 + 48, 2**64 - 1,
         torch.tensor(5), torch.tensor(2**40)]  # and seeds in memory (CUDA graphs): the same binaries
offsets = [0, 5, 32, 2**33 + 16]
for M, K, N, r in [(16, 256, 320, 16), (300, 256, 320, 16), (300, 4096, 1024, 64)]:
    x = torch.randn(M, K, generator=gen).half()
    W = torch.randn(N, K, generator=gen).half()
    b = torch.randn(N, generator=gen).half()
    A = torch.randn(r, K, generator=gen)
    B = torch.randn(N, r, generator=gen)
    dy = torch.randn(M, N, generator=gen).half()
    for p in [0.05, 0.1, 0.5]:
        for scaling in [0.5, 2.0, 16.0]:
            for seed in seeds:
                for offset in offsets:
                    problem = f"M{M} K{K} N{N} r{r} fwd"
                    launches.clear()
                    y, u = tb.forward(x, W, b, A, B, scaling, p, seed, offset)
                    problem = f"M{M} K{K} N{N} r{r} bwd"
                    launches.clear()
                    tb.backward(dy, x, W, A, B, u, scaling, p, seed, offset, True, True, True)
print(json.dumps({k: len(v) for k, v in keys.items()}))
"""


@pytest.mark.parametrize("triton_python", TRITON_PYTHONS)
def test_seed_offset_threshold_scale_never_respecialize(triton_python):
    """Every kernel launch of one problem (shape, dtypes, p > 0) maps to one JIT cache key, whatever the seed
    (32/64-bit, == 1, divisible by 16, top bit set, or a device tensor as under CUDA graphs), offset, p and scaling.
    LORA_KERNELS_TRITON_ALT_PYTHON may name a second interpreter with another triton version (e.g. 3.6) to run the
    same check there."""
    # fixed configs: the launch goes straight to the (recorded) kernel
    counts = run_script(triton_python, _SCRIPT, timeout=600, env_extra={"LORA_KERNELS_TRITON_AUTOTUNE": "0"})
    seeded = {"_shrink_kernel", "_output_gemm_kernel", "_small_m_kernel"}
    assert seeded <= {k.split()[0] for k in counts}, counts  # every kernel that takes the seed was exercised
    assert all(n == 1 for n in counts.values()), counts


_COMPILE_SCRIPT = r"""
import json, re
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton_recorder import LORA_KERNELS, install

from lora_kernels.backends.triton import launch as tb

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
SEEDED = ["_shrink_kernel", "_output_gemm_kernel", "_small_m_kernel"]
first = {}  # (kernel, W_T) -> what the JIT would compile for its first launch with dropout


def record(rec, args, kwargs, bound, spec, options):
    if rec.name in SEEDED and kwargs.get("HAS_DROPOUT"):
        first.setdefault((rec.name, bool(kwargs.get("W_T"))), (kwargs, bound, spec))  # W_T: dA


install(tb, LORA_KERNELS, backend, record)  # the rest launch too: recorded, not compiled
g = torch.Generator().manual_seed(0)
for M in (16, 300):
    x, W, A, B = (torch.randn(M, 256, generator=g).half(), torch.randn(320, 256, generator=g).half(),
                  torch.randn(16, 256, generator=g), torch.randn(320, 16, generator=g))
    y, u = tb.forward(x, W, None, A, B, 2.0, 0.1, 12345, 0)
    tb.backward(torch.randn(M, 320, generator=g).half(), x, W, A, B, u, 2.0, 0.1, 12345, 0, True, True, True)
rows = []
for (name, _), (kwargs, bound, spec) in sorted(first.items()):
    fn = getattr(tb, name).fn
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, {})
    ttir = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__).asm["ttir"]
    rows.append(dict(kernel=name, seed_type=signature["seed"], seed_ptr_type=signature["seed_ptr"],
                     flag_type=signature["seed_in_mem"],
                     loads_i64=re.search(r"tt\.load %[\w#.]+ : !tt\.ptr<i64>", ttir) is not None,
                     u_given=kwargs.get("U_GIVEN")))
print(json.dumps(rows))
"""


@pytest.mark.parametrize("triton_python", TRITON_PYTHONS)
def test_seed_pointer_kernels_compile_for_sm90(triton_python):
    """Every kernel that takes the seed compiles for sm_90 as a real launch would specialize it: the seed an i64
    argument, the flag an i32, the seed pointer typed like the input, and (where the kernel draws a mask) a load of
    the seed as an int64 from that pointer, taken at run time when the seed lives in memory."""
    rows = run_script(triton_python, _COMPILE_SCRIPT, env_extra={"LORA_KERNELS_TRITON_AUTOTUNE": "0"})
    assert sorted(r["kernel"] for r in rows) == ["_output_gemm_kernel", "_shrink_kernel", "_shrink_kernel",
                                                 "_small_m_kernel"], rows  # the shrink as shrink and as dA
    for r in rows:
        assert (r["seed_type"], r["flag_type"], r["seed_ptr_type"]) == ("i64", "i32", "*fp16"), r
        # with dropout the small-M forward reads u from the shrink (U_GIVEN) and draws no mask itself
        assert r["loads_i64"] == (not r["u_given"]), r

