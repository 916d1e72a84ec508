// The Hopper (sm_90a) LoRA forward in one GEMM launch, the shrink included. Plain CUDA/C++ API (no torch headers).
//
//   y (M, N) = x Wᵀ + bias + bf16(u) Bᵀ,    u (M, r) = scale · x Aᵀ  (fp32, returned: the backward reads it)
//   (with col_scale c: y = c ⊙ (x Wᵀ + bf16(u) Bᵀ) + bias, DoRA's column scale, in the epilogue)
//
// x (M, K), W (N, K), y row-major, in one 16-bit dtype; lora_A (r, K) and lora_B (N, r) row-major in x's dtype or
// fp32 (then A takes the bf16x3 pieces, as the streaming shrink does: the u sums are the fp32 products).
// The kernel (fused_fwd_sm90.cuh) is the sm_90 GEMM's warp-specialised main loop (ping-pong on 128 x 128 tiles, or
// cooperative on 128 x 256 tiles: lora_fused_fwd_sm90_wide) in which u is computed
// either by the first output tiles of each 128-row block of x ("lead tiles": they also multiply the x tiles they
// load by lora_A's pieces, so x is read once) or by two more tiles per block ("u tiles", which multiply that block
// by lora_A's pieces instead of W); every output tile of the block then runs one more K-tile from (bf16(u), B). The
// separate shrink pass over x, the pack of (u, B) and the idle gaps between their launches are gone: a forward is
// this launch and a small prep launch (and, with dropout, the keep-bits pass). Where the lead tiles can read lora_A
// and lora_B as they are (lora_fused_fwd_sm90_direct), there is no prep launch: the forward is one launch.
//
// Workspace (lora_fused_fwd_sm90_workspace_bytes, 256-byte aligned, no initial contents needed): lora_A's pieces,
// lora_B in x's dtype padded, bf16(u), and one ready counter per 128-row block (the prep zeroes them; without the
// prep the counters are the stream's own, which the kernel returns to zero: plans.cuh's stream_counters).
// Requirements (else lora_fused_fwd_sm90_unsupported() says why and the caller keeps its other path): as the sm_90
// GEMM (gemm_sm90.h) plus r <= 64 and adapters on the tensor cores (16-bit, or fp32 with bf16 x).
// Dropout (p > 0): u = scale / (1 - p) · (keep ⊙ x) Aᵀ with keep the contract's mask as the keep bits of
// launch_dropout_keep_bits (lora_kernels.cuh, one byte per 8-group); the u tiles mask their own copy of each x tile in
// shared memory, the lead tiles a copy in registers (a wgmma with A from registers), and the output tiles multiply
// the unmasked x by W.
// FusedFwdArgs::lead selects the lead-tile variant (fused_fwd_sm90.cuh), which needs at least as many output tile
// columns (ceil(N / 128)) as lead tiles (ceil(r / 8) for fp32 adapters, at least ceil(r / 32) for 16-bit ones: Split);
// with dropout, fp32 adapters on bf16 x (16-bit adapters' 32 u columns per lead tile leave no registers for x's masked
// copy).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "lora_kernels.cuh"  // DType

