// Flash attention (FlashAttention-2's tiling) on tensor cores for bf16, head_dim 64 and 128, on the
// FreqKV varlen layout: every block of a layer in one launch, bottom-right causal, grouped-query
// heads. The contract is attention_forward / attention_backward of kernels/kernels.h; the tiling
// rules (tile -> block table, mask, online softmax, recomputation) live in
// kernels/flash_attention_math.h, where a CPU test emulates them against CpuKernels<double>.
//
// Matrix products use WMMA (nvcuda::wmma, bf16 16x16x16 fragments, fp32 accumulation) on operands
// staged in shared memory; the softmax and the masks run on fp32 copies of the score fragments in
// shared memory, so no code depends on the (unspecified) register layout of a fragment -- except
// the forward's rescaling of its output accumulator by a per-row factor, which reads each
// element's row from an "index fragment": a 16x16 matrix holding r at (r, c), loaded once into an
// accumulator fragment of the same type (the element mapping is a property of the fragment type).
//
// One thread block = 4 warps = 64 rows of one tile; warp w owns rows [16w, 16w + 16). The other
// operand streams through shared memory 64 rows per step (zero-filled beyond the valid rows, so
// padding is finite and multiplies into masked entries only).
//
//   forward  grid (query tiles, Hq): S = Q K^T, online softmax, O = P V; out = O / l,
//            lse = ln 2 (m + log2 l) per (row, head).
//   delta    grid (query tiles, Hq): delta = rowsum(dO o O) (fp32 scratch).
//   dq       grid (query tiles, Hq): P = 2^(t - lse log2 e), dP = dO V^T, dS = P o (dP - delta),
//            dq = scale dS K, accumulated over the key steps in registers, written once.
//   dk, dv   grid (key tiles, Hkv): for every query head of the group and every query step that
//            sees the tile, P^T and dS^T as above, dv = P^T dO, dk = scale dS^T Q, accumulated in
//            registers and written once.
// No atomics: deterministic. S and dP are recomputed by the dq and dk/dv passes (7 products per
// visible tile pair instead of FlashAttention-2's 5 with atomic dq), which buys determinism and no
// fp32 dq workspace. Operands are loaded synchronously (no cp.async double-buffering yet).
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_launchers.cuh"
#include "kernels/flash_attention_math.h"

