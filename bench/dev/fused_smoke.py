"""Smoke run of the cuda backend's forward on a few shapes: path, max error against a float64 formula relative to the
output's scale, and whether a second call is bit-identical. Run under `timeout` (a wait that never ends shows as one).

    python3 bench/dev/fused_smoke.py
"""
import torch

from lora_kernels.backends import cuda_backend as cb

S = 0.75
for M, K, N, r, adt in ((256, 512, 512, 16, torch.float32), (1000, 520, 1032, 17, torch.float32),
                        (8192, 4096, 4096, 16, torch.float32), (2048, 4096, 1024, 64, torch.bfloat16),
                        (300, 200, 136, 64, torch.float32)):
    x = torch.randn(M, K, device="cuda").bfloat16()
    W = (torch.randn(N, K, device="cuda") * K ** -0.5).bfloat16()
    b = torch.randn(N, device="cuda").bfloat16()
    A = (torch.randn(r, K, device="cuda") * K ** -0.5).to(adt)
    B = (torch.randn(N, r, device="cuda") * r ** -0.5).to(adt)
    path = cb.forward_path(x, W, b, A, B, 0.0)
    y, u = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    y2, u2 = cb.forward(x, W, b, A, B, S, 0.0, 0, 0)
    torch.cuda.synchronize()
    u64 = S * (x.double() @ A.double().t())
    y64 = x.double() @ W.double().t() + b.double() + u64 @ B.double().t()
    ey = ((y.double() - y64).abs().max() / y64.abs().max()).item()
    eu = ((u.double() - u64).abs().max() / u64.abs().max()).item()
    print(f"{M}x{K}->{N} r={r} {adt}: {path}; rel err y {ey:.2e} u {eu:.2e}; "
          f"repeat identical {torch.equal(y, y2) and torch.equal(u, u2)}", flush=True)
