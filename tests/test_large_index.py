"""Tensors past 2^31 elements, the int32 index range: lora_linear and dora_linear, forward and every grad, against
float64 math over the whole tensors.

A kernel that computes an element's offset as a 32-bit product (row × row length, block × split size) writes past
2^31 elements to a wrapped address: a crash, or rows left unwritten and other memory overwritten. Real calls get
there: LoRA on an lm_head (N = 128256) at 16,768 tokens has a 2.1G-element y. Two shapes, each with one tensor past
2^31 elements and the rest small: y and dy (M × N), then x and dx (M × K). bf16 x and W, float32 adapters (PEFT's
default), r = 16, with and without dropout.

The reference runs by row chunks in float64 (each row of y and dx depends on its own row of x, dy and the mask; the
adapters' and the magnitude's grads are sums over the chunks), beside the same chunks in the inputs' precision (the
tolerance rule's baseline, PEFT's formula). The dropout mask of a chunk is the contract's mask at the counter offset
of its first row. Outputs are NaN-poisoned (the Python backends' torch.empty, and the caching allocator's free
block that the largest output will take), so an element left unwritten fails.

On a GPU with enough memory the shapes are the large ones; elsewhere (CI) a small shape runs the same code, which
checks the test's own reference and chunking.
"""
import contextlib
import fcntl
import os
import tempfile
import time

import pytest
import torch

import lora_kernels
from lora_kernels import ops, philox

from conftest import HAS_CUDA, assert_errors_within, backend_cases, err, formula, rounding_floor
from test_dora import peft_formula

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

# (name, M, K, N, rows per reference chunk): one tensor of each shape past 2^31 elements (M × N = 2,149,580,800;
# M × K the same), chunks of about 2^27 float64 elements; the small shape in five chunks, the last one short
LARGE = [("MxN past 2^31", 65600, 256, 32768, 4096), ("MxK past 2^31", 65600, 32768, 256, 4096)]
SMALL = [("small", 300, 40, 72, 64)]
R, S = 16, 0.75


def _big_gpu() -> bool:
    return HAS_CUDA and torch.cuda.get_device_properties(0).total_memory >= 60 * 2**30


def _cases():
    out = []
    for backend, device in backend_cases():
        if backend == "torch" and device == "cuda":
            continue  # the reference backend's math is torch's own
        for name, M, K, N, rows in (LARGE if device == "cuda" and _big_gpu() else SMALL):
            out.append(pytest.param(backend, device, M, K, N, rows, id=f"{backend}-{device}-{name}"))
    return out


@contextlib.contextmanager
def _one_at_a_time(device, nbytes):
    """The large cases take 10-25 GB of GPU memory each: across the suite's xdist workers, which share one GPU,
    they run one at a time (a file lock), each waits (up to 10 minutes) until the other workers leave it `nbytes`
    free, and each gives its cached memory back when it ends. Without the wait, 16 workers' other tests held enough
    that two large cases ran out of memory (session 62)."""
    if device != "cuda":
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "lora_kernels_large_index.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            deadline = time.monotonic() + 600
            while torch.cuda.mem_get_info()[0] < nbytes and time.monotonic() < deadline:
                time.sleep(1)
            yield
        finally:
            torch.cuda.empty_cache()  # the cached blocks back to the driver, for the other workers
            fcntl.flock(f, fcntl.LOCK_UN)


def _inputs(M, K, N, device, dora):
    g = torch.Generator(device=device).manual_seed(M + K + N)
    x = torch.randn(M, K, device=device, generator=g, dtype=torch.bfloat16)  # no float32 copy of a large tensor
    W = (torch.randn(N, K, device=device, generator=g) / K**0.5).bfloat16()
    b = torch.randn(N, device=device, generator=g).bfloat16()
    A = torch.randn(R, K, device=device, generator=g) / K**0.5
    B = torch.randn(N, R, device=device, generator=g) / R**0.5
    m = None
    if dora:
        norm = torch.linalg.vector_norm(W.double() + S * (B.double() @ A.double()), dim=1)
        m = (norm * (0.5 + torch.rand(N, device=device, generator=g, dtype=torch.float64))).float()
    dy = torch.randn(M, N, device=device, generator=g, dtype=torch.bfloat16)
    return x, W, b, A, B, m, dy


def _poison_the_allocator(nbytes, device):
    # the CUDA caching allocator hands a freed block to the next request it fits: the C++ backend's largest output
    if device == "cuda":
        torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(0xFF)  # 0xFFFF: a bf16 NaN
        torch.cuda.synchronize()


