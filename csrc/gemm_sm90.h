// The Hopper (sm_90a) GEMM with the LoRA path inside its main loop. Plain CUDA/C++ API (no torch headers).
//
//   D (M, N) = A (M, K) · op(B) + Ax (M, Kx) · op(Bx) + bias (N,)          fp32 accumulation, D in A's dtype
//
// A, Ax, D row-major. B and Bx share one layout:
//   kNK: B is (N, K) row-major, op(B) = Bᵀ     forward   y  = x Wᵀ  + (s·u) Bₗᵀ + b     (W, Bₗ = lora_B)
//   kKN: B is (K, N) row-major, op(B) = B      backward  dx = dy W  + v Aₗ               (W, Aₗ = lora_A)
// The extension (Ax, Bx) is the rank-r term, zero-padded to Kx = a multiple of 64 (the main loop's K tile): the
// kernel runs ceil(K/64) K-tiles from (A, B) and Kx/64 more from (Ax, Bx) into the same accumulator, so the LoRA
// expand costs one or a few extra K-tiles and no pass over D; of the last one it multiplies only the 16-deep steps
// that Kx_used (r) reaches. Kx = 0 is a plain GEMM (+ bias).
//
// With keep bits (`keep`, kKN only: dx with dropout) the rank-r term is masked per element:
//   D = A · op(B) + keep ⊙ (Ax · op(Bx)) + bias,    keep (M, N) as bits, row m at keep + m * N/8, bit n % 8 of
// byte n / 8 (dropout_bits.cu's layout of an (M, N) input). The kernel runs the extension's K-tiles first, zeroes the
// dropped elements of the accumulator, then runs the main K-tiles into it: the masked term costs no pass over D.
//
// With `da_x` (kKN only, Kx = 64: dx at r <= 64) the same kernel also computes the LoRA gradient dA = Axᵀ X (with keep
// bits Axᵀ (keep ⊙ X)), X = da_x (M, N) the layer input whose gradient D is and Ax the extension's (M, Kx) operand
// (s·g, or s / (1 - p)·g): two more K-tiles per output tile carry X's columns of the tile and Ax's rows, and each tile
// writes its row block's (da_r, its columns) part of dA in fp32 to da_partial ((ceil(M / 128), da_r, N), every element
// written), to be summed over the row blocks by the caller (launch_reduce_partials). x is read beside the GEMM's own
// streams rather than by a pass of its own.
//
// Requirements (else lora_gemm_sm90_unsupported() says why and the caller keeps its other path): a device of
// compute capability 9.0, a build with the kernels (LORA_KERNELS_HAVE_SM90_GEMM), fp16 or bf16, K and N
// multiples of 8 and every pointer 16-byte aligned (TMA), Kx a multiple of 64; with keep bits also Kx > 0, kKN
// and N a multiple of 128 (the bits' rows 16-byte aligned for TMA).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace lora_kernels {

enum class GemmLayoutB : int { kNK = 0, kKN = 1 };
enum class GemmDType : int { kFloat16 = 1, kBFloat16 = 2 };

// Main-loop shapes (tile M x N x 64, cluster M x N); kAuto lets lora_gemm_sm90_pick choose per problem.
enum class GemmConfig : int {
  kAuto = -1,
  kCoop256x128_c12 = 0,  // cooperative: 2 consumer warpgroups share one tile
  kPing128x128_c12 = 1,  // ping-pong: 2 consumer warpgroups alternate tiles
  kCoop128x256_c21 = 2,
  kCoop256x128_c21 = 3,
  kCoop128x256_c12 = 4,
  kPing128x128_c21 = 5,
  kNumConfigs = 6,
};

struct LoraGemmArgs {
  int64_t M = 0, N = 0, K = 0, Kx = 0;
  // The extension's columns that can be nonzero (r); the rest of Kx is zero padding on both sides, whose MMAs the
  // kernel skips in steps of 16 (the MMA's K). 0: all of Kx.
  int64_t Kx_used = 0;
  const void* a = nullptr;
  const void* b = nullptr;
  const void* ax = nullptr;  // (M, Kx), may be null when Kx == 0
  const void* bx = nullptr;  // (N, Kx) for kNK, (Kx, N) for kKN
  const void* bias = nullptr;
  const uint8_t* keep = nullptr;  // (M, N/8) keep bits masking the extension's term, or null (no mask)
  void* d = nullptr;
  // dA in the GEMM (above): X (M, N) in D's dtype, the partials (ceil(M / 128), da_r, N) fp32; null: none
  const void* da_x = nullptr;
  float* da_partial = nullptr;
  int da_r = 0;
  GemmDType dtype = GemmDType::kBFloat16;
  GemmLayoutB layout_b = GemmLayoutB::kNK;
  GemmConfig config = GemmConfig::kAuto;
  int swizzle = 0;  // tile-order swizzle (1, 2, 4, 8); 0: lora_gemm_sm90_pick chooses
  int raster = 0;   // 0: heuristic, 1: along M, 2: along N
  int sms = 0;      // SMs the persistent grid may take (the rest left to a pass beside it); 0: all of them
  // Each block lets the launch after this one start once it has waited for the launch before it (the GEMM's loads
  // wait for that one): a pass that reads nothing this GEMM writes runs beside it, on the SMs `sms` leaves free.
  bool early_dependents = false;
};

