// The sm_90 LoRA GEMM for fp16, B (K, N) row-major, the backward dx: the 128 x 256 cooperative config, one
// translation unit (gemm_sm90_instance.cuh).
#include "gemm_sm90_instance.cuh"

LORA_KERNELS_GEMM_SM90_INSTANCE(fp16, kn, 4)
