"""The Triton kernels of the LoRA op, one pass per file (what each pass computes is in the backend's docstring,
``lora_kernels/backends/triton/__init__.py``; how the host plans and launches them, in ``configs.py`` and
``launch.py``):

    common.py        the shared tile math: dot operands, index blocks, the adapter products' precision, and dropout
                     (the seed, the keep-mask of a tile)
    shrink.py        _shrink_kernel: u = s/q (keep * x) A^T, and dA, dB (a long dimension against a rank-r operand)
    output_gemm.py   _output_gemm_kernel, _output_gemm_tma_kernel: the expand (y) and dx, a @ b with the rank-r term
                     and the bias in the epilogue
    small_m.py       _small_m_kernel: the forward in one launch at M <= SMALL_M
    dy_pass.py       _dy_pass_kernel: g = dy B and dB's partials, one read of dy
    sums.py          _sum_partials_kernel: dA's and dB's split partials summed, one launch

and the passes of the DoRA op (launched by ``lora_kernels/dora_kernels.py``, which says what each computes):

    dora_scale_bias.py   c ⊙ z + b            dora_colsum.py   c ⊙ dy and Σ_m dy ⊙ z
    dora_zero_g.py       Σ_m dy ⊙ z where y cannot give z         dora_masked.py   the dropout pass
    dora_w_at.py         W Aᵀ, the row norm's pass over W         dora_norm.py     the row norm's combine
"""
from .common import (_FP32_SPLIT, _PER_CALL_SCALARS, _WIDEN_BF16, _apply_keep, _block, _keep_mask, _load_seed, _mm,
                     _rank_dot, _rank_operand)
from .dy_pass import _dy_pass_kernel
from .output_gemm import _grouped_tile, _lora_add, _lora_epilogue, _output_gemm_kernel, _output_gemm_tma_kernel
from .shrink import _shrink_kernel
from .small_m import _small_m_kernel
from .sums import _sum_partials_kernel

__all__ = ["_FP32_SPLIT", "_PER_CALL_SCALARS", "_WIDEN_BF16", "_apply_keep", "_block", "_keep_mask", "_load_seed",
           "_mm", "_rank_dot", "_rank_operand", "_dy_pass_kernel", "_grouped_tile", "_lora_add", "_lora_epilogue",
           "_output_gemm_kernel", "_output_gemm_tma_kernel", "_shrink_kernel", "_small_m_kernel",
           "_sum_partials_kernel"]