// True when the kernels are compiled into this build.
bool lora_gemm_sm90_built();
// nullptr when `args` can run on `device`, else a static string saying why not.
const char* lora_gemm_sm90_unsupported(const LoraGemmArgs& args, int device);
// What runs a problem: args' own config, swizzle and raster where set, else the defaults.
struct GemmChoice {
  GemmConfig config;
  int swizzle;
  int raster;
};
// sms: the device's SM count (one wave of tiles for the swizzle choice); 0 assumes 132 (H100 SXM / H200).
GemmChoice lora_gemm_sm90_pick(const LoraGemmArgs& args, int sms = 0);
// The tile-order swizzle (1, 2 or 4) for an M x N grid of bm x bn tiles in clusters of cluster_n along N, with
// `wave` tiles in flight: 4 unless a smaller swizzle takes fewer waves (lora_gemm_sm90_pick says why).
int lora_gemm_sm90_swizzle(int64_t M, int64_t N, int bm, int bn, int cluster_n, int wave);
// Launches on `stream`; returns the launch's error (cudaErrorNotSupported when unsupported).
cudaError_t launch_lora_gemm_sm90(const LoraGemmArgs& args, cudaStream_t stream);
// The waves of tiles the kernel that lora_gemm_sm90_pick chooses for `args` runs on `sms` SMs (its persistent grid,
// in whole clusters), its swizzle's padding tiles included; 0 where it does not run. tile_n: that kernel's tile
// width (its tiles are 128 rows high).
int64_t lora_gemm_sm90_waves(const LoraGemmArgs& args, int sms, int* tile_n = nullptr);


// ------------------------------------------------------------------------------------------------ dA as a GEMM
// The backward's dA at p = 0 (dA_gemm_sm90.cu): dA (r, K) = Vᵀ X over the M tokens, with V = s·g (M, r) in X's dtype
// at row pitch ldv (the dx GEMM's packed operand, which the pack writes anyway; with fp32 adapters on bf16 X the
// pack's bf16x3 pieces of s·g, pieces = 3 stacked as V's columns [p][r]) and X = x (M, K) the layer input.
// CUTLASS's TMA + WGMMA cooperative kernel on dAᵀ = Xᵀ V, both operands read MN-major as they lie; the tokens split
// into `splits` equal ranges, each writing its fp32 partial to `partial` ((splits, pieces, r, K), every element
// written), to be summed in a fixed order by the caller (launch_reduce_partials over splits·pieces parts).
// V's columns (r·pieces) take ceil(r·pieces / 64) tiles of 64, run side by side (the tile order takes them one
// after another, so that the blocks that read the same x tile run together and all but one find it in L2).
// Requirements (else lora_dA_gemm_sm90_unsupported() says why): as the GEMM above (device, build, 16-bit, 16-byte
// aligned pointers), K % 8 == 0, r % 8 == 0 (V's 16-byte rows for TMA) and r·pieces <= 192, ldv % 8 == 0,
// M % splits == 0.
struct DaGemmArgs {
  int64_t M = 0, K = 0, ldv = 0, splits = 1;
  int r = 0, pieces = 1;
  const void* x = nullptr;   // (M, K) row-major
  const void* v = nullptr;   // (M, r·pieces) at row pitch ldv
  float* partial = nullptr;  // (splits, pieces, r, K)
  GemmDType dtype = GemmDType::kBFloat16;
};
const char* lora_dA_gemm_sm90_unsupported(const DaGemmArgs& args, int device);
// The token ranges for an (M, K) x and V's n columns (r·pieces) on `sms` SMs: enough tiles (128 of x's columns x 64
// of V's) for one wave, in ranges that divide M (at least 64 tokens each) and hold at most 16384 tokens (the fp32
// running sum's rounding); 0 where no divisor of M gives at least half the wave, or ranges that short (the caller
// keeps its other path).
int64_t lora_dA_gemm_sm90_splits(int64_t M, int64_t K, int64_t n, int sms);
cudaError_t launch_lora_dA_gemm_sm90(const DaGemmArgs& args, cudaStream_t stream);

}  // namespace lora_kernels
