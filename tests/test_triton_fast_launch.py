"""The Triton backend's fast launch path (``_launch`` in lora_kernels/backends/triton/launch.py) against triton's
own JITFunction.run.

Runs on a CPU-only machine: a subprocess without TRITON_INTERPRET installs a stand-in GPU driver, so the kernels
really compile for sm_90 (triton's compiler and ptxas) and "launch" into a launcher that records what it was given.
The first launch of each site takes the JIT's path; repeats must take the fast path and hand the launcher the same
binary, grid and arguments (in the same order) that the JIT would, for every kernel of forward and backward (and
DoRA's: norm, scale/bias, column sums, masks); a new
specialization (a misaligned input pointer) must go back to the JIT; an installed launch hook disables the fast path.
"""
import json
import os
import subprocess

import pytest

from conftest import TRITON_PYTHONS

pytest.importorskip("triton")

_SCRIPT = r"""
import json, sys
import torch
import triton

import fake_triton_driver  # tests/fake_triton_driver.py (tests/ is on PYTHONPATH)

LAUNCHES = fake_triton_driver.install_recording()  # (path, function handle, grid, args) of every launch

from lora_kernels.backends.triton import launch as tb  # noqa: E402

assert tb._FAST_LAUNCH, "fast launch is off for this triton version"


def canon(a):
    if isinstance(a, torch.Tensor):
        return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16 == 0]
    if isinstance(a, fake_triton_driver.FakeTensorMap):  # triton 3.6's encoded descriptor (address: see
        # test_triton_tma_mainloop.py, which names the tensors)
        return ["tma", a.shape, a.strides, a.block, repr(a.rest)]
    return a if isinstance(a, (int, float, str, bool, type(None))) else repr(a)


def run(fn):
    start = len(LAUNCHES)
    fn()
    return [(p, f, g, [canon(a) for a in fake_triton_driver.fold_tensor_maps(args)])
            for p, f, g, args in LAUNCHES[start:]]


g = torch.Generator().manual_seed(0)
report = {"problems": []}
for M, K, N, r, p, dtype in [(16, 256, 320, 16, 0.0, torch.float16), (16, 256, 320, 16, 0.1, torch.float16),
                             (300, 256, 320, 16, 0.1, torch.float32), (300, 256, 320, 80, 0.0, torch.float16)]:
    x = torch.randn(M, K, generator=g).to(dtype)
    W = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    dy = torch.randn(M, N, generator=g).to(dtype)

    def step(seed, x=x):
        y, u = tb.forward(x, W, b, A, B, 0.5, p, seed, 0)
        tb.backward(dy, x, W, A, B, u, 0.5, p, seed, 0, True, True, True)

    first, second, third = run(lambda: step(1234)), run(lambda: step(1234)), run(lambda: step(2**63 + 16))
    # x at an odd element offset: its pointer is not 16-byte aligned, another specialization
    xm = torch.empty(M * K + 1, dtype=dtype)[1:].view(M, K)
    xm.copy_(x)
    misaligned = run(lambda: step(1234, xm))
    report["problems"].append(dict(shape=[M, K, N, r, p, str(dtype)], first=first, second=second, third=third,
                                   misaligned=misaligned))

# DoRA's element-wise and norm kernels (lora_kernels/dora_kernels.py) launch through the same _launch
from lora_kernels import dora_kernels as dk  # noqa: E402

M, K, N, r = 96, 256, 320, 16
x, W = torch.randn(M, K, generator=g).half(), torch.randn(N, K, generator=g).bfloat16()
A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
z, dy, c, bias = (torch.randn(M, N, generator=g).half(), torch.randn(M, N, generator=g).half(),
                  torch.rand(N, generator=g), torch.randn(N, generator=g).half())


def dora_step(seed):
    dk.weight_norm(W, A, B, 0.5, torch.rand(N, generator=g))
    dk.scale_bias(z, c, bias, True)
    dk.scale_colsum(dy, z, c, True, True, True)
    dk.masked(x, 0.1, seed, 0, 1.0, 0.0, True)
    dk.masked(x, 0.1, seed, 64, 1.0 - 1.0 / 0.9, 1.0, True, base=x.clone())


report["dora"] = dict(first=run(lambda: dora_step(1234)), second=run(lambda: dora_step(1234)),
                      third=run(lambda: dora_step(2**63 + 16)))

# a launch hook (what profilers install) sends every launch through the JIT, and the hook sees it
seen = []
hook = lambda metadata: seen.append(metadata)  # noqa: E731
triton.knobs.runtime.launch_enter_hook.add(hook) if hasattr(triton.knobs.runtime.launch_enter_hook, "add") \
    else setattr(triton.knobs.runtime, "launch_enter_hook", hook)
M, K, N, r = 300, 256, 320, 16
x, W, A, B = torch.randn(M, K), torch.randn(N, K), torch.randn(r, K), torch.randn(N, r)
hooked = run(lambda: tb.forward(x, W, None, A, B, 0.5, 0.0, 0, 0))
report["hooked"] = dict(paths=[h[0] for h in hooked], hook_calls=len(seen))
print(json.dumps(report))
"""


@pytest.mark.parametrize("triton_python", TRITON_PYTHONS)
def test_fast_launch_matches_jit(triton_python):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORA_KERNELS_TRITON_AUTOTUNE"] = "0"
    env.pop("LORA_KERNELS_TRITON_FAST_LAUNCH", None)
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), tests, env.get("PYTHONPATH", "")])
    out = subprocess.run([triton_python, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    kernels_seen = 0
    for prob in report["problems"]:
        first, second, third, mis = prob["first"], prob["second"], prob["third"], prob["misaligned"]
        assert len(first) == len(second) == len(third) == len(mis) >= 4, prob["shape"]
        kernels_seen += len(first)
        for (p1, f1, g1, a1), (p2, f2, g2, a2), (p3, f3, g3, a3), (pm, fm, gm, am) in zip(first, second, third, mis):
            assert p2 == "fast" and p3 == "fast", prob["shape"]  # repeats, new seeds included, skip the JIT
            assert (f2, g2, a2) == (f1, g1, a1), prob["shape"]  # same binary, grid, arguments in the same order
            assert f3 == f1 and g3 == g1
            diff = [i for i, (u, v) in enumerate(zip(a1, a3)) if u != v]
            assert len(a3) == len(a1) and len(diff) <= 1, (prob["shape"], diff)  # only the seed changed
            x_read = any(isinstance(a, list) and a[:2] == ["tensor", prob["shape"][5]] and a[4] is False for a in am)
            if x_read:  # a launch that takes the misaligned x: the JIT specializes anew, another binary
                assert pm == "jit" and fm != f1, prob["shape"]
    assert kernels_seen >= 16
    dora = report["dora"]
    assert len(dora["first"]) == len(dora["second"]) == len(dora["third"]) == 6, dora["first"]
    for (p1, f1, g1, a1), (p2, f2, g2, a2), (p3, f3, g3, a3) in zip(dora["first"], dora["second"], dora["third"]):
        assert p2 == "fast" and p3 == "fast"  # DoRA's kernels take the fast path too, a new seed included
        assert (f2, g2, a2) == (f1, g1, a1)
        assert f3 == f1 and g3 == g1 and len(a3) == len(a1)
        assert len([i for i, (u, v) in enumerate(zip(a1, a3)) if u != v]) <= 1  # only the seed changed
    hooked = report["hooked"]
    assert hooked["paths"] and all(p == "jit" for p in hooked["paths"]), hooked
    assert hooked["hook_calls"] == len(hooked["paths"])
