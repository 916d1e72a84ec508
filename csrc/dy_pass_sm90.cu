// dy pass on Hopper (sm_90a, wgmma): g = dy B (M, r) fp32 and the row-split partials of dB = dy^T u (N, r) from
// one read of dy. The same outputs, partial layout and reduce as launch_lora_dy_pass (dy_pass.cu), whose mma.sync
// kernel runs wherever this one does not (lora_dy_pass_sm90_unsupported says why).
//
// Math   : per r-chunk z (columns j0 = z*RJ .. j0+RJ-1 of r), with the side operands as P pieces stacked into NW = P*RJ
//          columns (P = 3: the bf16x3 split of fp32 B and u on bf16 dy, each piece exact in bf16; P = 1: cast to
//          dy's type), each 128 x 64 tile of dy gives, in fresh accumulators,
//            G (128 x NW) = dy_tile . Bp_chunk^T        K = the tile's 64 columns
//            D (64 x NW)  = dy_tile^T . Up_tile^T        K = the tile's 128 rows
//          and the pieces of each are added in fp32, hi + (mid + lo), into the running g of the row tile (registers)
//          and the dB of the column group (shared memory). Tensor-core chains stay one tile long, as in dy_pass.cu
//          (their fp32 accumulation truncates).
// Prep   : one launch writes Bp [Z][NW][Npad] and Up [Z][NW][Mpad] in dy's type (the pieces, K contiguous, zero
//          padded to Npad = N and Mpad = M rounded up to 128), so that every operand tile is a copy of
//          16-byte chunks (scratch: lora_dy_pass_sm90_scratch_bytes).
// Tiling : block (s, c, z) = row split s x column group c x r-chunk z, spans balanced in whole tiles; tiles of 128
//          rows x 64 columns, rows outer, columns inner. 384 threads: warpgroups 0 and 1 compute G of rows 0-63 and
//          64-127, warpgroup 2 computes D. A 4-stage cp.async ring holds {dy tile, Bp chunk}; the Up tile of a row
//          tile (128 rows of u, two 64-row K blocks) sits in a double buffer, loaded with that row tile's first
//          stage: a column group spans at least 3 tiles, so the buffer's previous row tile is done by then. Tiles
//          use the 128-byte swizzle (16-byte chunk c of row i at chunk c ^ (i % 8)): the dy tile is the K-major A
//          of G and, as it stands, the MN-major A of D.
// Bytes  : dy once per r-chunk; Bp and Up from L2 (a chunk per tile, a u tile per row tile); the partials as
//          dy_pass.cu (row_splits * N * r + col_groups * M * r floats, written once, summed by the reduce).
#include "common.cuh"
#include "plans.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"


