"""The Triton kernels fit GPUs with smaller blocks than a Hopper's 227 KB of shared memory: an A100's 163 KB, and the
99 KB of sm_86 / sm_89 (RTX 30xx / 40xx, L4, L40S). Their pipelines and tiles are sized for a Hopper block; on a
smaller one (configs._smem_per_block, read from the device) they are cut to fit, and the TMA kernel is not taken. A
config that does not fit makes triton raise OutOfResources at the first call.

Each check runs the host code on CPU tensors with the kernels replaced by recorders (tests/triton_recorder.py), the
device's shared memory given, and compiles every launch it would make for that GPU's compute capability with
triton's real compiler: what triton allocates must be within the device's limit; on the same IR, no pointer offset
may be a 32-bit product of a program id. No GPU and no interpreter are needed.
"""
import pytest

from conftest import TRITON_PYTHONS
from triton_recorder import LORA_KERNELS, run_script

pytest.importorskip("triton")

# (compute capability, dynamic shared memory per block)
GPUS = {"sm_86": (86, 99 * 1024), "A100": (80, 163 * 1024)}

_LORA = r"""
import json, re, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton_recorder import LORA_KERNELS, install

from lora_kernels.backends.triton import launch as tb

cap, limit = int(sys.argv[1]), int(sys.argv[2])
target = GPUTarget("cuda", cap, 32)
backend = make_backend(target)
first = {}


def record(rec, args, kwargs, bound, spec, options):
    first.setdefault((rec.name, tuple(sorted((k, str(v)) for k, v in kwargs.items()))), (kwargs, bound, spec))


install(tb, LORA_KERNELS, backend, record)
tb._smem_per_block = lambda device: limit
g = torch.Generator().manual_seed(0)
for M in (16, 300):
    for r in (16, 64, 128, 256):
        for adt in (torch.float16, torch.float32):
            for p in (0.0, 0.1):
                for fuse in (0.0, float("inf")):  # dB in its own pass, and in the dy pass
                    tb._FUSE_DB_PARTIAL_RATIO = fuse
                    x, W = torch.randn(M, 512, generator=g).half(), torch.randn(384, 512, generator=g).half()
                    A, B = torch.randn(r, 512, generator=g).to(adt), torch.randn(384, r, generator=g).to(adt)
                    y, u = tb.forward(x, W, None, A, B, 2.0, p, 12345, 0)
                    tb.backward(torch.randn(M, 384, generator=g).half(), x, W, A, B, u, 2.0, p, 12345, 0, True,
                                True, True)


def pid_offsets(ttir):
    # i32 products of a program id (directly, or splat to a tensor) that a pointer is offset by
    pids = set(re.findall(r"(%[\w.#]+) = tt\.get_program_id", ttir))
    prods = {m.group(1): m.group(0) for m in re.finditer(r"(%[\w.#]+) = arith\.muli (%[\w.#]+), (%[\w.#]+) : i32\b",
                                                          ttir) if m.group(2) in pids or m.group(3) in pids}
    for m in re.finditer(r"(%[\w.#]+) = tt\.splat (%[\w.#]+) : i32", ttir):
        if m.group(2) in prods:
            prods[m.group(1)] = prods[m.group(2)]
    return sorted({prods[m.group(2)] for m in re.finditer(r"tt\.addptr (%[\w.#]+), (%[\w.#]+)", ttir)
                   if m.group(2) in prods})


rows = []
for (name, _), (kwargs, bound, spec) in first.items():
    fn = getattr(tb, name).fn
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, {})
    c = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    rows.append(dict(kernel=name, shared=c.metadata.shared, R_PAD=kwargs.get("R_PAD"),
                     need_db=bool(kwargs.get("NEED_DB")), i32_offsets=pid_offsets(c.asm["ttir"])))
print(json.dumps(rows))
"""


def _run(python, script, *args):
    return run_script(python, script, *args, timeout=1200, env_extra={"LORA_KERNELS_TRITON_AUTOTUNE": "0"})


@pytest.mark.parametrize("triton_python", TRITON_PYTHONS)
@pytest.mark.parametrize("gpu", sorted(GPUS) + ["H100"])
def test_lora_kernels_fit(triton_python, gpu):
    """Every launch of the LoRA forward and backward (M = 16 and 300, r from 16 to 256, 16-bit and fp32 adapters,
    with and without dropout, dB in the dy pass or apart) compiles within the GPU's shared memory. And no pointer is
    offset by a 32-bit product of a program id: a split or block index times a stride (the dy pass's dB partials,
    pid · N · r) passes 2^31 at valid shapes (bf16 dy, N = 128256, r = 16, M = 67,072 tokens) and wraps to an address
    before the buffer; checked on each kernel's Triton IR."""
    cap, limit = GPUS.get(gpu, (90, 227 * 1024))
    rows = _run(triton_python, _LORA, cap, limit)
    assert {r["kernel"] for r in rows} == set(LORA_KERNELS), rows
    assert any(r["kernel"] == "_dy_pass_kernel" and r["need_db"] for r in rows), rows
    over = [r for r in rows if r["shared"] > limit]
    assert over == [], over
    assert [r for r in rows if r["i32_offsets"]] == [], rows


@pytest.mark.parametrize("triton_python", TRITON_PYTHONS)
@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_dora_kernels_fit(triton_python, gpu):
    """Every launch of DoRA's Triton passes (the launches tests/test_dora_sm90.py records: every rank and dot mode of
    the norm's W Aᵀ pass, the combine, the element-wise passes) compiles within the GPU's shared memory."""
    from test_dora_sm90 import _SCRIPT

    cap, limit = GPUS[gpu]
    script = _SCRIPT.replace('GPUTarget("cuda", 90, 32)', f'GPUTarget("cuda", {cap}, 32)')
    script = script.replace("from lora_kernels import dora_kernels as dk",
                            f"from lora_kernels import dora_kernels as dk\ndk._smem_per_block = lambda d: {limit}", 1)
    assert f'GPUTarget("cuda", {cap}, 32)' in script and "_smem_per_block = lambda" in script
    rows = _run(triton_python, script)
    over = [(r["kernel"], r["meta"], r["shared"]) for r in rows if r["shared"] > limit]
    assert rows and over == [], over
