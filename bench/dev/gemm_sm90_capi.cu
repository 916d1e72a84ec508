// A C entry point to the sm_90 LoRA GEMM for development runs without the torch extension: built as a shared
// library (bench/dev/build_gemm_capi.sh) and called through ctypes by bench/dev/gemm_sm90_probe.py.
#include "gemm_sm90.h"

extern "C" int lk_gemm_sm90(int64_t M, int64_t N, int64_t K, int64_t Kx, const void* a, const void* b,
                            const void* ax, const void* bx, const void* bias, void* d, int dtype, int layout,
                            int config, int swizzle, int raster, void* stream) {
  lora_kernels::LoraGemmArgs args;
  args.M = M; args.N = N; args.K = K; args.Kx = Kx;
  args.a = a; args.b = b; args.ax = ax; args.bx = bx; args.bias = bias; args.d = d;
  args.dtype = static_cast<lora_kernels::GemmDType>(dtype);
  args.layout_b = static_cast<lora_kernels::GemmLayoutB>(layout);
  args.config = static_cast<lora_kernels::GemmConfig>(config);
  args.swizzle = swizzle;
  args.raster = raster;
  return static_cast<int>(lora_kernels::launch_lora_gemm_sm90(args, static_cast<cudaStream_t>(stream)));
}

extern "C" const char* lk_gemm_sm90_unsupported(int64_t M, int64_t N, int64_t K, int64_t Kx, int device) {
  lora_kernels::LoraGemmArgs args;
  args.M = M; args.N = N; args.K = K; args.Kx = Kx;
  static char buf[16] __attribute__((aligned(16)));
  args.a = args.b = args.ax = args.bx = buf;
  args.d = buf;
  const char* why = lora_kernels::lora_gemm_sm90_unsupported(args, device);
  return why ? why : "";
}