namespace lora_kernels {
using namespace detail;
namespace {

constexpr int DS_BM = 128, DS_BN = 64, DS_STAGES = 4, DS_THREADS = 384;

struct DsShape {
  int pieces, rj, z, nw;
};
// r-chunk of RJ columns (16 or 32 with three pieces; 16, 32 or 64 with one) and the chunk count.
DsShape ds_shape(int r, int pieces) {
  const int rj = pieces > 1 ? (r <= 16 ? 16 : 32) : (r <= 16 ? 16 : r <= 32 ? 32 : 64);
  return DsShape{pieces, rj, (int)ceil_div(r, rj), pieces * rj};
}
constexpr int ds_ldd(int rj) { return rj + 4; }  // dB row pitch (floats) in shared memory
size_t ds_smem(const DsShape& s, int64_t tiles_per_group) {
  return 1024 + (size_t)DS_STAGES * (DS_BM * DS_BN * 2 + 128 * s.nw) + (size_t)2 * 2 * 128 * s.nw +
         (size_t)tiles_per_group * DS_BN * ds_ldd(s.rj) * 4;
}

// Bp / Up: row (z, pc, j) of Bp holds piece pc of B[:, z*RJ + j] (zero past N and r), of Up piece pc of u[:, ..].
// Block (x, z): DS_PREP consecutive elements e (columns of Bp, then of Up) of r-chunk z. Their rows of B (or u) are
// staged through shared memory with coalesced loads; then thread e writes its column of every row (a warp's stores
// to a row are contiguous).
constexpr int DS_PREP = 128;
template <typename T, typename TB, int P>
__global__ void __launch_bounds__(DS_PREP)
dy_sm90_prep_kernel(const TB* __restrict__ B, const float* __restrict__ u, T* __restrict__ bp, T* __restrict__ up,
                    int64_t M, int64_t N, int r, int rj, int64_t npad, int64_t mpad) {
#if LK_TC_ARCH
  extern __shared__ float prep_tile[];  // [DS_PREP][rj + 1]
  const int64_t bp_blocks = npad / DS_PREP;
  const bool is_b = blockIdx.x < bp_blocks;
  const int64_t e0 = (is_b ? blockIdx.x : blockIdx.x - bp_blocks) * (int64_t)DS_PREP;
  const int64_t len = is_b ? npad : mpad, valid = is_b ? N : M;
  const int j0 = blockIdx.y * rj, ld = rj + 1;
  for (int i = threadIdx.x; i < DS_PREP * rj; i += DS_PREP) {
    const int ee = i / rj, jj = i % rj;
    const int64_t e = e0 + ee;
    float v = 0.f;
    if (e < valid && j0 + jj < r) v = is_b ? to_f<TB>(B[e * r + j0 + jj]) : u[e * r + j0 + jj];
    prep_tile[ee * ld + jj] = v;
  }
  __syncthreads();
  T* out = (is_b ? bp : up) + (int64_t)blockIdx.y * P * rj * len + e0 + threadIdx.x;
  for (int row = 0; row < P * rj; ++row) {
    const float v = prep_tile[threadIdx.x * ld + row % rj];
    if constexpr (P > 1)
      out[(int64_t)row * len] = __float2bfloat16_rz(bf16x3_piece(v, row / rj));
    else
      out[(int64_t)row * len] = from_f<T>(v);
  }
#else
  __trap();
#endif
}

template <typename T, int P, int RJ>
__global__ void __launch_bounds__(DS_THREADS, 1)
lora_dy_pass_sm90_kernel(const T* __restrict__ dy, const T* __restrict__ bp, const T* __restrict__ up,
                         float* __restrict__ g_out, float* __restrict__ dB_partial, int64_t M, int64_t N, int r,
                         int64_t npad, int64_t mpad) {
#if LK_WGMMA
  constexpr int NW = P * RJ, LDD = ds_ldd(RJ), DY_BYTES = DS_BM * DS_BN * 2, STAGE = DY_BYTES + NW * 128;
  constexpr int UP_BYTES = 2 * NW * 128;  // one row tile of Up: two 64-row K blocks
  extern __shared__ unsigned char ds_smem_raw[];
  const uint32_t raw = smem_addr(ds_smem_raw), pad = (1024 - (raw & 1023)) & 1023;
  const uint32_t s_ring = raw + pad, s_up = s_ring + DS_STAGES * STAGE;
  float* dBs = reinterpret_cast<float*>(ds_smem_raw + pad + DS_STAGES * STAGE + 2 * UP_BYTES);  // [tiles*64][LDD]

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int64_t tiles_m = (M + DS_BM - 1) / DS_BM, tiles_n = (N + DS_BN - 1) / DS_BN;
  const int64_t rt0 = tiles_m * blockIdx.x / gridDim.x, rt1 = tiles_m * (blockIdx.x + 1) / gridDim.x;
  const int64_t ct0 = tiles_n * blockIdx.y / gridDim.y, ct1 = tiles_n * (blockIdx.y + 1) / gridDim.y;
  const int64_t row_begin = rt0 * DS_BM, row_end = min64(M, rt1 * DS_BM);
  const int64_t col_begin = ct0 * DS_BN, col_end = min64(N, ct1 * DS_BN);
  const int n_ct = (int)(ct1 - ct0);
  const int n_tiles = (int)(rt1 - rt0) * n_ct;
  const int j0 = blockIdx.z * RJ;
  const bool do_dB = dB_partial != nullptr;
  const T* bpz = bp + (int64_t)blockIdx.z * NW * npad;
  const T* upz = up + (int64_t)blockIdx.z * NW * mpad;
  float* g = g_out + (int64_t)blockIdx.y * M * r;
  float* dBp = do_dB ? dB_partial + (int64_t)blockIdx.x * N * r : nullptr;

  if (do_dB)
    for (int i = tid; i < n_ct * DS_BN * LDD; i += DS_THREADS) dBs[i] = 0.f;

  // Loads. Each thread's 16-byte chunks sit at fixed offsets from a tile's corner, computed once here: a tile costs
  // one base address and one copy per chunk (a partial tile also checks each chunk's row and column).
  constexpr int DY_CH = (DS_BM * 8 + DS_THREADS - 1) / DS_THREADS, BP_CH = (NW * 8 + DS_THREADS - 1) / DS_THREADS;
  constexpr int UP_CH = (NW * 16 + DS_THREADS - 1) / DS_THREADS;
  uint32_t dy_dst[DY_CH], bp_dst[BP_CH], up_dst[UP_CH];
  int64_t dy_src[DY_CH], bp_src[BP_CH], up_src[UP_CH];
  int dy_row[DY_CH], dy_col[DY_CH];
#pragma unroll
  for (int q = 0; q < DY_CH; ++q) {
    const int i = tid + q * DS_THREADS, row = i >> 3, c = i & 7;
    dy_dst[q] = sw128_offset(row, c);
    dy_src[q] = (int64_t)row * N + 8 * c;
    dy_row[q] = i < DS_BM * 8 ? row : DS_BM;  // a chunk index past the tile is never copied
    dy_col[q] = 8 * c;
  }
#pragma unroll
  for (int q = 0; q < BP_CH; ++q) {
    const int i = tid + q * DS_THREADS, row = i >> 3, c = i & 7;
    bp_dst[q] = DY_BYTES + sw128_offset(row, c);
    bp_src[q] = (int64_t)row * npad + 8 * c;
  }
#pragma unroll
  for (int q = 0; q < UP_CH; ++q) {
    const int i = tid + q * DS_THREADS, row = i >> 4, c = i & 15;
    up_dst[q] = (c >> 3) * NW * 128 + sw128_offset(row, c & 7);
    up_src[q] = (int64_t)row * mpad + 8 * c;
  }
  // Tile (rt, ct) into ring slot `slot` (and its row tile's Up tile when ct == 0): one cp.async group, empty when
  // the tile is past the end.
  auto issue = [&](bool live, int rt, int ct, int slot) {
    if (live) {
      const int64_t m0 = row_begin + (int64_t)rt * DS_BM, n0 = col_begin + (int64_t)ct * DS_BN;
      const uint32_t s_st = s_ring + slot * STAGE;
      const T* dy0 = dy + m0 * N + n0;
      const int rows = (int)min64(DS_BM, row_end - m0), cols = (int)min64(DS_BN, col_end - n0);
#pragma unroll
      for (int q = 0; q < DY_CH; ++q) {
        const bool ok = dy_row[q] < rows && dy_col[q] < cols;
        if (dy_row[q] < DS_BM) cp_async16(s_st + dy_dst[q], ok ? dy0 + dy_src[q] : dy, ok ? 16 : 0);
      }
#pragma unroll
      for (int q = 0; q < BP_CH; ++q)
        if (tid + q * DS_THREADS < NW * 8) cp_async16(s_st + bp_dst[q], bpz + n0 + bp_src[q], 16);
      if (do_dB && ct == 0) {
        const uint32_t s_u = s_up + (rt & 1) * UP_BYTES;
#pragma unroll
        for (int q = 0; q < UP_CH; ++q)
          if (tid + q * DS_THREADS < NW * 16) cp_async16(s_u + up_dst[q], upz + m0 + up_src[q], 16);
      }
    }
    cp_async_commit();
  };

  float part[NW / 2];  // this tile's product (fresh per tile)
  float run[RJ / 2];   // g of the row tile (warpgroups 0-1)
#pragma unroll
  for (int i = 0; i < RJ / 2; ++i) run[i] = 0.f;

  // (rt, ct, slot): the tile computed; (irt, ict, islot): the tile loaded DS_STAGES - 1 ahead. Counters, so that a
  // tile costs no integer division.
  auto advance = [&](int& rt_, int& ct_, int& slot_) {
    if (++ct_ == n_ct) {
      ct_ = 0;
      ++rt_;
    }
    slot_ = slot_ + 1 == DS_STAGES ? 0 : slot_ + 1;
  };
  int irt = 0, ict = 0, islot = 0;
#pragma unroll
  for (int s = 0; s < DS_STAGES - 1; ++s) {
    issue(s < n_tiles, irt, ict, islot);
    advance(irt, ict, islot);
  }
  int rt = 0, ct = 0, slot = 0;
  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<DS_STAGES - 2>();
    fence_proxy_async();
    __syncthreads();  // tile t landed for all; tile t - 1's products done (its slot is refilled next)
    issue(t + DS_STAGES - 1 < n_tiles, irt, ict, islot);
    advance(irt, ict, islot);
    const uint32_t s_dy = s_ring + slot * STAGE, s_bp = s_dy + DY_BYTES;
    if (wg < 2) {  // G rows 64 wg .. 64 wg + 63: K = the tile's 64 columns, 4 steps of 16
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < DS_BN / 16; ++ks)
        Wgmma<T, NW>::template mma<0>(part, sw128_desc(s_dy + wg * 64 * 128 + 32 * ks), sw128_desc(s_bp + 32 * ks),
                                      ks);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(part);
#pragma unroll
      for (int i = 0; i < RJ / 2; ++i) {
        if constexpr (P > 1)
          run[i] += part[i] + (part[i + RJ / 2] + part[i + RJ]);
        else
          run[i] += part[i];
      }
      if (ct == n_ct - 1) {  // row tile done: its g rows written once
#pragma unroll
        for (int c8 = 0; c8 < RJ / 8; ++c8)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t m = row_begin + (int64_t)rt * DS_BM + 64 * wg + 16 * warp + (lane >> 2) + 8 * h;
            const int j = j0 + 8 * c8 + 2 * (lane & 3);
            if (m < row_end) st2f(g + m * r + j, r - j, run[4 * c8 + 2 * h], run[4 * c8 + 2 * h + 1]);
            run[4 * c8 + 2 * h] = run[4 * c8 + 2 * h + 1] = 0.f;
          }
      }
    } else if (do_dB) {  // D: the tile's 64 columns x NW, K = the tile's 128 rows, 8 steps of 16
      const uint32_t s_u = s_up + (rt & 1) * UP_BYTES;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < DS_BM / 16; ++ks)
        Wgmma<T, NW>::template mma<1>(part, sw128_desc(s_dy + 2048 * ks),
                                      sw128_desc(s_u + (ks >> 2) * NW * 128 + 32 * (ks & 3)), ks);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(part);
      float* drow = dBs + (ct * DS_BN + 16 * warp + (lane >> 2)) * LDD + 2 * (lane & 3);
#pragma unroll
      for (int c8 = 0; c8 < RJ / 8; ++c8)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = 4 * c8 + 2 * h;
          float2 v;
          if constexpr (P > 1)
            v = make_float2(part[i] + (part[i + RJ / 2] + part[i + RJ]),
                            part[i + 1] + (part[i + 1 + RJ / 2] + part[i + 1 + RJ]));
          else
            v = make_float2(part[i], part[i + 1]);
          float2* d = reinterpret_cast<float2*>(drow + 8 * h * LDD + 8 * c8);
          const float2 o = *d;
          *d = make_float2(o.x + v.x, o.y + v.y);
        }
    }
    advance(rt, ct, slot);
  }
  cp_async_wait<0>();
  if (do_dB) {  // the block's dB partial rows, columns of the r-chunk: written once
    __syncthreads();
    for (int i = tid; i < n_ct * DS_BN * RJ; i += DS_THREADS) {
      const int nn = i / RJ, jj = i % RJ;
      const int64_t n = col_begin + nn;
      if (n < col_end && j0 + jj < r) dBp[n * r + j0 + jj] = dBs[nn * LDD + jj];
    }
  }
