"""The cuda backend's dropout keep bits (csrc/dropout_bits.cu): with dropout and 16-bit x, the forward makes the
mask's keep bits in a pass of its own and the shrink reads them (unless the shrink makes the mask itself,
csrc/shrink_drop.cu); the backward makes them once and dx and dA read them. GPU-only (skips elsewhere): the launches
are where they should be (a profiler count), and the results with odd K (rows of keep bytes that are not whole 4-byte
words, and 8-groups cut by K's end), odd M and misaligned inputs meet the float64 tolerance rule against the
contract's mask, with every output poisoned first."""
import pytest
import torch

import lora_kernels

from conftest import HAS_CUDA
from test_contract import run_and_check

pytestmark = [
    pytest.mark.usefixtures("poisoned_outputs"),
    pytest.mark.skipif(not HAS_CUDA or "cuda" not in lora_kernels.available_backends(),
                       reason="needs the cuda backend on a GPU"),
]


def _kernels(fn):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("shrink_drop", [0, 1])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_keep_bits_made_once_per_forward_and_per_backward(adapter_dtype, shrink_drop):
    # shrink_drop 1: the forward's shrink makes the mask itself (csrc/shrink_drop.cu, the default at r <= 16 on
    # compute capability 9.0), so the forward makes no keep bits; 0: the keep-bits pass, then the shrink that reads them
    from lora_kernels.backends import cuda_backend

    M, K, N, r = 300, 520, 264, 16
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    A = (torch.randn(r, K, device="cuda", dtype=adapter_dtype) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, r, device="cuda", dtype=adapter_dtype) * r ** -0.5).requires_grad_()
    previous = cuda_backend.set_shrink_drop(shrink_drop)
    try:
        made_in_shrink = cuda_backend.shrink_path(x, A, 0.1) == "dropout"
        assert made_in_shrink == bool(shrink_drop) or torch.cuda.get_device_capability()[0] < 8
        y = lora_kernels.lora_linear(x, W, None, A, B, 0.5, dropout_p=0.1, backend="cuda")  # warm-up
        y.sum().backward()
        out = {}
        fwd = _kernels(lambda: out.setdefault("y", lora_kernels.lora_linear(x, W, None, A, B, 0.5, dropout_p=0.1,
                                                                             backend="cuda")))
        bwd = _kernels(lambda: out["y"].backward(torch.randn_like(out["y"])))
    finally:
        cuda_backend.set_shrink_drop(previous)
    assert sum("dropout_keep_bits" in k for k in fwd) == (0 if made_in_shrink else 1), fwd
    assert sum("shrink_drop_kernel" in k for k in fwd) == (1 if made_in_shrink else 0), fwd
    assert sum("dropout_keep_bits" in k for k in bwd) == 1, bwd
    # no dropout, no bits
    assert not any("dropout_keep_bits" in k for k in _kernels(
        lambda: lora_kernels.lora_linear(x, W, None, A, B, 0.5, dropout_p=0.0, backend="cuda").sum().backward()))


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("lead,K,N,r", [((300,), 520, 264, 16), ((65,), 37, 40, 8), ((3, 43), 100, 72, 32),
                                        ((129,), 4104, 136, 64), ((70,), 24, 1000, 4)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_bits_results_meet_the_tolerance_rule(dtype, adapter_dtype, lead, K, N, r, p):
    run_and_check("cuda", "cuda", dtype, lead, K, N, r, bias=True, p=p, adapter_dtype=adapter_dtype)


def test_keep_bits_misaligned_and_strided_x():
    # x 2 elements past a 16-byte boundary, and a column slice of a wider tensor
    def misalign(x):
        buf = torch.empty(x.numel() + 2, device=x.device, dtype=x.dtype)
        buf[2:].copy_(x.reshape(-1))
        return buf[2:].view(x.shape)

    run_and_check("cuda", "cuda", torch.bfloat16, (200,), 136, 72, 16, bias=True, p=0.2,
                  adapter_dtype=torch.float32, x_transform=misalign)
    run_and_check("cuda", "cuda", torch.bfloat16, (200,), 136, 72, 16, bias=False, p=0.2,
                  adapter_dtype=torch.float32, x_transform=lambda x: torch.cat([x, x], 1)[:, 3:3 + x.shape[1]])
