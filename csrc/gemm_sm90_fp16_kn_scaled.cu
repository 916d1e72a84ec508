// The sm_90 LoRA GEMM for fp16, B (K, N) row-major, with A's column scale (DoRA's dx = (g ⊙ dy) W + ...): the
// 128 x 128 ping-pong config, one translation unit (gemm_sm90_instance.cuh).
#include "gemm_sm90_instance.cuh"

LORA_KERNELS_GEMM_SM90_SCALED_INSTANCE(fp16, 1)