namespace lora_kernels {

struct FusedFwdArgs {
  int64_t M = 0, N = 0, K = 0;
  int r = 0;
  DType x_dtype = DType::kBFloat16;  // x, W, bias, y
  DType a_dtype = DType::kBFloat16;  // lora_A
  DType b_dtype = DType::kBFloat16;  // lora_B
  const void* x = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;  // (N,) or null
  // (N,) fp32, 16-byte aligned, or null: y = col_scale ⊙ (x Wᵀ + bf16(u) Bᵀ) + bias (DoRA's column scale, applied
  // with the bias in the epilogue)
  const float* col_scale = nullptr;
  const void* lora_A = nullptr;
  const void* lora_B = nullptr;
  float scale = 1.f;  // scaling
  float p = 0.f;  // dropout probability, [0, 1); p > 0 needs keep
  const uint8_t* keep = nullptr;  // with dropout: the keep bits (M, ceil(K / 8)) of launch_dropout_keep_bits
  void* y = nullptr;
  float* u = nullptr;  // (M, r) fp32, scale · x Aᵀ
  void* workspace = nullptr;
  // Where u is computed: false, in 2 u tiles per row block; true, in the first output tiles of each row block
  // ("lead tiles", Split).
  bool lead = false;
};

// Bytes of workspace a call needs.
size_t lora_fused_fwd_sm90_workspace_bytes(int64_t M, int64_t N, int64_t K, int r, DType x_dtype, DType a_dtype,
                                           bool lead);
// nullptr when `args` can run on `device`, else a static string saying why not (workspace and outputs not checked).
const char* lora_fused_fwd_sm90_unsupported(const FusedFwdArgs& args, int device);
// True when a lead-tile launch of `args` takes the wide variant (fused_fwd_sm90.cuh: 128 x 256 tiles, cooperative
// schedule): without dropout, where the sm_90 GEMM takes its 128 x 256 tile for the problem (lora_gemm_sm90_pick:
// K and N >= 2048, or K >= 2048 and 1.5 waves of those tiles; or LORA_KERNELS_SM90_GEMM_CONFIG) and the lead tiles
// fit in ceil(N / 256) tile columns.
bool lora_fused_fwd_sm90_wide(const FusedFwdArgs& args);
// True when a lead-tile launch of `args` needs no prep launch: its TMA loads read lora_A's rows as the lead tiles'
// slots and lora_B's rows as the extension tile's columns, with TMA's zeros past r. That needs both adapters in x's
// dtype (16-bit: one piece), r a multiple of 8 (lora_B's rows of 16 bytes), both 16-byte aligned, and at most
// kFusedReadyCap row blocks (the stream's ready counters).
bool lora_fused_fwd_sm90_direct(const FusedFwdArgs& args);
// True when a launch of `args` takes the split variant (fused_fwd_sm90.cuh, Split: clusters of 1 x 2 wide tiles that
// share u's K-tiles through distributed shared memory; no lead tiles, no ready counters, one launch): where the lead
// tiles without dropout would take the wide variant and read the adapters as they are (lora_fused_fwd_sm90_wide and
// _direct), and, by default, where at most two clusters span the output's columns (N <= 1024: u computed at most
// twice per row block; at N = 4096 its products and exchanges cost more than the lead tiles' waits, session 58).
// With dropout on bf16 x only where set_fused_split(1) asks for it (its kernel masks x in registers for u's products,
// from the keep bits of a pass before it): at 8192 x 4096 -> 1024 it took 188.7 against 136.9 us for the keep bits +
// shrink + GEMM path (H100, session 60; not profiled). The fp16 instance of that kernel ran out of registers in
// ptxas, which serialised its wgmmas: not built.
// set_fused_split's mode decides: -1 that default, 0 never, 1 wherever the variant can run.
bool lora_fused_fwd_sm90_split(const FusedFwdArgs& args);
// Sets the split variant's mode for this process (LORA_KERNELS_FUSED_SPLIT starts it; -1 unset); returns the previous.
int set_fused_split(int mode);
// The prep launch (where one is needed) and the fused GEMM launch, on `stream`.
cudaError_t launch_lora_fused_fwd_sm90(const FusedFwdArgs& args, cudaStream_t stream);

namespace sm90fused {
// The split of the rank-r operands among the tiles that compute u ("u tiles" or lead tiles): `tiles` of them per
// 128-row block, each computing rc = 8 * blocks columns of u by multiplying x by nw = 8 * blocks * pieces rows of
// lora_A's pieces (u column block b's pieces at rows 8 (pieces b + p) + 0..7), each tile's rows `rows` apart in Ap.
//   u tiles:    tiles = 2 (one cluster), blocks 1, 2, 4 (r <= 16, 32, 64), rows = nw;
//   lead tiles: rows = 32 (the shared-memory slot a stage gives them, kApRows); 3 pieces: blocks 1, tiles = ceil(r / 8)
//               (24 rows used); 1 piece: blocks 4, tiles = ceil(r / 32), or with `narrow` blocks 1, tiles =
//               ceil(r / 8) (8 rows used). A narrow lead tile's u batch is a 64 x 8 wgmma, a wide one's 64 x 32: the
//               narrow one delays its row block's other tiles (which wait for its last K-tile) less, but costs more
//               MMA time per u column. The launch takes it where the lead tiles fit the output's tile columns and all
//               of them run in the first wave (fused_fwd_sm90.cu, narrow_lead); on the H200 it was 3-8% faster at
//               M = 2048 and up to 15% slower at M = 8192, r = 64, where every tile was a lead tile
//               (bench/results/h200_2026-12-03/session26).
struct Split {
  int blocks;  // u column blocks of 8 per tile
  int pieces;  // 1 (16-bit adapters) or 3 (fp32 adapters on bf16)
  int tiles;
  int rows;
  __host__ __device__ int rc() const { return 8 * blocks; }
  // columns of bf16(u) and of the padded lora_B: tiles * rc (>= r) rounded up to 16
  __host__ __device__ int width() const { return (tiles * rc() + 15) / 16 * 16; }
  __host__ __device__ int nw() const { return 8 * blocks * pieces; }
};
constexpr int kApRows = 32;
// Row blocks (ceil(M / 128)) a launch without the prep can count in the stream's ready counters.
constexpr int kFusedReadyCap = 4096;
inline Split split_for(int r, int pieces, bool lead, bool narrow = false) {
  if (lead && pieces == 1 && narrow) return Split{1, 1, (r + 7) / 8, kApRows};
  if (lead) return pieces == 3 ? Split{1, 3, (r + 7) / 8, kApRows} : Split{4, 1, (r + 31) / 32, kApRows};
  const int blocks = r <= 16 ? 1 : r <= 32 ? 2 : 4;
  return Split{blocks, pieces, 2, 8 * blocks * pieces};
}
// Device-side parameters beyond the GEMM's (fused_fwd_sm90.cuh).
struct FusedParams {
  int M, N, r;
  int blocks, pieces;
  int lead;          // 0: u tiles; else the lead tiles per row block
  int ap_pitch;      // rows of the lead slots' tensor between lead tiles' slots: kApRows (the prep's Ap), or rc
                     // (lora_A itself: lead tile t's u columns are its rows t rc ..); set by run from
                     // Operands::direct, next to the descriptor it goes with
  int ready_target;  // the ready count at which a row block's bf16(u) is complete: the tiles computing it
  int width;         // columns of su and Bx (Split::width)
  int k_tiles_main;
  int kb_ext;  // 16-deep k-blocks of the extension tile that hold u's columns: ceil(r / 16)
  float scale;  // scaling / (1 - p)
  // Dropout (u or lead tiles): bit q of keep[m * groups + k8] set iff x (m, 8 k8 + q) is kept; null: no dropout
  const uint8_t* keep;
  int64_t groups;  // ceil(K / 8)
  float* u;
  void* su;  // (M, width) bf16(u) in x's dtype
  int* ready;  // (ceil(M / 128),) tiles done computing u, per row block
  // Null where the prep zeroed `ready`. Else `ready` is the stream's (stream_counters) and this its exit count:
  // each consumer warpgroup counts itself out once done, and the last of them zeroes both for the next launch.
  unsigned* exit = nullptr;
  // Development switches (LORA_KERNELS_FUSED_DEBUG, read once; 0 in use): bit 0, output tiles do not wait for their
  // u tiles (wrong results: timing only); bit 1, u tiles multiply nothing; bit 4, a trace of every tile in u's place
  // (uint32 records of 4: SM, start, main loop end, end; the producers' waits at 16384 + tile); bit 5, the dropout
  // lead tiles load no keep bits (everything kept: timing only); bit 6, lead tiles run no u batch (wrong u and y:
  // timing only); bit 7, the row-block-major tile order (TileOrder::ahead = 0: A/B timing); bit 8 (host only), the
  // prep launch even where the lead tiles could read the adapters as they are (lora_fused_fwd_sm90_direct: A/B
  // timing); bit 9, every tile takes its K-tiles in increasing order (no K serpentine: A/B timing); bit 10, every
  // strip its row blocks in increasing order (no row serpentine, TileOrder::snake: A/B timing); bit 11, the split
  // variant's CTAs skip the exchange and each uses its own partial sum of u (wrong u and y: timing only).
  int debug = 0;
  int strip = 0;  // output cluster columns per strip of the tile order (LORA_KERNELS_FUSED_STRIP; 0: 4)
  // lead tiles: row blocks by which the lead clusters run ahead of the others (TileOrder::ahead,
  // LORA_KERNELS_FUSED_AHEAD; 0: every lead cluster first)
  int ahead = 0;
};
#if LORA_KERNELS_HAVE_SM90_GEMM
// The instances (fused_fwd_sm90_<dtype>.cu, fused_fwd_sm90_lead_<dtype>.cu, fused_fwd_sm90_lead_drop_bf16.cu,
// fused_fwd_sm90_lead_wide_<dtype>.cu, fused_fwd_sm90_split_<dtype>.cu, fused_fwd_sm90_split_drop_bf16.cu): launch
// the GEMM on prepared operands.
struct Operands {
  const void *x, *w, *bias, *ap, *bx;
  void* y;
  const float* col_scale;  // null: none
  // ap and bx are lora_A (r, K) and lora_B (N, r) themselves (lora_fused_fwd_sm90_direct), not the prep's Ap and Bx
  bool direct = false;
};
cudaError_t run_fused_bf16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_fp16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_lead_bf16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_lead_fp16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_lead_drop_bf16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_lead_wide_bf16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_lead_wide_fp16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_split_bf16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_split_fp16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
cudaError_t run_fused_split_drop_bf16(const Operands&, const FusedParams&, int64_t K, int sms, cudaStream_t);
#endif
}  // namespace sm90fused

}  // namespace lora_kernels
