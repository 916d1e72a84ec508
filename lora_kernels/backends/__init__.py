"""Backends of the LoRA op. Each backend is one module exposing the same two functions.

The contract every backend implements (all tensors already validated and made 2-D contiguous by
``lora_kernels.ops``; ``r >= 1``, ``M >= 0``):

    forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset) -> (y, u)
        x (M, K) in fp16/bf16/fp32; weight (N, K) and bias (N,) or None in x's dtype;
        lora_A (r, K), lora_B (N, r), each fp32 or x's dtype.
        u = scaling * dropout(x) @ lora_A.T          (M, r), float32
        y = x @ weight.T + bias + u @ lora_B.T       (M, N), x's dtype, fp32 accumulation

    backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB)
        -> (dx or None, dA or None, dB or None)
        g  = dy @ lora_B                              (M, r), fp32
        dx = dy @ weight + scaling * keep/(1-p) * (g @ lora_A)     x's dtype
        dA = scaling * g.T @ dropout(x)                            lora_A's dtype
        dB = dy.T @ u                                              lora_B's dtype

    dropout(x) = x * keep / (1 - p), keep = lora_kernels.philox.dropout_mask(seed, offset, (M, K), p);
    with p == 0 there is no dropout and seed/offset are ignored.

    seed: a Python int (eager calls), or, for the backends in ``lora_kernels._dispatch.DEVICE_SEED_BACKENDS``, a
    0-d int64 tensor on x's device that the kernels read when they run (CUDA graphs and torch.compile: each replay
    refills it). Either form must give the same mask for the same 64 bits, and neither may make the host wait for
    the device: no .item(), no host copies, no data-dependent Python branches on device values.

Optional: ``linear_autograd(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset) -> y`` (or None), the
backend's own autograd node for eager calls that need grads (M >= 1) with a frozen weight and bias, with the
gradients of forward/backward above. The cuda backend provides one in C++ (csrc/lora_autograd.h); without it, or
when the weight or bias requires grad, ``lora_kernels.ops`` wraps forward/backward in a Python autograd.Function
(which holds the one definition of the base weight's and bias's grads).

Optional, for DoRA (``lora_kernels.dora``, which takes them when present, else its own passes around forward and
backward):
    forward_scaled(x, weight, bias, lora_A, lora_B, col_scale, scaling, p, seed, offset) -> (y, u)
        y = col_scale ⊙ (x @ weight.T + u @ lora_B.T) + bias,  col_scale (N,) float32  (cuda, triton: in the epilogue)
    backward_dx_from(dy, x, weight, lora_A, lora_B, u, dx_from, scaling, p, seed, offset, need_dx, need_dA, need_dB)
        backward with dx = dx_from @ weight + scaling * keep/(1-p) * (g @ lora_A), dx_from (M, N) in x's dtype;
        g, dA, dB from dy as above                                                     (cuda, triton)

The mask (see ``lora_kernels/philox.py``): element (m, k) of the (M, K) input uses Philox 4x32-10 counter
c = offset + m * ceil(K / 8) + k // 8 (c0 = low 32 bits, c1 = high 32 bits, c2 = c3 = 0; key = seed low/high
32 bits), output word (k % 8) // 2, and of it the low 16 bits for even k, the high 16 bits for odd k; it is kept iff
those bits are >= ceil(65536 * p) with p rounded to float32 (``philox.keep_threshold``).
"""
