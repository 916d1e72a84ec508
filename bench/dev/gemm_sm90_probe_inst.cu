// One (dtype, layout, config) of the sm_90 GEMM per object, for the development library: compiled with
// -DPROBE_DT=<0 bf16|1 fp16> -DPROBE_LAYOUT=<0 NK|1 KN> -DPROBE_CFG=<GemmConfig> so the configs build in parallel.
#include "gemm_sm90.cuh"

#define LK_PROBE_NAME2(d, l, c) lk_probe_##d##_##l##_##c
#define LK_PROBE_NAME(d, l, c) LK_PROBE_NAME2(d, l, c)

using ProbeElement = cute::conditional_t<PROBE_DT == 0, cutlass::bfloat16_t, cutlass::half_t>;
using ProbeLayout = cute::conditional_t<PROBE_LAYOUT == 0, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

extern "C" cudaError_t LK_PROBE_NAME(PROBE_DT, PROBE_LAYOUT, PROBE_CFG)(const lora_kernels::LoraGemmArgs& a, int sw,
                                                                        int ra, int sms, cudaStream_t s) {
  return lora_kernels::sm90::run_one<ProbeElement, ProbeLayout, PROBE_CFG>(a, sw, ra, sms, s);
}