#else
  __trap();
#endif
}

// f(kernel) for the (T, P, RJ) of a call (P = 3 only for bf16).
template <typename T, typename F>
cudaError_t with_ds_kernel(int pieces, int rj, F&& f) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    if (pieces == 3) return rj == 16 ? f(&lora_dy_pass_sm90_kernel<T, 3, 16>) : f(&lora_dy_pass_sm90_kernel<T, 3, 32>);
  return rj == 16 ? f(&lora_dy_pass_sm90_kernel<T, 1, 16>)
                  : rj == 32 ? f(&lora_dy_pass_sm90_kernel<T, 1, 32>) : f(&lora_dy_pass_sm90_kernel<T, 1, 64>);
}

// Whether the current device is compute capability 9.0 and this build holds the wgmma kernel's sm_90a code (not
// a trap compiled for another architecture; read once, on the first 9.0 device asked about).
bool ds_device_ok() {
  if (compute_capability() != 90) return false;
  static const bool has_sm90a = [] {
    cudaFuncAttributes attr{};
    const bool ok = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(&lora_dy_pass_sm90_kernel<__nv_bfloat16, 1, 16>)) ==
                        cudaSuccess &&
                    attr.ptxVersion >= 90 && attr.binaryVersion == 90;
    cudaGetLastError();
    return ok;
  }();
  return has_sm90a;
}