class _Rule:
    """The tolerance rule of conftest.assert_tolerance (error vs float64 <= 2× the baseline's error + 2·eps·max|ref|),
    taken over chunks: the largest errors and the largest |ref| of all of them."""

    def __init__(self, name, dtype):
        self.name, self.dtype, self.e, self.e0, self.ref_max = name, dtype, 0.0, 0.0, 0.0

    def add(self, got, ref64, base):
        assert torch.isfinite(got).all(), f"{self.name}: non-finite values (an element left unwritten?)"
        self.e = max(self.e, err(got, ref64))
        self.e0 = max(self.e0, err(base, ref64))
        self.ref_max = max(self.ref_max, ref64.abs().max().item() if ref64.numel() else 0.0)

    def check(self):
        assert_errors_within(self.name, self.e, self.e0, rounding_floor(self.dtype, self.ref_max))


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
@pytest.mark.parametrize("backend,device,M,K,N,rows", _cases())
def test_past_int32_indices(backend, device, M, K, N, rows, op, p):
    # an estimate of the case's peak: six of its largest tensor (x or dy, y or dx, the poison block, the chunks of
    # the reference and of the baseline, slack)
    with _one_at_a_time(device, 6 * 2 * M * max(K, N)):
        dora = op == "dora_linear"
        x, W, b, A, B, m, dy = _inputs(M, K, N, device, dora)
        leaves = [t.requires_grad_() for t in ((x, A, B, m) if dora else (x, A, B))]  # the reference takes .detach()
        _poison_the_allocator(max(M * N, M * K) * 2, device)
        torch.manual_seed(11)
        if dora:
            y = lora_kernels.dora_linear(leaves[0], W, b, leaves[1], leaves[2], S, leaves[3], dropout_p=p,
                                         backend=backend)
        else:
            y = lora_kernels.lora_linear(leaves[0], W, b, leaves[1], leaves[2], S, dropout_p=p, backend=backend)
        _poison_the_allocator(M * K * 2, device)  # dx's block
        y.backward(dy)
        y = y.detach()
        torch.manual_seed(11)
        seed = int(ops._draw_seed()) if p > 0 else None  # the seed the call drew (the contract's key)
        got = dict(zip(("dx", "dA", "dB", "dm"), (t.grad for t in leaves)))
        assert y.shape == (M, N) and y.dtype == x.dtype

        # the reference, by row chunks: y and dx row by row, the other grads summed over the chunks
        rules = {"y": _Rule("y", y.dtype), "dx": _Rule("dx", x.dtype)}
        sums64, sums = {}, {}
        for i in range(0, M, rows):
            j = min(M, i + rows)
            keep = None
            if p > 0:
                keep = philox.dropout_mask(seed, i * philox.calls_per_row(K), (j - i, K), p, device=device)
            for prec, sums_ in (("ref", sums64), ("base", sums)):
                cast = (lambda t: t.double()) if prec == "ref" else (lambda t: t)
                ts = [cast(t).detach().requires_grad_() for t in ((x[i:j], A, B, m) if dora else (x[i:j], A, B))]
                Wc, bc = cast(W), cast(b)
                if dora:
                    out = peft_formula(ts[0], Wc, bc, ts[1], ts[2], S, ts[3], keep, p, gemm_in_x_dtype=True)
                else:
                    out = formula(ts[0], Wc, bc, ts[1], ts[2], S, keep, p)
                out.backward(cast(dy[i:j]).to(out.dtype))
                if prec == "ref":
                    y64, dx64 = out.detach(), ts[0].grad
                else:
                    rules["y"].add(y[i:j], y64, out.detach())
                    rules["dx"].add(got["dx"][i:j], dx64, ts[0].grad)
                for name, t in zip(("dA", "dB", "dm"), ts[1:]):
                    sums_[name] = t.grad if name not in sums_ else sums_[name] + t.grad
        for rule in rules.values():
            rule.check()
        if M * max(K, N) <= 1 << 22:
            # Small enough for one pass: the sums' baseline is the same-precision computation over all rows at once,
            # the rule's own baseline (a sum of per-chunk grads is a blocked sum, more accurate than one reduction
            # over M, and a kernel's or a multi-threaded BLAS's reduction was measured up to 3.3x its error).
            keep = philox.dropout_mask(seed, 0, (M, K), p, device=device) if p > 0 else None
            ts = [t.detach().requires_grad_() for t in ((x, A, B, m) if dora else (x, A, B))]
            if dora:
                out = peft_formula(ts[0], W, b, ts[1], ts[2], S, ts[3], keep, p, gemm_in_x_dtype=True)
            else:
                out = formula(ts[0], W, b, ts[1], ts[2], S, keep, p)
            out.backward(dy.to(out.dtype))
            sums = {name: t.grad for name, t in zip(("dA", "dB", "dm"), ts[1:])}
        for name in sums:
            rule = _Rule(name, got[name].dtype)
            rule.add(got[name], sums64[name], sums[name])
            rule.check()