namespace freqkv::cuda {

namespace {

using namespace nvcuda;
using flash::Tile;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = flash::kTileRows;   // 64 tile rows: 16 per warp
constexpr int kStep = flash::kStepRows;   // 64 rows of the streamed operand per step
constexpr int kWarpRows = kRows / kWarps;  // 16
static_assert(kWarpRows == 16 && kStep % 16 == 0, "one 16-row fragment per warp");
static_assert(kRows == kStep, "stage_rows stages kStep rows, for tiles and steps alike");

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragAcol = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using FragBrow = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBcol = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Shared-memory geometry for head size D. Leading dimensions are padded (bf16 by 8, fp32 by 4)
// against bank conflicts and keep every fragment pointer 32-byte aligned, as WMMA requires.
template <int D>
struct Geometry {
  static_assert(D == 64 || D == 128, "flash attention serves head_dim 64 and 128");
  static constexpr int kLdh = D + 8;                       // bf16 operand tiles
  static constexpr int kLdp = kStep + 8;                   // bf16 P / dS tiles (16 x kStep)
  static constexpr int kLds = kStep + 4;                   // fp32 score scratch (16 x kStep)
  static constexpr int kLdo = D + 4;                       // fp32 output scratch (16 x D)
  static constexpr int kOperandBytes = kRows * kLdh * 2;   // one 64-row bf16 tile
  static constexpr int kProbBytes = kWarps * kWarpRows * kLdp * 2;
  // Per warp, two fp32 16 x kLds scratch tiles (S and dP), also used as one 16 x kLdo tile.
  static constexpr int kScratchFloatsPerWarp = 2 * kWarpRows * kLds;
  static constexpr int kScratchBytes = kWarps * kScratchFloatsPerWarp * 4;
  static_assert(kWarpRows * kLdo <= kScratchFloatsPerWarp, "output tile fits the scratch");
  static_assert(kOperandBytes % 128 == 0 && kProbBytes % 128 == 0 && kScratchBytes % 128 == 0,
                "regions stay 128-byte aligned");
};

// Rows [0, n_valid) of a head (row stride ld elements) into a kStep x D shared tile (stride kLdh),
// zero-filled beyond n_valid. 16-byte loads when the source allows them, else element by element.
template <int D>
__device__ inline void stage_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int64_t ld,
                                  int64_t n_valid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLdh = Geometry<D>::kLdh;
  const bool vectorized =
      ((reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(ld * 2)) & 15u) == 0;
  for (int idx = threadIdx.x; idx < kStep * kChunks; idx += kThreads) {
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    uint4 value = make_uint4(0u, 0u, 0u, 0u);
    if (r < n_valid) {
      const __nv_bfloat16* p = src + r * ld + c * 8;
      if (vectorized) {
        value = *reinterpret_cast<const uint4*>(p);
      } else {
        __align__(16) __nv_bfloat16 e[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) e[t] = p[t];
        value = *reinterpret_cast<const uint4*>(e);
      }
    }
    *reinterpret_cast<uint4*>(dst + r * kLdh + c * 8) = value;
  }
}

// Per-row statistics of a step (lse in log2 units, delta) into shared memory, 0 beyond n_valid.
__device__ inline void stage_row_stats(float* lse_log2, float* delta, const float* lse_global,
                                       const float* delta_global, int64_t first_row, int64_t n_valid,
                                       int n_heads, int head) {
  for (int r = threadIdx.x; r < kStep; r += kThreads) {
    const int64_t stat = (first_row + r) * n_heads + head;
    lse_log2[r] = r < n_valid ? flash::lse_to_log2(lse_global[stat]) : 0.0f;
    delta[r] = r < n_valid ? delta_global[stat] : 0.0f;
  }
}

// rows [0, n_rows) of a warp's fp32 16 x D scratch (stride kLdo) into global bf16 rows, times
// `multiplier` (per row when row_multiplier is given).
template <int D>
__device__ inline void write_rows(__nv_bfloat16* dst, int64_t ld, const float* scratch, int n_rows,
                                  float multiplier, const float* row_multiplier, int lane) {
  constexpr int kLdo = Geometry<D>::kLdo;
  for (int idx = lane; idx < kWarpRows * D; idx += 32) {
    const int r = idx / D;
    const int d = idx % D;
    if (r < n_rows) {
      const float m = row_multiplier != nullptr ? row_multiplier[r] : multiplier;
      dst[r * ld + d] = __float2bfloat16_rn(m * scratch[r * kLdo + d]);
    }
  }
}

// ---- forward --------------------------------------------------------------------------------------

template <int D>
__global__ void __launch_bounds__(kThreads)
    flash_forward_kernel(__nv_bfloat16* out, int64_t ld_out, float* lse, const __nv_bfloat16* q,
                         int64_t ld_q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                         int64_t ld_kv, const Tile* tiles, int n_heads, int group,
                         float scale_log2) {
  using G = Geometry<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* k_tile = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* v_tile = k_tile + kStep * G::kLdh;
  float* scratch = reinterpret_cast<float*>(smem + 2 * G::kOperandBytes);
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(scratch);  // before the first step
  static_assert(G::kOperandBytes <= G::kScratchBytes, "the query tile fits the scratch");
  __nv_bfloat16* probs =
      reinterpret_cast<__nv_bfloat16*>(smem + 2 * G::kOperandBytes + G::kScratchBytes);
  float* corrections = reinterpret_cast<float*>(smem + 2 * G::kOperandBytes + G::kScratchBytes +
                                                G::kProbBytes);          // kRows
  float* row_index = corrections + kRows;                                 // 16 x 16
  float* inv_sums = row_index + 16 * 16;                                  // kRows

  const Tile tile = tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t offset = flash::causal_offset(tile);
  const int64_t n_keys = flash::query_tile_key_end(tile, kRows);
  const int64_t kv_col = static_cast<int64_t>(head / group) * D;
  const __nv_bfloat16* k_head = k + tile.kv_start * ld_kv + kv_col;
  const __nv_bfloat16* v_head = v + tile.kv_start * ld_kv + kv_col;

  // The query tile, then this warp's 16 query rows as D/16 A fragments kept in registers.
  stage_rows<D>(q_tile, q + (tile.q_start + tile.row0) * ld_q + static_cast<int64_t>(head) * D,
                ld_q, tile.n_q - tile.row0);
  for (int idx = threadIdx.x; idx < 16 * 16; idx += kThreads) {
    row_index[idx] = static_cast<float>(idx / 16);
  }
  __syncthreads();
  FragA q_frag[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    wmma::load_matrix_sync(q_frag[kk], q_tile + warp * kWarpRows * G::kLdh + kk * 16, G::kLdh);
  }
  FragC rows_of;  // rows_of.x[e] = the row (0..15) of element e of any FragC
  wmma::load_matrix_sync(rows_of, row_index, 16, wmma::mem_row_major);
  FragC o_frag[D / 16];
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) wmma::fill_fragment(o_frag[nt], 0.0f);