bool ds_enabled() {
  static const bool on = env_switch_on("LORA_KERNELS_SM90_DY");
  return on;
}

}  // namespace

SplitPlan lora_dy_pass_sm90_plan(int64_t M, int64_t N, int r, int pieces) {
  const DsShape sh = ds_shape(r, pieces);
  const int64_t tiles_m = ceil_div(M, DS_BM), tiles_n = ceil_div(N, DS_BN), sms = num_sms();
  SplitPlan best{0, 0, 0, 0};
  double best_est = -1.0;
  // Column groups of at least DS_STAGES - 1 tiles (the Up double buffer), their dB in shared memory.
  for (int64_t C = 1; C <= tiles_n / (DS_STAGES - 1) && C <= 65535; ++C) {
    const int64_t tpg = ceil_div(tiles_n, C);
    if (ds_smem(sh, tpg) > kSmemPerBlockMax) continue;
    const int64_t S = std::max<int64_t>(1, std::min<int64_t>(tiles_m, sms / (C * sh.z)));
    const int64_t blocks = S * C * sh.z, waves = ceil_div(blocks, sms);
    const double fill = (double)blocks / (double)(waves * sms);
    const double partial = 8.0 * r * ((double)S * N + (C > 1 ? (double)C * M : 0.0));
    const double est = 2.0 * (double)M * (double)N * sh.z / fill + partial;
    if (best_est < 0 || est < best_est) {
      best_est = est;
      best = SplitPlan{S, ceil_div(tiles_m, S) * DS_BM, C, tpg * DS_BN};
    }
  }
  return best;
}

