// Launch of a CUTLASS 3.x sm_90 kernel (a cutlass::gemm::kernel::GemmUniversal) on the caller's stream, with its
// cluster shape and, where asked, as a programmatic dependent of the launch before it (pdl.cuh). Shared by the
// K-extended GEMM (gemm_sm90.cuh) and the dA GEMM (dA_gemm_sm90.cu).
//
// Done here rather than by cutlass::launch_kernel_on_cluster, which sets the kernel's non-portable-cluster attribute
// (a driver call) on every launch: our clusters are at most 8 blocks, portable.
#pragma once

#include "pdl.cuh"

#include <atomic>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>

namespace lora_kernels {
namespace sm90 {

// pdl: the kernel may start under the previous launch's tail; it must then wait for it before touching global memory
// (CUTLASS's load warps do, built with CUTLASS_ENABLE_GDC_FOR_SM90).
template <class Kernel>
cudaError_t launch_cutlass(const typename Kernel::Params& params, bool pdl, cudaStream_t stream) {
  using Cluster = typename Kernel::DispatchPolicy::ClusterShape;
  static_assert(cute::size(Cluster{}) <= 8, "a portable cluster size");
  // The shared-memory limit is a per-device attribute of each kernel: raise it once per device (two threads that
  // both find it unset both set it, to the same value).
  static std::atomic<bool> smem_set[64];
  constexpr int smem = Kernel::SharedStorageSize;
  static_assert(smem <= 232448, "over the 227 KB of shared memory an sm_90 block can have");
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device >= 64 || !smem_set[device].load(std::memory_order_acquire)) {
    e = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    if (device < 64) smem_set[device].store(true, std::memory_order_release);
  }
  const dim3 grid = Kernel::get_grid_shape(params);
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cute::size<0>(Cluster{});
  attr[0].val.clusterDim.y = cute::size<1>(Cluster{});
  attr[0].val.clusterDim.z = 1;
  if (grid.x % attr[0].val.clusterDim.x || grid.y % attr[0].val.clusterDim.y) return cudaErrorInvalidConfiguration;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = Kernel::get_block_shape();
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl ? with_pdl(attr, 1) : 1;
  void* kernel_params[] = {const_cast<typename Kernel::Params*>(&params)};
  return cudaLaunchKernelExC(&config, reinterpret_cast<void const*>(&cutlass::device_kernel<Kernel>), kernel_params);
}

}  // namespace sm90
}  // namespace lora_kernels