  float* s_warp = scratch + warp * G::kScratchFloatsPerWarp;  // 16 x kLds
  __nv_bfloat16* p_warp = probs + warp * kWarpRows * G::kLdp;
  float* corr_warp = corrections + warp * kWarpRows;
  // Softmax layout: two lanes per row, lane parity picking alternate columns (2 c + half).
  const int my_row = lane / 2;
  const int half = lane % 2;
  constexpr int kHalfCols = kStep / 2;
  const int64_t i = tile.row0 + warp * kWarpRows + my_row;  // this lane's query in the block
  const int64_t warp_row_end = tile.row0 + (warp + 1) * kWarpRows;  // one past the warp's rows
  // Rows past n_q (a partial last tile) are computed like the others on zero queries and never
  // written: they see key 0, so nothing in them becomes NaN.
  flash::OnlineSoftmax<float> softmax = flash::OnlineSoftmax<float>::start();

  for (int64_t j0 = 0; j0 < n_keys; j0 += kStep) {
    __syncthreads();  // every warp is done with the previous step's k/v (and the query tile)
    stage_rows<D>(k_tile, k_head + j0 * ld_kv, ld_kv, n_keys - j0);
    stage_rows<D>(v_tile, v_head + j0 * ld_kv, ld_kv, n_keys - j0);
    __syncthreads();
    // A warp whose rows see none of these keys (or lie past the block) would only add zeros.
    if (warp_row_end - kWarpRows >= tile.n_q || !flash::any_visible(warp_row_end, j0, offset))
      continue;

#pragma unroll
    for (int nt = 0; nt < kStep / 16; ++nt) {
      FragC s_frag;
      wmma::fill_fragment(s_frag, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragBcol k_frag;  // K^T: element (d, key) at k_tile[key * kLdh + d]
        wmma::load_matrix_sync(k_frag, k_tile + nt * 16 * G::kLdh + kk * 16, G::kLdh);
        wmma::mma_sync(s_frag, q_frag[kk], k_frag, s_frag);
      }
      wmma::store_matrix_sync(s_warp + nt * 16, s_frag, G::kLds, wmma::mem_row_major);
    }
    __syncwarp();

    float t[kHalfCols];
    float step_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < kHalfCols; ++c) {
      const int col = 2 * c + half;
      t[c] = flash::score_kept(i, j0 + col, offset, n_keys)
                 ? s_warp[my_row * G::kLds + col] * scale_log2
                 : -INFINITY;
      step_max = fmaxf(step_max, t[c]);
    }
    step_max = fmaxf(step_max, __shfl_xor_sync(0xffffffffu, step_max, 1));
    const float correction = softmax.update(step_max);
    const float base = softmax.base();
    float step_sum = 0.0f;
#pragma unroll
    for (int c = 0; c < kHalfCols; ++c) {
      const float p = flash::flash_exp2(t[c] - base);
      step_sum += p;
      p_warp[my_row * G::kLdp + 2 * c + half] = __float2bfloat16_rn(p);
    }
    step_sum += __shfl_xor_sync(0xffffffffu, step_sum, 1);
    softmax.add(step_sum);
    if (half == 0) corr_warp[my_row] = correction;
    __syncwarp();

#pragma unroll
    for (int nt = 0; nt < D / 16; ++nt) {
#pragma unroll
      for (int e = 0; e < FragC::num_elements; ++e) {
        o_frag[nt].x[e] *= corr_warp[static_cast<int>(rows_of.x[e])];
      }
    }
    FragA p_frag[kStep / 16];
#pragma unroll
    for (int kk = 0; kk < kStep / 16; ++kk) {
      wmma::load_matrix_sync(p_frag[kk], p_warp + kk * 16, G::kLdp);
    }
#pragma unroll
    for (int nt = 0; nt < D / 16; ++nt) {
#pragma unroll
      for (int kk = 0; kk < kStep / 16; ++kk) {
        FragBrow v_frag;  // V: element (key, d) at v_tile[key * kLdh + d]
        wmma::load_matrix_sync(v_frag, v_tile + kk * 16 * G::kLdh + nt * 16, G::kLdh);
        wmma::mma_sync(o_frag[nt], p_frag[kk], v_frag, o_frag[nt]);
      }
    }
    __syncwarp();  // p_warp and corr_warp are rewritten by the next step
  }

  // out = O / l, lse = ln 2 (m + log2 l), for the rows inside the block.
  const int64_t warp_row0 = tile.row0 + warp * kWarpRows;
  const int n_rows = static_cast<int>(
      max(int64_t{0}, min(static_cast<int64_t>(kWarpRows), tile.n_q - warp_row0)));
  float* o_warp = s_warp;  // 16 x kLdo
  float* inv_warp = inv_sums + warp * kWarpRows;
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) {
    wmma::store_matrix_sync(o_warp + nt * 16, o_frag[nt], G::kLdo, wmma::mem_row_major);
  }
  if (half == 0) {
    inv_warp[my_row] = 1.0f / softmax.sum;
    if (my_row < n_rows) lse[(tile.q_start + i) * n_heads + head] = softmax.lse();
  }
  __syncwarp();
  write_rows<D>(out + (tile.q_start + warp_row0) * ld_out + static_cast<int64_t>(head) * D, ld_out,
                o_warp, n_rows, 1.0f, inv_warp, lane);
}

