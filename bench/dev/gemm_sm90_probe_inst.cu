// One (dtype, layout, config) of the sm_90 GEMM per object, for the development library: compiled with
// -DPROBE_DT=<0 bf16|1 fp16> -DPROBE_LAYOUT=<0 NK|1 KN> -DPROBE_CFG=<GemmConfig, or 6> so the configs build in
// parallel.
// Config 6 is not a production config: the 128 x 256 cooperative tile (config 4's) on CUTLASS's stream-K scheduler,
// with its workspace in a buffer of this object's (grown on demand; not for CUDA graph capture) and no mask.
#if PROBE_CFG == 6
#define LORA_KERNELS_PROBE_NO_GDC 1  // CUTLASS 4.2's stream-K scheduler does not compile with GDC (is_last_tile)
#endif
#include "gemm_sm90.cuh"

#define LK_PROBE_NAME2(d, l, c) lk_probe_##d##_##l##_##c
#define LK_PROBE_NAME(d, l, c) LK_PROBE_NAME2(d, l, c)

using ProbeElement = cute::conditional_t<PROBE_DT == 0, cutlass::bfloat16_t, cutlass::half_t>;
using ProbeLayout = cute::conditional_t<PROBE_LAYOUT == 0, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

#if PROBE_CFG == 6
namespace {
cudaError_t run_stream_k(const lora_kernels::LoraGemmArgs& a, int sw, int ra, int sms, cudaStream_t s) {
  using G = lora_kernels::sm90::Gemm<ProbeElement, ProbeLayout, lora_kernels::sm90::ConfigOf<4>::type,
                                     cutlass::gemm::StreamKScheduler>;
  static void* buf = nullptr;  // the workspace, grown on demand
  static size_t bytes = 0;
  const size_t need = G::workspace_size(a, sw, ra, sms);
  if (need > bytes) {
    if (buf != nullptr) cudaFree(buf);
    buf = nullptr;
    bytes = 0;
    cudaError_t e = cudaMalloc(&buf, need);
    if (e != cudaSuccess) return e;
    bytes = need;
  }
  return G::run(a, sw, ra, sms, s, buf, bytes);
}
}  // namespace
#endif

extern "C" cudaError_t LK_PROBE_NAME(PROBE_DT, PROBE_LAYOUT, PROBE_CFG)(const lora_kernels::LoraGemmArgs& a, int sw,
                                                                        int ra, int sms, cudaStream_t s) {
#if PROBE_CFG == 6
  return run_stream_k(a, sw, ra, sms, s);
#else
  return lora_kernels::sm90::run_one<ProbeElement, ProbeLayout, PROBE_CFG>(a, sw, ra, sms, s);
#endif
}
