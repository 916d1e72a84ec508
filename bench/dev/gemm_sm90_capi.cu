// A C entry point to the sm_90 LoRA GEMM for development runs without the torch extension: built as a shared
// library (bench/dev/build_gemm_capi.sh) from one object per (dtype, layout, config) (gemm_sm90_probe_inst.cu)
// and called through ctypes by bench/dev/gemm_sm90_probe.py. A (dtype, layout, config) not built returns
// cudaErrorNotSupported.
#include "gemm_sm90.h"

using ProbeFn = cudaError_t (*)(const lora_kernels::LoraGemmArgs&, int, int, int, cudaStream_t);

#define LK_DECL(d, l, c) \
  extern "C" cudaError_t lk_probe_##d##_##l##_##c(const lora_kernels::LoraGemmArgs&, int, int, int, cudaStream_t) \
      __attribute__((weak));
#define LK_DECL_CFGS(d, l) LK_DECL(d, l, 0) LK_DECL(d, l, 1) LK_DECL(d, l, 2) LK_DECL(d, l, 3) LK_DECL(d, l, 4) \
  LK_DECL(d, l, 5) LK_DECL(d, l, 6)
LK_DECL_CFGS(0, 0) LK_DECL_CFGS(0, 1) LK_DECL_CFGS(1, 0) LK_DECL_CFGS(1, 1)

#define LK_ROW(d, l) {lk_probe_##d##_##l##_0, lk_probe_##d##_##l##_1, lk_probe_##d##_##l##_2, \
                      lk_probe_##d##_##l##_3, lk_probe_##d##_##l##_4, lk_probe_##d##_##l##_5, lk_probe_##d##_##l##_6}
static const ProbeFn kTable[2][2][7] = {{LK_ROW(0, 0), LK_ROW(0, 1)}, {LK_ROW(1, 0), LK_ROW(1, 1)}};
constexpr int kStreamK = 6;  // gemm_sm90_probe_inst.cu: config 4's tile on CUTLASS's stream-K scheduler

// dtype: 1 fp16, 2 bf16 (GemmDType); layout: 0 NK, 1 KN; config: GemmConfig (-1: lora_gemm_sm90_pick), or 6
// (kStreamK: the tile order lora_gemm_sm90_pick gives config 4).
extern "C" int lk_gemm_sm90(int64_t M, int64_t N, int64_t K, int64_t Kx, const void* a, const void* b,
                            const void* ax, const void* bx, const void* bias, void* d, int dtype, int layout,
                            int config, int swizzle, int raster, void* stream) {
  lora_kernels::LoraGemmArgs args;
  args.M = M; args.N = N; args.K = K; args.Kx = Kx;
  args.a = a; args.b = b; args.ax = ax; args.bx = bx; args.bias = bias; args.d = d;
  args.dtype = static_cast<lora_kernels::GemmDType>(dtype);
  args.layout_b = static_cast<lora_kernels::GemmLayoutB>(layout);
  args.config = config == kStreamK ? lora_kernels::GemmConfig::kCoop128x256_c12
                                   : static_cast<lora_kernels::GemmConfig>(config);
  args.swizzle = swizzle;
  args.raster = raster;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const lora_kernels::GemmChoice c = lora_kernels::lora_gemm_sm90_pick(args, sms);
  ProbeFn fn = kTable[dtype == 2 ? 0 : 1][layout][config == kStreamK ? kStreamK : static_cast<int>(c.config)];
  if (fn == nullptr) return static_cast<int>(cudaErrorNotSupported);
  return static_cast<int>(fn(args, c.swizzle, c.raster, sms, static_cast<cudaStream_t>(stream)));
}