// ---- backward: delta = rowsum(dO o O) -----------------------------------------------------------

template <int D>
__global__ void __launch_bounds__(kThreads)
    flash_delta_kernel(float* delta, const __nv_bfloat16* dout, const __nv_bfloat16* out,
                       int64_t ld_dout, const Tile* tiles, int n_heads) {
  const Tile tile = tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int r = warp; r < kRows; r += kWarps) {
    const int64_t i = tile.row0 + r;
    if (i >= tile.n_q) break;
    const int64_t row = tile.q_start + i;
    const __nv_bfloat16* o_row = out + row * ld_dout + static_cast<int64_t>(head) * D;
    const __nv_bfloat16* do_row = dout + row * ld_dout + static_cast<int64_t>(head) * D;
    float sum = 0.0f;
#pragma unroll
    for (int d = lane; d < D; d += 32) {
      sum = fmaf(__bfloat162float(do_row[d]), __bfloat162float(o_row[d]), sum);
    }
    sum = warp_sum(sum);
    if (lane == 0) delta[row * n_heads + head] = sum;
  }
}

// ---- backward: dq ---------------------------------------------------------------------------------

template <int D>
__global__ void __launch_bounds__(kThreads)
    flash_dq_kernel(__nv_bfloat16* dq, const __nv_bfloat16* dout, int64_t ld_dout,
                    const float* lse, const float* delta, const __nv_bfloat16* q, int64_t ld_q,
                    const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t ld_kv,
                    const Tile* tiles, int n_heads, int group, float scale, float scale_log2) {
  using G = Geometry<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* k_tile = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* v_tile = k_tile + kStep * G::kLdh;
  float* scratch = reinterpret_cast<float*>(smem + 2 * G::kOperandBytes);
  // The query and dout tiles live in the scratch until their fragments are loaded.
  static_assert(2 * G::kOperandBytes <= G::kScratchBytes, "query and dout tiles fit the scratch");
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(scratch);
  __nv_bfloat16* do_tile = q_tile + kRows * G::kLdh;
  __nv_bfloat16* ds_all =
      reinterpret_cast<__nv_bfloat16*>(smem + 2 * G::kOperandBytes + G::kScratchBytes);
  float* lse_rows = reinterpret_cast<float*>(smem + 2 * G::kOperandBytes + G::kScratchBytes +
                                             G::kProbBytes);  // kRows, log2 units
  float* delta_rows = lse_rows + kRows;                       // kRows

  const Tile tile = tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t offset = flash::causal_offset(tile);
  const int64_t n_keys = flash::query_tile_key_end(tile, kRows);
  const int64_t q_col = static_cast<int64_t>(head) * D;
  const int64_t kv_col = static_cast<int64_t>(head / group) * D;
  const int64_t first_row = tile.q_start + tile.row0;
  const int64_t n_valid = tile.n_q - tile.row0;
  const __nv_bfloat16* k_head = k + tile.kv_start * ld_kv + kv_col;
  const __nv_bfloat16* v_head = v + tile.kv_start * ld_kv + kv_col;

  stage_rows<D>(q_tile, q + first_row * ld_q + q_col, ld_q, n_valid);
  stage_rows<D>(do_tile, dout + first_row * ld_dout + q_col, ld_dout, n_valid);
  stage_row_stats(lse_rows, delta_rows, lse, delta, first_row, n_valid, n_heads, head);
  __syncthreads();
  FragA q_frag[D / 16];
  FragA do_frag[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    wmma::load_matrix_sync(q_frag[kk], q_tile + warp * kWarpRows * G::kLdh + kk * 16, G::kLdh);
    wmma::load_matrix_sync(do_frag[kk], do_tile + warp * kWarpRows * G::kLdh + kk * 16, G::kLdh);
  }
  FragC dq_frag[D / 16];
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) wmma::fill_fragment(dq_frag[nt], 0.0f);

  float* s_warp = scratch + warp * G::kScratchFloatsPerWarp;  // 16 x kLds: S
  float* dp_warp = s_warp + kWarpRows * G::kLds;               // 16 x kLds: dP
  __nv_bfloat16* ds_warp = ds_all + warp * kWarpRows * G::kLdp;
  const int my_row = lane / 2;
  const int half = lane % 2;
  constexpr int kHalfCols = kStep / 2;
  const int64_t i = tile.row0 + warp * kWarpRows + my_row;
  const float row_lse_log2 = lse_rows[warp * kWarpRows + my_row];
  const float row_delta = delta_rows[warp * kWarpRows + my_row];
  const int64_t warp_row_end = tile.row0 + (warp + 1) * kWarpRows;

  for (int64_t j0 = 0; j0 < n_keys; j0 += kStep) {
    __syncthreads();  // previous k/v consumed; the first time: q/dout fragments loaded
    stage_rows<D>(k_tile, k_head + j0 * ld_kv, ld_kv, n_keys - j0);
    stage_rows<D>(v_tile, v_head + j0 * ld_kv, ld_kv, n_keys - j0);
    __syncthreads();
    if (warp_row_end - kWarpRows >= tile.n_q || !flash::any_visible(warp_row_end, j0, offset))
      continue;

#pragma unroll 1
    for (int nt = 0; nt < kStep / 16; ++nt) {
      FragC s_frag, dp_frag;
      wmma::fill_fragment(s_frag, 0.0f);
      wmma::fill_fragment(dp_frag, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragBcol kt_frag, vt_frag;  // K^T and V^T
        wmma::load_matrix_sync(kt_frag, k_tile + nt * 16 * G::kLdh + kk * 16, G::kLdh);
        wmma::load_matrix_sync(vt_frag, v_tile + nt * 16 * G::kLdh + kk * 16, G::kLdh);
        wmma::mma_sync(s_frag, q_frag[kk], kt_frag, s_frag);
        wmma::mma_sync(dp_frag, do_frag[kk], vt_frag, dp_frag);
      }
      wmma::store_matrix_sync(s_warp + nt * 16, s_frag, G::kLds, wmma::mem_row_major);
      wmma::store_matrix_sync(dp_warp + nt * 16, dp_frag, G::kLds, wmma::mem_row_major);
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < kHalfCols; ++c) {
      const int col = 2 * c + half;
      float ds = 0.0f;
      if (flash::score_kept(i, j0 + col, offset, n_keys)) {
        const float p =
            flash::recomputed_p(s_warp[my_row * G::kLds + col] * scale_log2, row_lse_log2);
        ds = flash::softmax_grad(p, dp_warp[my_row * G::kLds + col], row_delta);
      }
      ds_warp[my_row * G::kLdp + col] = __float2bfloat16_rn(ds);
    }
    __syncwarp();
#pragma unroll 1
    for (int kk = 0; kk < kStep / 16; ++kk) {
      FragA ds_frag;
      wmma::load_matrix_sync(ds_frag, ds_warp + kk * 16, G::kLdp);
#pragma unroll
      for (int nt = 0; nt < D / 16; ++nt) {
        FragBrow k_frag;  // K: element (key, d) at k_tile[key * kLdh + d]
        wmma::load_matrix_sync(k_frag, k_tile + kk * 16 * G::kLdh + nt * 16, G::kLdh);
        wmma::mma_sync(dq_frag[nt], ds_frag, k_frag, dq_frag[nt]);
      }
    }
    __syncwarp();  // s/dp/ds scratch is rewritten by the next step
  }

  const int64_t warp_row0 = tile.row0 + warp * kWarpRows;
  const int n_rows = static_cast<int>(
      max(int64_t{0}, min(static_cast<int64_t>(kWarpRows), tile.n_q - warp_row0)));
  float* o_warp = s_warp;  // 16 x kLdo
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) {
    wmma::store_matrix_sync(o_warp + nt * 16, dq_frag[nt], G::kLdo, wmma::mem_row_major);
  }
  __syncwarp();
  write_rows<D>(dq + (tile.q_start + warp_row0) * ld_q + q_col, ld_q, o_warp, n_rows, scale,
                nullptr, lane);
}