const char* lora_dy_pass_sm90_unsupported(const void* dy, DType dy_dtype, DType b_dtype, int64_t M, int64_t N,
                                          int r) {
  if (!ds_enabled()) return "LORA_KERNELS_SM90_DY=0";
  if (dy_dtype == DType::kFloat32 || !stream_pass_on_tc(dy_dtype, b_dtype))
    return "dy and the adapters take the FFMA kernel (fp32 dy, or fp32 adapters on fp16)";
  if (!ds_device_ok()) return "not a compute capability 9.0 device with this build's sm_90a code";
  if (M < 1 || r < 1 || r > kMaxRank) return "empty problem or rank out of range";
  if (N % 8 || reinterpret_cast<uintptr_t>(dy) % 16) return "N must be a multiple of 8 and dy 16-byte aligned";
  if (ceil_div(N, DS_BN) < DS_STAGES - 1) return "N below 3 column tiles (129)";
  if (ceil_div(M, DS_BM) > 0x7fffffff) return "M too large";
  if (lora_dy_pass_sm90_plan(M, N, r, adapter_pieces(dy_dtype, b_dtype)).row_splits < 1)
    return "no column grouping fits in shared memory";
  return nullptr;
}

size_t lora_dy_pass_sm90_scratch_bytes(int64_t M, int64_t N, int r, int pieces) {
  const DsShape sh = ds_shape(r, pieces);
  return (size_t)sh.z * sh.nw * (size_t)(ceil_div(N, DS_PREP) * DS_PREP + ceil_div(M, DS_BM) * DS_BM) * 2;
}

