"""The DoRA Triton kernels (lora_kernels/backends/triton/kernels/dora_*.py, launched by lora_kernels/dora_kernels.py)
compiled for sm_90 on any machine: each launch the host code makes on a GPU (every dot mode and rank of the norm's
W Aᵀ pass, the combine, the element-wise passes) compiles with triton's real compiler and ptxas, without register
spills; and the dropout pass's per-call scalars (the seed, the counter offset of a row chunk, the threshold, the
scales) never select a new binary.

Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces the JIT functions). The host code runs on
CPU tensors with ``_interp`` forced off and the kernels replaced by recorders that bind their arguments the way the
JIT would for an sm_90 target. LORA_KERNELS_TRITON_ALT_PYTHON may name a second interpreter with another triton
version (e.g. 3.6, the GPU machine's) to run the same checks there.
"""
import pytest

from conftest import TRITON_PYTHONS
from triton_recorder import run_script

pytest.importorskip("triton")

_SCRIPT = r"""
import json, os, re, subprocess, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton_recorder import install

from lora_kernels import dora_kernels as dk

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
NAMES = ["_w_at_kernel", "_norm_combine_kernel", "_scale_bias_kernel", "_scale_colsum_kernel", "_masked_kernel",
         "_zero_g_colsum_kernel", "_colsum_finish_kernel"]
launches = {}  # (kernel, constexprs and options) -> set of JIT cache keys (specializations) seen
first = {}


def record(rec, args, kwargs, bound, spec, options):
    dtypes = [str(a.dtype) for a in args if isinstance(a, torch.Tensor)]
    site = (rec.name, json.dumps(sorted((k, str(v)) for k, v in kwargs.items()) + dtypes))
    launches.setdefault(site, set()).add(json.dumps([str(s) for s in spec]))
    first.setdefault(site, (kwargs, bound, spec))


install(dk, NAMES, backend, record)
dk._interp = lambda t: False  # the GPU path's tiles and dot modes
dk._num_sms = lambda d: 132
g = torch.Generator().manual_seed(0)
for wdt, adt in [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                 (torch.float16, torch.float32), (torch.float32, torch.float32)]:
    for r in (1, 16, 64, 128, 256):
        W = torch.randn(1024, 4096, generator=g).to(wdt)
        A, B = torch.randn(r, 4096, generator=g).to(adt), torch.randn(1024, r, generator=g).to(adt)
        dk.weight_norm(W, A, B, 2.0, torch.ones(1024))
for dt in (torch.bfloat16, torch.float16, torch.float32):
    z, c, b = torch.randn(512, 1024).to(dt), torch.rand(1024), torch.rand(1024).to(dt)
    dk.scale_bias(z, c, b, True, out=z)
    dk.scale_bias(z, c, None, True)
    dk.scale_colsum(z, z, c, True, True, True, out=z)
    dk.scale_colsum(z, None, c, True, False, True)
    dk.scale_colsum(z, z, c, False, True, True)
    dk.scale_colsum(z, z, c, True, True, True, from_y=True, bias=b)  # the saved-y backward at p = 0
    dk.scale_colsum(z, z, c, True, True, True, from_y=True)
    x, W = torch.randn(512, 256).to(dt), torch.randn(1024, 256).to(dt)
    u, A, B = torch.randn(512, 16), torch.randn(16, 256), torch.randn(1024, 16)
    dk.scale_colsum(z, z, c, True, True, True, from_y=True, bias=b,  # with the saved-y recompute's partials
                    recompute=(x, W, u, A, B, 0.5, W.float().square().sum(1)))
    for adt in (torch.float32, dt):
        for r in (1, 16, 64):
            x, W = torch.randn(512, 256).to(dt), torch.randn(1024, 256).to(dt)
            u, A, B = torch.randn(512, r), torch.randn(r, 256).to(adt), torch.randn(1024, r).to(adt)
            rc = (x, W, u, A, B, 0.5, W.float().square().sum(1))
            dk.scale_colsum(z, z, c, True, True, True, from_y=True, recompute=rc)
            dk.scale_colsum(z, z, c, True, True, True, from_y=True, bias=b, recompute=rc)
    for seed in (7, 16, 1, 0, 2**31 + 5, 2**40, 2**62 - 1):
        for offset in (0, 5, 32, 1024 * 512, 2**33 + 16):
            for p in (0.05, 0.1, 0.5):
                dk.masked(z, p, seed, offset, 1.0, 0.0, True)
                dk.masked(z, p, seed, offset, 1.0 - 1.0 / (1 - p), 1.0, True, out=z)
                dk.masked(z, p, seed, offset, 1.0, 0.0, True, base=z, out=z)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
rows = []
for site, (kwargs, bound, spec) in first.items():
    fn = getattr(dk, site[0]).fn
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, {})
    ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    regs = stack = None
    if os.path.exists(cuobjdump):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(ck.asm["cubin"])
            out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
        m = re.search(r"REG:(\d+) STACK:(\d+)", out.stdout + out.stderr)
        if m:
            regs, stack = int(m.group(1)), int(m.group(2))
    rows.append(dict(kernel=site[0], meta={k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"},
                     variants=len(launches[site]), shared=ck.metadata.shared, regs=regs, stack=stack,
                     seed_type=str(signature.get("seed")), offset_type=str(signature.get("offset"))))
print(json.dumps(rows))
"""


@pytest.mark.parametrize("triton_python", TRITON_PYTHONS)
def test_dora_kernels_compile_for_sm90_without_spills(triton_python):
    rows = run_script(triton_python, _SCRIPT, timeout=1500)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_w_at_kernel", "_norm_combine_kernel", "_scale_bias_kernel", "_scale_colsum_kernel",
                       "_masked_kernel", "_zero_g_colsum_kernel", "_colsum_finish_kernel"}, kernels
    assert {r["meta"]["MODE"] for r in rows if r["kernel"] == "_w_at_kernel"} == {1, 2, 3}
    for r in rows:
        assert r["shared"] <= 200 * 1024, r  # fits an sm_90 block (227 KB) with room to spare
        if r["stack"] is not None:  # no register spills: those go to the stack frame (hundreds of bytes when the
            assert r["stack"] <= 16, r  # 3xTF32 tiles of rank 256 did not fit); a few bytes are a plain frame
        if r["kernel"] == "_masked_kernel":  # one binary per launch site, whatever the seed, offset and p
            assert r["variants"] == 1 and (r["seed_type"], r["offset_type"]) == ("i64", "i64"), r