// ---- backward: dk, dv -----------------------------------------------------------------------------

template <int D>
__global__ void __launch_bounds__(kThreads)
    flash_dkv_kernel(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                     int64_t ld_dout, const float* lse, const float* delta,
                     const __nv_bfloat16* q, int64_t ld_q, const __nv_bfloat16* k,
                     const __nv_bfloat16* v, int64_t ld_kv, const Tile* tiles, int n_heads,
                     int group, float scale, float scale_log2) {
  using G = Geometry<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* k_tile = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* v_tile = k_tile + kRows * G::kLdh;
  __nv_bfloat16* q_tile = v_tile + kRows * G::kLdh;
  __nv_bfloat16* do_tile = q_tile + kStep * G::kLdh;
  float* scratch = reinterpret_cast<float*>(smem + 4 * G::kOperandBytes);
  __nv_bfloat16* probs =
      reinterpret_cast<__nv_bfloat16*>(smem + 4 * G::kOperandBytes + G::kScratchBytes);
  __nv_bfloat16* dss = probs + kWarps * kWarpRows * G::kLdp;
  float* lse_rows = reinterpret_cast<float*>(smem + 4 * G::kOperandBytes + G::kScratchBytes +
                                             2 * G::kProbBytes);  // kStep, log2 units
  float* delta_rows = lse_rows + kStep;                            // kStep

  const Tile tile = tiles[blockIdx.x];
  const int kv_head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t offset = flash::causal_offset(tile);
  const int64_t kv_col = static_cast<int64_t>(kv_head) * D;
  const int64_t query_begin = flash::key_tile_query_begin(tile);
  const int64_t first_kv_row = tile.kv_start + tile.row0;
  const int64_t n_valid_keys = tile.n_kv - tile.row0;

  stage_rows<D>(k_tile, k + first_kv_row * ld_kv + kv_col, ld_kv, n_valid_keys);
  stage_rows<D>(v_tile, v + first_kv_row * ld_kv + kv_col, ld_kv, n_valid_keys);
  FragC dk_frag[D / 16], dv_frag[D / 16];
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) {
    wmma::fill_fragment(dk_frag[nt], 0.0f);
    wmma::fill_fragment(dv_frag[nt], 0.0f);
  }

  float* s_warp = scratch + warp * G::kScratchFloatsPerWarp;  // 16 keys x kLds queries: S^T
  float* dp_warp = s_warp + kWarpRows * G::kLds;               // dP^T
  __nv_bfloat16* p_warp = probs + warp * kWarpRows * G::kLdp;  // P^T, bf16
  __nv_bfloat16* ds_warp = dss + warp * kWarpRows * G::kLdp;   // dS^T, bf16
  const __nv_bfloat16* k_warp = k_tile + warp * kWarpRows * G::kLdh;
  const __nv_bfloat16* v_warp = v_tile + warp * kWarpRows * G::kLdh;
  const int my_row = lane / 2;  // the key row (within the warp's 16) of this lane's half row
  const int half = lane % 2;
  constexpr int kHalfCols = kStep / 2;
  const int64_t warp_key0 = tile.row0 + warp * kWarpRows;
  const int64_t j = warp_key0 + my_row;  // this lane's key in the block
  const bool key_active = j < tile.n_kv;

  for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    const int64_t q_col = static_cast<int64_t>(head) * D;
    for (int64_t i0 = query_begin; i0 < tile.n_q; i0 += kStep) {
      const int64_t n_valid = tile.n_q - i0;
      __syncthreads();  // the previous step's q/dout/statistics are consumed
      stage_rows<D>(q_tile, q + (tile.q_start + i0) * ld_q + q_col, ld_q, n_valid);
      stage_rows<D>(do_tile, dout + (tile.q_start + i0) * ld_dout + q_col, ld_dout, n_valid);
      stage_row_stats(lse_rows, delta_rows, lse, delta, tile.q_start + i0, n_valid, n_heads,
                      head);
      __syncthreads();
      // Queries [i0, i0 + kStep) against this warp's keys: skipped when none sees the first key.
      if (warp_key0 >= tile.n_kv || !flash::any_visible(i0 + kStep, warp_key0, offset)) continue;

#pragma unroll 1
      for (int nt = 0; nt < kStep / 16; ++nt) {
        FragC s_frag, dp_frag;
        wmma::fill_fragment(s_frag, 0.0f);
        wmma::fill_fragment(dp_frag, 0.0f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          FragA k_frag, v_frag;
          FragBcol qt_frag, dot_frag;  // Q^T and dO^T: element (d, query) at tile[query * kLdh + d]
          wmma::load_matrix_sync(k_frag, k_warp + kk * 16, G::kLdh);
          wmma::load_matrix_sync(v_frag, v_warp + kk * 16, G::kLdh);
          wmma::load_matrix_sync(qt_frag, q_tile + nt * 16 * G::kLdh + kk * 16, G::kLdh);
          wmma::load_matrix_sync(dot_frag, do_tile + nt * 16 * G::kLdh + kk * 16, G::kLdh);
          wmma::mma_sync(s_frag, k_frag, qt_frag, s_frag);
          wmma::mma_sync(dp_frag, v_frag, dot_frag, dp_frag);
        }
        wmma::store_matrix_sync(s_warp + nt * 16, s_frag, G::kLds, wmma::mem_row_major);
        wmma::store_matrix_sync(dp_warp + nt * 16, dp_frag, G::kLds, wmma::mem_row_major);
      }
      __syncwarp();
#pragma unroll
      for (int c = 0; c < kHalfCols; ++c) {
        const int col = 2 * c + half;
        const int64_t i = i0 + col;
        float p = 0.0f, ds = 0.0f;
        if (key_active && i < tile.n_q && flash::key_visible(i, j, offset)) {
          p = flash::recomputed_p(s_warp[my_row * G::kLds + col] * scale_log2, lse_rows[col]);
          ds = flash::softmax_grad(p, dp_warp[my_row * G::kLds + col], delta_rows[col]);
        }
        p_warp[my_row * G::kLdp + col] = __float2bfloat16_rn(p);
        ds_warp[my_row * G::kLdp + col] = __float2bfloat16_rn(ds);
      }
      __syncwarp();
#pragma unroll 1
      for (int kk = 0; kk < kStep / 16; ++kk) {
        FragA p_frag, ds_frag;
        wmma::load_matrix_sync(p_frag, p_warp + kk * 16, G::kLdp);
        wmma::load_matrix_sync(ds_frag, ds_warp + kk * 16, G::kLdp);
#pragma unroll
        for (int nt = 0; nt < D / 16; ++nt) {
          FragBrow do_frag, q_frag;  // dO and Q: element (query, d) at tile[query * kLdh + d]
          wmma::load_matrix_sync(do_frag, do_tile + kk * 16 * G::kLdh + nt * 16, G::kLdh);
          wmma::load_matrix_sync(q_frag, q_tile + kk * 16 * G::kLdh + nt * 16, G::kLdh);
          wmma::mma_sync(dv_frag[nt], p_frag, do_frag, dv_frag[nt]);
          wmma::mma_sync(dk_frag[nt], ds_frag, q_frag, dk_frag[nt]);
        }
      }
      __syncwarp();
    }
  }

  // dk = scale dS^T Q and dv = P^T dO for the tile's key rows (zero when no query sees them).
  const int n_rows = static_cast<int>(
      max(int64_t{0}, min(static_cast<int64_t>(kWarpRows), tile.n_kv - warp_key0)));
  float* o_warp = s_warp;  // 16 x kLdo
  __syncwarp();
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) {
    wmma::store_matrix_sync(o_warp + nt * 16, dk_frag[nt], G::kLdo, wmma::mem_row_major);
  }
  __syncwarp();
  write_rows<D>(dk + (tile.kv_start + warp_key0) * ld_kv + kv_col, ld_kv, o_warp, n_rows, scale,
                nullptr, lane);
  __syncwarp();
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) {
    wmma::store_matrix_sync(o_warp + nt * 16, dv_frag[nt], G::kLdo, wmma::mem_row_major);
  }
  __syncwarp();
  write_rows<D>(dv + (tile.kv_start + warp_key0) * ld_kv + kv_col, ld_kv, o_warp, n_rows, 1.0f,
                nullptr, lane);
}

