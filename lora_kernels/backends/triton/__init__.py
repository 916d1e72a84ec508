"""Triton backend of the LoRA op (contract: ``lora_kernels/backends/__init__.py``).

    kernels/     the @triton.jit kernels, one file per pass (shrink, output_gemm, small_m, dy_pass, sums), and
                 common.py, the shared tile math (dot operands, the dropout mask)
    configs.py   tile shapes, pipeline stages, autotune candidates and their shared-memory budget, M splits, the
                 TMA kernel's fixed configs
    launch.py    forward and backward: each pass's launches, recorded once per distinct call (a plan) and
                 replayed, and the fast relaunch of compiled kernels

Math (x: (M, K), W: (N, K), A: (r, K), B: (N, r), s = scaling, keep = dropout mask of (M, K), q = 1 - p), with the
pass names of csrc/:

    forward    shrink   u  = s/q * (keep * x) @ A^T              _shrink_kernel       (M, r) fp32
               expand   y  = x @ W^T + u @ B^T + b               _output_gemm_kernel  (M, N) x.dtype
                                                                 (or _output_gemm_tma_kernel)
               (M <= SMALL_M: both in one launch                 _small_m_kernel)
    backward   dy pass  g  = dy @ B     (and dB = dy^T @ u)      _dy_pass_kernel      (M, r) fp32, one read of dy
               dA       dA = s/q * g^T @ (keep * x)              _shrink_kernel       (r, K)
                        (the shrink of x^T by g: dA^T = s/q * (keep * x)^T @ g; likewise dB = dy^T @ u where
                        the dy pass does not fuse it)
               dx       dx = dy @ W + keep * s/q * (g @ A)       _output_gemm_kernel  (M, K) x.dtype
                                                                 (or _output_gemm_tma_kernel)
               reduce   dA, dB from their split partials (fixed order),    _sum_partials_kernel one launch
                        in the adapters' dtype

Cost (2-byte dtype, r << N, K): the two big GEMMs are 2*M*N*K FLOPs each and move about
2*(M*K + N*K + M*N) bytes (plus re-reads absorbed by L2 thanks to grouped tile order); the rank-r terms add
2*M*r*(N + K) FLOPs per pass and read x or dy once more (2*M*K or 2*M*N bytes), so the LoRA overhead is
an O(r/N + r/K) fraction of the FLOPs and roughly one extra read of the activations per pass.

Tiling: the big GEMMs tile the output (BM, BN) in grouped (swizzled) order and loop over K with BK; the
rank-r term is one more K-step of width R_PAD (r padded to a power of two >= 16 with masked loads) into the
same fp32 accumulator. When dropout is on, the dx LoRA term must be masked per element, so it is a separate
(BM, R_PAD) x (R_PAD, BN) dot in the epilogue with the mask regenerated for the output tile. The helper
kernels loop over the long dimension; every reduction is deterministic (no atomics): partials are written
to a buffer per M-chunk and summed in a fixed order by one launch at the end of the backward.

Main loop (``LORA_KERNELS_TRITON_MAINLOOP``; ``auto``, the default, picks per pass as described below): either the
TMA kernel below (Hopper, r <= 16, not dx with dropout), or cuBLAS with the LoRA work fused around it:
``_output_gemm_kernel`` runs with zero main K-steps to write ``[keep *] lora_scale * l @ lb + bias`` (one write of
the output), then ``c.addmm_(a, b)`` accumulates the GEMM into it with beta = 1, reading c in cuBLAS's epilogue,
which overlaps the compute-bound main loop. Extra traffic per pass: one read of x (shrink) or dy (g, dB) and one
write of the output. ``triton`` selects the all-Triton, pointer-based main loop of ``_output_gemm_kernel`` (always
so on the CPU under the interpreter); it runs at 0.81x cuBLAS's throughput (the first probe's Triton loops, before
the TMA kernel below, reached 0.66-0.86x: bench/results/gemm_probe_h200.md).

``LORA_KERNELS_TRITON_MAINLOOP=tma`` selects ``_output_gemm_tma_kernel`` for the expand and dx (``auto``, the
default, does where it measured faster: below): one launch computes the whole
``a @ b + [keep *] lora_scale * l @ lb + bias``, its main loop reading a and W through TMA tensor descriptors
(host-side ``TensorDescriptor``s, made from each call's tensors when its plan runs), persistent (one program per SM
walking the output tiles in grouped order), the tile and K loops flattened into one pipelined loop, then the rank-r
K-step into the same fp32 accumulator, the mask (dx with dropout), DoRA's column scale (``forward_scaled``) and the
bias in the epilogue, and the output stored through a descriptor (whole, or in two halves where the whole tile's
staging would not fit: ``configs._tma_config``); the rank-r math and its precision are those of
``_output_gemm_kernel`` (the shared ``kernels._lora_add``). The rank-r operands l (u or g) and lb (B or A as stored) are read through TMA descriptors
too wherever TMA can describe them (``launch._rank_tma_layout``: 16-byte aligned bases and row strides, so r % 4 ==
0, and r % 8 == 0 for the forward's 16-bit B); elsewhere through masked pointer loads (``kernels._lora_epilogue``).
Why: triton 3.6 + ptxas serialise every wgmma of the kernel, the main loop's included (ptxas warning C7515), when
the epilogue's rank-r dot takes pointer-loaded operands (static analysis:
bench/results/h200_2026-12-03/session28/triton_tma_compile_analysis.md). Its main loop is the ``tma_persistent``
kernel of bench/dev/triton_gemm_probe.py, which measured 0.977x cuBLAS's throughput (geomean, worst cell 0.922x) on
an H200 (triton 3.6, torch 2.11) over the four Llama-3-8B projections at M = 2048 and 8192, bf16 and fp16, with
128x256x64 tiles, 3 stages, 8 warps (128x128x64, 4 stages, 4 warps for 4096->1024 at M = 2048; configs._tma_config);
the pointer-based loop of ``_output_gemm_kernel`` reached 0.81x in the same run. In the whole layer (M = 8192, bf16
adapters, the four shapes, H200, bench/results/h200_2026-12-03/session29) it beats the cuBLAS main loop at r = 16 (p
= 0: forward 1.062-1.298x the floor against 1.083-1.361x, forward+backward 1.114-1.496x against 1.132-1.715x; p =
0.1: forward 1.095-1.639x against 1.130-1.732x), and loses at r = 32 and 64 and in dx with dropout (the mask in its
epilogue: forward+backward 1.366-2.106x against 1.183-2.208x at p = 0.1). So ``auto`` takes it at r <= 16
(configs._TMA_AUTO_MAX_R_PAD) except for dx with dropout. (Before the rank-r operands came through descriptors its
serialised wgmmas made it slower everywhere: forward 1.467 against 1.238, session 28.) Calls it cannot take run as
with the default (cuBLAS; under the interpreter the pointer-based loop): no GPU of compute capability 9.0 or newer,
fp32 activations, W of another dtype than x, M <= SMALL_M, K = 0, r > 64 (configs._TMA_MAX_R_PAD), an operand whose
rows are not contiguous or whose address or row stride is not a multiple of 16 bytes (K and N multiples of 8 for
16-bit types), or a triton without ``triton.tools.tensor_descriptor``. ``launch._GEMM_PATHS`` records which main
loop each planned output pass got, and why the TMA kernel did not take it. Under TRITON_INTERPRET=1 the TMA kernel
runs on CPU tensors (32x32x32 tiles).

Precision policy: each product runs in the precision PyTorch uses for the same inputs, accumulation is fp32. The
big GEMMs cast their tiles to x's dtype. The adapter products (u, g, dA, dB) do too when the adapters have x's
dtype; with fp32 adapters on a 16-bit x (PEFT's default) they run in fp32 (``configs._rank_f32``), since PyTorch
computes them in fp32: on a bf16 x as the bf16x3 split on tensor cores (``kernels._rank_dot``;
``LORA_KERNELS_TRITON_FP32_SPLIT=0`` turns it off), on an fp16 x as fp32 "ieee" dots. So does the rank-r term of
the expand and dx (u Bᵀ, g A) wherever the pass rounds its output once: the TMA and Triton main loops split both
operands into two 16-bit pieces and add the four products in one dot of K = 4 r (``kernels._rank_expand``), the
small-M forward takes an fp32 dot; the cuBLAS main loop's prefill, which writes the term in x's dtype for cuBLAS to
add to (two roundings either way), rounds u and B (g and A) to x's dtype, as 16-bit adapters do.
fp32 inputs get full-fp32 dots (``input_precision="ieee"``) so that fp32 results meet the same error bound as
PyTorch's fp32 matmul: TF32 dots give errors on y three to four orders of magnitude larger, far outside the
tolerance rule.
``LORA_KERNELS_TRITON_FP32_PRECISION=tf32`` opts into TF32 for speed. The big fp32 GEMM on GPUs is cuBLAS, which follows
``torch.backends.cuda.matmul.allow_tf32``.

Dropout mask: Philox 4x32-10 via ``tl.philox`` generated inside the kernels (``kernels._keep_mask``, one call per
8 columns), bit-identical to ``lora_kernels.philox.dropout_mask``; with p == 0 no mask code is compiled (constexpr
HAS_DROPOUT).

Importing this package needs triton; where triton does not import, the dispatcher reports the import error as the
reason the backend is unavailable. The settings it reads are listed in ``lora_kernels/_config.py``.
"""
from .configs import _HOPPER_SMEM, _max_smem, _num_sms, _smem_per_block
from .launch import _launch, _seed_args, backward, backward_dx_from, forward, forward_scaled, is_available

# _launch, _num_sms, _seed_args and the shared-memory budget (_smem_per_block, _max_smem, _HOPPER_SMEM) also serve
# the launches of DoRA's Triton passes (kernels/dora_*.py, launched by lora_kernels/dora_kernels.py);
# forward_scaled (the column scale in the output pass's epilogue) serves DoRA's forward, backward_dx_from (dx's
# frozen product from another operand than dy) its backward.
__all__ = ["backward", "backward_dx_from", "forward", "forward_scaled", "is_available", "_launch", "_num_sms",
           "_seed_args", "_smem_per_block", "_max_smem", "_HOPPER_SMEM"]
