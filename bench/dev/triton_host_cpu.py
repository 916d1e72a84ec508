"""Host (CPU) time per call of the Triton backend's Python, measured on a machine without a GPU:

    python3 bench/dev/triton_host_cpu.py [--M 16,2048] [--K 64] [--N 64] [--r 16] [--p 0,0.1] [--n 2000]
                                         [--profile M,p] [--no-launch] [--dora]

Runs lora_linear(backend="triton") on CPU tensors, with the GPU's branch structure: the interpreter stays off (run
this without TRITON_INTERPRET), the knobs are the GPU defaults (cuBLAS main loop, autotuning on), the SM count is an
H200's (132), and the kernels are real JITFunctions launched through the backend's launch path as on the GPU. Only the
end of the launch is stubbed: triton's driver is a stand-in (current device and stream 0), JITFunction.run returns a
stand-in CompiledKernel whose launcher does nothing, and the autotuner picks its first config without benchmarking.
So the time measured is the backend's Python per call (planning, argument building, the fast relaunch path, torch's
allocations and ops, autograd) without the C launcher's own work (argument parsing and cuLaunchKernel, a few us per
launch on the GPU machine) and with triton's driver queries at their cheapest.

The torch ops of a call (allocations, views, the sums of split partials) run for real on the CPU, where their compute
is small at the default K = N = 64, except cuBLAS's main loop (Tensor.addmm_, one per forward and one per backward at
M > 64): a bf16 matmul costs about 30 us on the CPU whatever its size, so it is replaced by a no-op (its host cost on
the GPU, a cuBLAS launch, is not counted). `--no-launch` also makes the plans' relaunches of compiled kernels no-ops
(launch._fast_launch_op): the Python of a call without its launches.

Prints us per call for the forward alone (no_grad) and forward + backward (torch.autograd.grad wrt x, A and B), the
fastest of 7 batches (other processes on a shared machine only ever add time); --profile prints cProfile's top
entries for one (M, p) case. --dora runs dora_linear (backend="triton", its fast path: the DoRA kernels launched
through the same stand-ins) next to lora_linear, grads also wrt the magnitude: the DoRA wrapper's own host time is
the difference.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the harness follows the GPU's branches, the interpreter's differ")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SMS = 132
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]  # this checkout; tests/ for the stand-in driver
from fake_triton_driver import FakeDriver  # noqa: E402


def _no_launch(*args):
    return None


class _FakeCompiled:
    """What JITFunction.run returns: a compiled kernel whose launcher does nothing."""
    function = 1
    packed_metadata = (4, 1, 0)
    run = staticmethod(_no_launch)


_FAKE = _FakeCompiled()
JIT_LAUNCHES = [0]


def _jit_run(self, *args, grid, warmup, **kwargs):
    JIT_LAUNCHES[0] += 1
    return _FAKE


def _tune_first(self, *args, **kwargs):  # the autotuner without benchmarks: its first config
    self.best_config = self.configs[0]
    return self.fn.run(*args, **kwargs, **self.best_config.all_kwargs())


def install(no_launch: bool = False):
    """Installs the stand-ins and returns lora_kernels, ready for backend="triton" on CPU tensors."""
    driver.set_active(FakeDriver())
    JITFunction.run = _jit_run
    Autotuner.run = _tune_first
    torch.Tensor.addmm_ = lambda self, a, b: self  # cuBLAS's main loop (see the module docstring)
    import lora_kernels
    from lora_kernels import _dispatch
    import lora_kernels.backends.triton as tb
    from lora_kernels.backends.triton import configs, launch

    tb.is_available = launch.is_available = lambda: (True, "stub")
    _dispatch._check_device = lambda name, device_type: None
    _dispatch._load.cache_clear()
    _dispatch._resolve_name.cache_clear()
    sms = lambda device: SMS  # noqa: E731
    for mod in (configs, launch):
        if hasattr(mod, "_num_sms"):
            mod._num_sms = sms
    from lora_kernels import dora, dora_kernels
    dora.triton_usable = dora_kernels.triton_usable = lambda device: True  # DoRA's fast path on CPU tensors
    if no_launch:  # the plans' relaunches made no-ops (their first run still launches through the stand-in JIT)
        launch._fast_launch_op = launch._no_launch_op
    assert triton.__version__  # (kept imported: the kernels' module reads it)
    return lora_kernels


def per_call_us(fn, n: int, batches: int = 7) -> float:
    for _ in range(50):
        fn()
    runs = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return min(runs)


def cases(lk, M, K, N, r, p, dora=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).requires_grad_()
    W = torch.randn(N, K, generator=g).to(torch.bfloat16)
    A = torch.randn(r, K, generator=g).requires_grad_()
    B = torch.randn(N, r, generator=g).requires_grad_()
    m = (torch.rand(N, generator=g) + 0.5).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(torch.bfloat16)
    if dora:
        call, wrt = (lambda: lk.dora_linear(x, W, None, A, B, 2.0, m, dropout_p=p, backend="triton")), (x, A, B, m)
    else:
        call, wrt = (lambda: lk.lora_linear(x, W, None, A, B, 2.0, dropout_p=p, backend="triton")), (x, A, B)

    def fwd():
        with torch.no_grad():
            return call()

    def fwd_bwd():
        return torch.autograd.grad(call(), wrt, dy)

    return fwd, fwd_bwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="16,2048")
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", default="0,0.1")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--profile", default="", help="M,p: cProfile of fwd+bwd for that case")
    ap.add_argument("--no-launch", action="store_true", help="the plans' relaunches made no-ops")
    ap.add_argument("--dora", action="store_true", help="dora_linear next to lora_linear")
    a = ap.parse_args()
    torch.set_num_threads(1)
    lk = install(a.no_launch)
    print(f"torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}; "
          f"K={a.K} N={a.N} r={a.r}; us per call (fastest of 7 batches of {a.n})")
    print(f"{'M':>6} {'p':>5} {'op':>5} {'fwd':>9} {'fwd+bwd':>9}")
    for M in (int(v) for v in a.M.split(",")):
        for p, dora in ((float(v), d) for v in a.p.split(",") for d in ((False, True) if a.dora else (False,))):
            fwd, fwd_bwd = cases(lk, M, a.K, a.N, a.r, p, dora)
            jit_before = JIT_LAUNCHES[0]
            for _ in range(3):
                fwd_bwd()
            jit_warm = JIT_LAUNCHES[0]
            f_us, fb_us = per_call_us(fwd, a.n), per_call_us(fwd_bwd, a.n)
            extra = JIT_LAUNCHES[0] - jit_warm
            print(f"{M:>6} {p:>5} {'dora' if dora else 'lora':>5} {f_us:>9.1f} {fb_us:>9.1f}"
                  + (f"   ({extra} JIT launches after warm-up!)" if extra else "")
                  + ("" if jit_warm > jit_before else "   (no JIT launch at all?)"))
    if a.profile:
        M, p = a.profile.split(",")
        _, fwd_bwd = cases(lk, int(M), a.K, a.N, a.r, float(p), a.dora)
        for _ in range(10):
            fwd_bwd()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fwd_bwd()
        prof.disable()
        pstats.Stats(prof).sort_stats(os.environ.get("HOST_SORT", "tottime")).print_stats(int(os.environ.get("HOST_TOP", "30")))


if __name__ == "__main__":
    main()