// ---- launch helpers -----------------------------------------------------------------------------

template <int D>
constexpr int forward_smem_bytes() {
  using G = Geometry<D>;
  return 2 * G::kOperandBytes + G::kScratchBytes + G::kProbBytes + (kRows + 16 * 16 + kRows) * 4;
}
template <int D>
constexpr int dq_smem_bytes() {
  using G = Geometry<D>;
  return 2 * G::kOperandBytes + G::kScratchBytes + G::kProbBytes + 2 * kRows * 4;
}
template <int D>
constexpr int dkv_smem_bytes() {
  using G = Geometry<D>;
  return 4 * G::kOperandBytes + G::kScratchBytes + 2 * G::kProbBytes + 2 * kStep * 4;
}

// Calls body(std::integral_constant<int, D>) for head_dim 64 or 128.
template <typename Body>
void dispatch_flash_head_dim(int head_dim, const char* where, Body&& body) {
  if (head_dim == 64) {
    body(std::integral_constant<int, 64>());
  } else if (head_dim == 128) {
    body(std::integral_constant<int, 128>());
  } else {
    throw std::invalid_argument(std::string(where) + ": head_dim = " + std::to_string(head_dim) +
                                " is not served by the flash kernels (64 or 128)");
  }
}

dim3 flash_grid(int64_t n_tiles, int n_heads, const char* where) {
  if (n_tiles > INT32_MAX || n_heads > 65535) {
    throw std::invalid_argument(std::string(where) + ": " + std::to_string(n_tiles) + " tiles x " +
                                std::to_string(n_heads) +
                                " heads exceed the CUDA grid (2^31 - 1 x 65535)");
  }
  return dim3(static_cast<unsigned>(n_tiles), static_cast<unsigned>(n_heads));
}