cudaError_t launch_lora_dy_pass_sm90(const void* dy, DType dy_dtype, const void* B, DType b_dtype, const float* u,
                                     float* g_out, float* dB_partial, int64_t M, int64_t N, int r, SplitPlan plan,
                                     void* scratch, cudaStream_t stream) {
  if (lora_dy_pass_sm90_unsupported(dy, dy_dtype, b_dtype, M, N, r) != nullptr || plan.row_splits < 1 || !scratch)
    return cudaErrorInvalidValue;
  const int pieces = adapter_pieces(dy_dtype, b_dtype);
  const DsShape sh = ds_shape(r, pieces);
  const int64_t npad = ceil_div(N, DS_PREP) * DS_PREP, mpad = ceil_div(M, DS_BM) * DS_BM;
  const int64_t tpg = ceil_div(ceil_div(N, DS_BN), plan.col_groups);
  if (plan.col_groups > 65535 || plan.row_splits > 0x7fffffff || sh.z > 65535) return cudaErrorInvalidConfiguration;
  const size_t smem = ds_smem(sh, tpg);
  const dim3 grid((unsigned)plan.row_splits, (unsigned)plan.col_groups, (unsigned)sh.z);
  return with_dtypes<true>(dy_dtype, b_dtype, [&](auto dt, auto bt) -> cudaError_t {
    using T = decltype(dt);
    using TB = decltype(bt);
    T* bp = static_cast<T*>(scratch);
    T* up = bp + (int64_t)sh.z * sh.nw * npad;
    const dim3 prep_grid((unsigned)((npad + (dB_partial ? mpad : 0)) / DS_PREP), (unsigned)sh.z);
    const size_t prep_smem = (size_t)DS_PREP * (sh.rj + 1) * sizeof(float);
    cudaError_t e = with_pieces<T>(pieces, [&](auto pc) {
      return launch_kernel(dy_sm90_prep_kernel<T, TB, decltype(pc)::value>, prep_grid, DS_PREP, prep_smem, stream,
                           static_cast<const TB*>(B), u, bp, up, M, N, r, sh.rj, npad, mpad);
    });
    if (e != cudaSuccess) return e;
    return with_ds_kernel<T>(pieces, sh.rj, [&](auto kernel) {
      return launch_kernel(kernel, grid, DS_THREADS, smem, stream, static_cast<const T*>(dy),
                           static_cast<const T*>(bp), static_cast<const T*>(up), g_out, dB_partial, M, N, r, npad,
                           mpad);
    });
  });
}

}  // namespace lora_kernels
