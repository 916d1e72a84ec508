"""A small forward + backward of the CUDA backend (odd sizes, dropout, fp32 adapters; DoRA's two ops) for
compute-sanitizer:
    compute-sanitizer --tool memcheck python3 bench/tools/sanitize_cuda.py
    compute-sanitizer --tool racecheck python3 bench/tools/sanitize_cuda.py --dora
(--dora: the DoRA cases alone. Run racecheck without a --kernel-name filter: with one, the program fails in its first
forward with illegal memory accesses, before the filtered kernel runs.)"""
import sys

import torch

import lora_kernels


def fwd_bwd(M, K, N, r, p, dtype, adapter, bias=True, scaled=False):
    """One lora_linear forward + backward on fresh random inputs (scaled: W and A by K^-1/2, values of a layer's
    size)."""
    s = K ** -0.5 if scaled else 1.0
    x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, device="cuda", dtype=dtype) * s
    b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
    A = (torch.randn(r, K, device="cuda", dtype=adapter) * s).requires_grad_()
    B = torch.randn(N, r, device="cuda", dtype=adapter, requires_grad=True)
    lora_kernels.lora_linear(x, W, b, A, B, 0.5, dropout_p=p, backend="cuda").float().sum().backward()


def lora_cases():
    for dtype, adapter in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                           (torch.float32, torch.float32)):
        # K % 128 == 0 with dropout: dx's sm_90 GEMM masks its extension with the keep bits (TMA of the bits)
        for M, K, N, r, p in ((1, 40, 24, 1, 0.0), (37, 100, 72, 33, 0.3), (130, 264, 136, 256, 0.1),
                              (131, 384, 136, 64, 0.1), (70, 256, 200, 16, 0.2),
                              # dropout at r <= 16, K >= 320: dA's masked ring of 6 stages, its keep bits staged by the
                              # loader (K % 32 == 0) or read from global memory (K = 328)
                              (150, 320, 136, 16, 0.1), (150, 328, 200, 8, 0.1),
                              # p = 0, M > 64: the fused sm_90 forward, u tiles (fp32 adapters at r = 33: 5 lead tiles
                              # do not fit N = 136's 2 tile columns) and lead tiles (the rest; fp16 adapters at r = 16:
                              # no prep launch, lora_A and lora_B read as they are)
                              (300, 264, 136, 33, 0.0), (200, 72, 264, 16, 0.0),
                              # p = 0, K and N >= 2048: the lead tiles' wide variant (128 x 256 tiles, cooperative), a
                              # partial last tile column and K-tile
                              (200, 2056, 2056, 16, 0.0),
                              # p = 0, more items than one wave of clusters (fp32 adapters at r = 64: 18 row blocks of
                              # 4 lead clusters): the second wave takes its K-tiles in decreasing order
                              (2200, 264, 1032, 64, 0.0)):
            fwd_bwd(M, K, N, r, p, dtype, adapter)
    if torch.cuda.get_device_capability() == (9, 0):  # the fused forward with dropout (opt-in): u tiles, lead tiles
        from lora_kernels.backends import cuda_backend

        # mode 1 (u tiles) for both 16-bit x dtypes; mode 2 (lead tiles: fp32 adapters on bf16 x), whose keep bytes load
        # 8 at a time at K = 1024 and one at a time at K = 1000
        previous = cuda_backend.set_fused_forward(1)
        for mode, dtype, adapter, cases in (
                (1, torch.bfloat16, torch.float32, ((300, 264, 136, 33, 0.2), (131, 1000, 264, 16, 0.5))),
                (1, torch.float16, torch.float16, ((300, 264, 136, 33, 0.2), (131, 1000, 264, 16, 0.5))),
                (2, torch.bfloat16, torch.float32, ((200, 1024, 264, 16, 0.1), (131, 1000, 392, 24, 0.3)))):
            cuda_backend.set_fused_forward(mode)
            for M, K, N, r, p in cases:
                fwd_bwd(M, K, N, r, p, dtype, adapter, bias=False)
        cuda_backend.set_fused_forward(previous)
    # the small-M forward: the register-direct kernel with dropout and with fewer item blocks than items (one wave of
    # 256 tiles at N = 4096), the FFMA kernel; on Hopper the wgmma kernel (16-bit adapters, p = 0) in clusters of 4
    # and 8 with partial K and N tiles, and without a K split (48 tokens, r = 24), and its backward (the same kernel
    # transposed, then small_m_grads.cu) where N % 8 == 0 (all but N = 300)
    for M, K, N, r, p, dtype, adapter in ((16, 4096, 4096, 16, 0.1, torch.bfloat16, torch.float32),
                                          (64, 1024, 1000, 64, 0.0, torch.float16, torch.float16),
                                          (3, 40, 24, 5, 0.0, torch.float32, torch.float32),
                                          (16, 4096, 4096, 16, 0.0, torch.bfloat16, torch.bfloat16),
                                          (33, 1000, 300, 8, 0.0, torch.float16, torch.float16),
                                          (48, 136, 200, 24, 0.0, torch.bfloat16, torch.bfloat16)):
        fwd_bwd(M, K, N, r, p, dtype, adapter, scaled=True)


if "--dora" not in sys.argv:
    lora_cases()
# DoRA on the cuda backend, its C++ entry: at p = 0 (csrc/dora_*.cu: the combine, the 16-byte colsum pass at N % 8 = 0
# and the scalar one elsewhere, row splits past M at 8449 x 1000, around forward_scaled and backward_dx_from; the
# saved-y recompute of z in every column, B being large against W here: csrc/dora_dmag.cu's tensor-core kernel at
# K % 8 = 0, with partial row, column and K tiles at 300 x 136 -> 200 and r = 40 in two chunks, its float32 kernel at
# K = 100, 40, 43); at p > 0 its dropout node (csrc/dora_dropout.cu's masking pass, vectorised at K % 8 = 0 and scalar
# at K = 43, the colsum from z, dmag / q), in one row chunk and, at 2000 rows, in chunks of 256
from lora_kernels import dora  # noqa: E402

for M, K, N, r, p, chunk in ((300, 264, 136, 16, 0.0, 0), (300, 136, 200, 40, 0.0, 0), (37, 100, 72, 8, 0.0, 0),
                             (131, 256, 200, 16, 0.2, 0),
                             (93, 40, 75, 4, 0.0, 0), (8449, 64, 1000, 4, 0.0, 0), (93, 43, 75, 4, 0.3, 0),
                             (2000, 256, 320, 16, 0.1, 256 * (256 + 320) * 2)):
    dora.BWD_CHUNK_BYTES = chunk or 64 << 20
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    A = (torch.randn(r, K, device="cuda") / K ** 0.5).requires_grad_()
    B = torch.randn(N, r, device="cuda").requires_grad_()
    m = torch.rand(N, device="cuda") + 0.5
    m[N // 2] = 0.0  # g = 0 in one column: the magnitude's grad recomputes z there
    m.requires_grad_()
    lora_kernels.dora_linear(x, W, b, A, B, 0.5, m, dropout_p=p, backend="cuda").float().sum().backward()
torch.cuda.synchronize()
print("sanitize run done")