// Dynamic shared memory beyond the default 48 KiB must be allowed per kernel (and device).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, int bytes, const char* name) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             name);
}

}  // namespace

bool flash_attention_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

void flash_attention_forward(const LaunchContext& ctx, __nv_bfloat16* out, int64_t ld_out,
                             float* lse, const __nv_bfloat16* q, int64_t ld_q,
                             const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t ld_kv,
                             const AttentionTile* query_tiles, int64_t n_query_tiles,
                             const AttnShape& shape) {
  if (n_query_tiles <= 0) return;
  const dim3 grid = flash_grid(n_query_tiles, shape.n_heads, "flash attention_forward");
  const int group = shape.n_heads / shape.n_kv_heads;
  const float scale_log2 = static_cast<float>(shape.scale * flash::kLog2e);
  dispatch_flash_head_dim(shape.head_dim, "flash attention_forward", [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    constexpr int bytes = forward_smem_bytes<D>();
    allow_shared_memory(flash_forward_kernel<D>, bytes, "flash_forward_kernel shared memory");
    flash_forward_kernel<D><<<grid, kThreads, bytes, ctx.stream>>>(
        out, ld_out, lse, q, ld_q, k, v, ld_kv, query_tiles, shape.n_heads, group, scale_log2);
  });
  check_launch("flash_forward_kernel");
}

void flash_attention_backward(const LaunchContext& ctx, __nv_bfloat16* dq, __nv_bfloat16* dk,
                              __nv_bfloat16* dv, const __nv_bfloat16* dout, int64_t ld_dout,
                              const __nv_bfloat16* out, const float* lse, const __nv_bfloat16* q,
                              int64_t ld_q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                              int64_t ld_kv, const AttentionTile* query_tiles,
                              int64_t n_query_tiles, const AttentionTile* key_tiles,
                              int64_t n_key_tiles, int64_t n_query_rows, const AttnShape& shape) {
  if (n_key_tiles <= 0) return;  // no key rows: no query rows either (n_kv >= n_q)
  const int group = shape.n_heads / shape.n_kv_heads;
  const float scale = static_cast<float>(shape.scale);
  const float scale_log2 = static_cast<float>(shape.scale * flash::kLog2e);
  ScratchBuffer delta(ctx, sizeof(float) * std::max<int64_t>(n_query_rows, 1) * shape.n_heads,
                      "flash attention_backward rowsum(dO o O)");
  dispatch_flash_head_dim(shape.head_dim, "flash attention_backward", [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    if (n_query_tiles > 0) {
      const dim3 grid = flash_grid(n_query_tiles, shape.n_heads, "flash attention_backward");
      flash_delta_kernel<D><<<grid, kThreads, 0, ctx.stream>>>(delta.as<float>(), dout, out,
                                                               ld_dout, query_tiles,
                                                               shape.n_heads);
      check_launch("flash_delta_kernel");
      constexpr int dq_bytes = dq_smem_bytes<D>();
      allow_shared_memory(flash_dq_kernel<D>, dq_bytes, "flash_dq_kernel shared memory");
      flash_dq_kernel<D><<<grid, kThreads, dq_bytes, ctx.stream>>>(
          dq, dout, ld_dout, lse, delta.as<float>(), q, ld_q, k, v, ld_kv, query_tiles,
          shape.n_heads, group, scale, scale_log2);
      check_launch("flash_dq_kernel");
    }
    const dim3 grid = flash_grid(n_key_tiles, shape.n_kv_heads, "flash attention_backward");
    constexpr int dkv_bytes = dkv_smem_bytes<D>();
    allow_shared_memory(flash_dkv_kernel<D>, dkv_bytes, "flash_dkv_kernel shared memory");
    flash_dkv_kernel<D><<<grid, kThreads, dkv_bytes, ctx.stream>>>(
        dk, dv, dout, ld_dout, lse, delta.as<float>(), q, ld_q, k, v, ld_kv, key_tiles,
        shape.n_heads, group, scale, scale_log2);
    check_launch("flash_dkv_kernel");
  });
}

}  // namespace freqkv::cuda
