// Varlen causal attention with grouped-query heads on FreqKV blocks (see AttnBlock in
// kernels/kernels.h and kernels/cpu/attention.cpp for the contract), fused, fp32 arithmetic on
// bf16 storage.
//
// Layout shared by the three kernels: 256 threads per block, every row (a query, or a key in the
// dk/dv pass) held by kLanes = kMaxD / 32 neighbouring threads of one warp, each owning 32 of the
// head's dimensions as 16 bf16 pairs (pair p = lane + kLanes * t, so the kLanes threads of a row
// read consecutive 4-byte words of a staged row: no shared-memory bank conflicts). A tile is the
// 256 / kLanes rows of one block's one head; the other operand streams through shared memory in
// steps of 32 rows. kMaxD is the head size rounded up to 32, 64, 128 or 256; dimensions beyond
// head_dim are zero in registers and in shared memory.
//
//   forward   one block per (query tile, query head): online softmax over the visible keys,
//             out = P V / rowsum(P), lse = max + log(rowsum).
//   dq        one block per (query tile, query head): recomputes P = exp(S - lse) and
//             dP = dO V^T key by key, dS = P o (dP - delta) with delta = rowsum(dO o O) (which it
//             also stores for the next pass), dq = scale dS K.
//   dk, dv    one block per (key tile, key/value head): walks the queries of every query head of
//             its group that see the tile's keys, dv = P^T dO, dk = scale dS^T Q, accumulated in
//             registers and written once: no atomics, deterministic.
//
// Known performance limits: the dot products run on CUDA cores in fp32 (no tensor-core MMA), so
// this is an order of magnitude or more below flash-attention's throughput; S is recomputed in
// both backward passes; masked keys of a tile's diagonal step are computed and discarded.
#include <cuda_bf16.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_launchers.cuh"

namespace freqkv::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kDimsPerThread = 32;
constexpr int kPairsPerThread = kDimsPerThread / 2;
constexpr int kKeysPerStep = 32;     // forward and dq: key/value rows staged per step
constexpr int kQueriesPerStep = 32;  // dk/dv: query/dout rows staged per step

template <int kMaxD>
struct TileLayout {
  static_assert(kMaxD % kDimsPerThread == 0 && kMaxD <= kMaxAttentionHeadDim, "bad head size");
  static constexpr int kLanes = kMaxD / kDimsPerThread;  // threads per row: 1, 2, 4 or 8
  static constexpr int kRows = kThreads / kLanes;        // rows per tile
};

// This thread's 32 dimensions of a global row (zero beyond head_dim, or everywhere for nullptr).
template <int kLanes>
__device__ inline void load_slice(float (&x)[kDimsPerThread], const __nv_bfloat16* row,
                                  int head_dim, int lane) {
#pragma unroll
  for (int t = 0; t < kPairsPerThread; ++t) {
    const int d = 2 * (lane + kLanes * t);
    x[2 * t] = row != nullptr && d < head_dim ? __bfloat162float(row[d]) : 0.0f;
    x[2 * t + 1] = row != nullptr && d + 1 < head_dim ? __bfloat162float(row[d + 1]) : 0.0f;
  }
}

// row[d] = multiplier * x[d] for this thread's dimensions below head_dim.
template <int kLanes>
__device__ inline void store_slice(__nv_bfloat16* row, const float (&x)[kDimsPerThread],
                                   float multiplier, int head_dim, int lane) {
#pragma unroll
  for (int t = 0; t < kPairsPerThread; ++t) {
    const int d = 2 * (lane + kLanes * t);
    if (d < head_dim) row[d] = __float2bfloat16_rn(multiplier * x[2 * t]);
    if (d + 1 < head_dim) row[d + 1] = __float2bfloat16_rn(multiplier * x[2 * t + 1]);
  }
}

// This thread's share of the dot product of its slice with a global row.
template <int kLanes>
__device__ inline float dot_global(const float (&x)[kDimsPerThread], const __nv_bfloat16* row,
                                   int head_dim, int lane) {
  float sum = 0.0f;
#pragma unroll
  for (int t = 0; t < kPairsPerThread; ++t) {
    const int d = 2 * (lane + kLanes * t);
    if (d < head_dim) sum = fmaf(x[2 * t], __bfloat162float(row[d]), sum);
    if (d + 1 < head_dim) sum = fmaf(x[2 * t + 1], __bfloat162float(row[d + 1]), sum);
  }
  return sum;
}

// This thread's share of the dot product of its slice with a staged row.
template <int kLanes>
__device__ inline float dot_staged(const float (&x)[kDimsPerThread], const __nv_bfloat162* staged,
                                   int lane) {
  float sum = 0.0f;
#pragma unroll
  for (int t = 0; t < kPairsPerThread; ++t) {
    const float2 y = __bfloat1622float2(staged[lane + kLanes * t]);
    sum = fmaf(x[2 * t], y.x, sum);
    sum = fmaf(x[2 * t + 1], y.y, sum);
  }
  return sum;
}

// acc += a * staged row, on this thread's dimensions.
template <int kLanes>
__device__ inline void axpy_staged(float (&acc)[kDimsPerThread], float a,
                                   const __nv_bfloat162* staged, int lane) {
#pragma unroll
  for (int t = 0; t < kPairsPerThread; ++t) {
    const float2 y = __bfloat1622float2(staged[lane + kLanes * t]);
    acc[2 * t] = fmaf(a, y.x, acc[2 * t]);
    acc[2 * t + 1] = fmaf(a, y.y, acc[2 * t + 1]);
  }
}

// The sum over the kLanes threads of a row, returned to all of them (the butterfly adds the same
// two numbers on every lane, so they agree bit for bit).
template <int kLanes>
__device__ inline float row_sum(float partial) {
#pragma unroll
  for (int offset = 1; offset < kLanes; offset <<= 1) {
    partial += __shfl_xor_sync(0xffffffffu, partial, offset);
  }
  return partial;
}

// Copies rows [0, n_valid) of a head (row stride ld) into `staged` (kStagedRows x kMaxD),
// zero-filling the dimensions >= head_dim and the rows >= n_valid.
template <int kMaxD, int kStagedRows>
__device__ inline void stage_rows(__nv_bfloat16* staged, const __nv_bfloat16* src, int64_t ld,
                                  int64_t n_valid, int head_dim) {
  for (int idx = threadIdx.x; idx < kStagedRows * kMaxD; idx += kThreads) {
    const int r = idx / kMaxD;
    const int d = idx % kMaxD;
    staged[idx] = r < n_valid && d < head_dim ? src[r * ld + d] : __float2bfloat16_rn(0.0f);
  }
}

template <int kMaxD>
__device__ inline const __nv_bfloat162* staged_row(const __nv_bfloat16* staged, int r) {
  return reinterpret_cast<const __nv_bfloat162*>(staged + r * kMaxD);
}

template <int kMaxD>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(__nv_bfloat16* out, int64_t ld_out, float* lse, const __nv_bfloat16* q,
                             int64_t ld_q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                             int64_t ld_kv, const AttentionTile* tiles, int n_heads, int group,
                             int head_dim, float scale) {
  using Layout = TileLayout<kMaxD>;
  constexpr int kLanes = Layout::kLanes;
  __shared__ __align__(16) __nv_bfloat16 k_stage[kKeysPerStep * kMaxD];
  __shared__ __align__(16) __nv_bfloat16 v_stage[kKeysPerStep * kMaxD];

  const AttentionTile tile = tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int64_t kv_offset = static_cast<int64_t>(head / group) * head_dim;
  const int lane = threadIdx.x % kLanes;
  const int64_t i = tile.row0 + threadIdx.x / kLanes;  // query within the block
  const bool active = i < tile.n_q;
  const int64_t causal_offset =
      tile.n_kv - tile.n_q;  // bottom-right: query i sees keys <= i + offset
  const int64_t last_key = active ? i + causal_offset : -1;
  const int64_t n_keys = min(tile.n_q, tile.row0 + Layout::kRows) + causal_offset;  // any row's
  const int64_t q_row = tile.q_start + i;

  float qx[kDimsPerThread];
  load_slice<kLanes>(qx,
                     active ? q + q_row * ld_q + static_cast<int64_t>(head) * head_dim : nullptr,
                     head_dim, lane);
  float acc[kDimsPerThread];
#pragma unroll
  for (int d = 0; d < kDimsPerThread; ++d) acc[d] = 0.0f;
  float running_max = -INFINITY;
  float running_sum = 0.0f;
  const __nv_bfloat16* k_head = k + tile.kv_start * ld_kv + kv_offset;
  const __nv_bfloat16* v_head = v + tile.kv_start * ld_kv + kv_offset;

  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeysPerStep) {
    __syncthreads();  // the previous step has finished reading the staged rows
    stage_rows<kMaxD, kKeysPerStep>(k_stage, k_head + j0 * ld_kv, ld_kv, n_keys - j0, head_dim);
    stage_rows<kMaxD, kKeysPerStep>(v_stage, v_head + j0 * ld_kv, ld_kv, n_keys - j0, head_dim);
    __syncthreads();

    float scores[kKeysPerStep];
    float step_max = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < kKeysPerStep; ++jj) {
      const float dot =
          row_sum<kLanes>(dot_staged<kLanes>(qx, staged_row<kMaxD>(k_stage, jj), lane));
      scores[jj] = j0 + jj <= last_key ? scale * dot : -INFINITY;
      step_max = fmaxf(step_max, scores[jj]);
    }
    const float new_max = fmaxf(running_max, step_max);
    // A row that has seen no key yet (only inactive rows) keeps exp() away from -inf - -inf.
    const float base = new_max == -INFINITY ? 0.0f : new_max;
    const float correction = expf(running_max - base);
    running_sum *= correction;
#pragma unroll
    for (int d = 0; d < kDimsPerThread; ++d) acc[d] *= correction;
#pragma unroll
    for (int jj = 0; jj < kKeysPerStep; ++jj) {
      const float p = expf(scores[jj] - base);
      running_sum += p;
      axpy_staged<kLanes>(acc, p, staged_row<kMaxD>(v_stage, jj), lane);
    }
    running_max = new_max;
  }

  if (active) {
    store_slice<kLanes>(out + q_row * ld_out + static_cast<int64_t>(head) * head_dim, acc,
                        1.0f / running_sum, head_dim, lane);
    if (lane == 0) lse[q_row * n_heads + head] = running_max + logf(running_sum);
  }
}

template <int kMaxD>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(__nv_bfloat16* dq, float* delta, const __nv_bfloat16* dout,
                                 int64_t ld_dout, const __nv_bfloat16* out, const float* lse,
                                 const __nv_bfloat16* q, int64_t ld_q, const __nv_bfloat16* k,
                                 const __nv_bfloat16* v, int64_t ld_kv, const AttentionTile* tiles,
                                 int n_heads, int group, int head_dim, float scale) {
  using Layout = TileLayout<kMaxD>;
  constexpr int kLanes = Layout::kLanes;
  __shared__ __align__(16) __nv_bfloat16 k_stage[kKeysPerStep * kMaxD];
  __shared__ __align__(16) __nv_bfloat16 v_stage[kKeysPerStep * kMaxD];

  const AttentionTile tile = tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int64_t q_offset = static_cast<int64_t>(head) * head_dim;
  const int64_t kv_offset = static_cast<int64_t>(head / group) * head_dim;
  const int lane = threadIdx.x % kLanes;
  const int64_t i = tile.row0 + threadIdx.x / kLanes;
  const bool active = i < tile.n_q;
  const int64_t causal_offset = tile.n_kv - tile.n_q;
  const int64_t last_key = active ? i + causal_offset : -1;
  const int64_t n_keys = min(tile.n_q, tile.row0 + Layout::kRows) + causal_offset;
  const int64_t q_row = tile.q_start + i;

  float qx[kDimsPerThread];
  float dox[kDimsPerThread];
  float dqx[kDimsPerThread];
  load_slice<kLanes>(qx, active ? q + q_row * ld_q + q_offset : nullptr, head_dim, lane);
  load_slice<kLanes>(dox, active ? dout + q_row * ld_dout + q_offset : nullptr, head_dim, lane);
#pragma unroll
  for (int d = 0; d < kDimsPerThread; ++d) dqx[d] = 0.0f;
  // delta = rowsum(dO o O): the softmax backward's correction, kept for the dk/dv pass. The
  // shuffles of row_sum run on every lane (a warp holds active and inactive rows alike).
  const float row_delta = row_sum<kLanes>(
      active ? dot_global<kLanes>(dox, out + q_row * ld_dout + q_offset, head_dim, lane) : 0.0f);
  const float row_lse = active ? lse[q_row * n_heads + head] : 0.0f;
  if (active && lane == 0) delta[q_row * n_heads + head] = row_delta;

  const __nv_bfloat16* k_head = k + tile.kv_start * ld_kv + kv_offset;
  const __nv_bfloat16* v_head = v + tile.kv_start * ld_kv + kv_offset;
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeysPerStep) {
    __syncthreads();
    stage_rows<kMaxD, kKeysPerStep>(k_stage, k_head + j0 * ld_kv, ld_kv, n_keys - j0, head_dim);
    stage_rows<kMaxD, kKeysPerStep>(v_stage, v_head + j0 * ld_kv, ld_kv, n_keys - j0, head_dim);
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < kKeysPerStep; ++jj) {
      const __nv_bfloat162* kj = staged_row<kMaxD>(k_stage, jj);
      const float s = scale * row_sum<kLanes>(dot_staged<kLanes>(qx, kj, lane));
      const float dp =
          row_sum<kLanes>(dot_staged<kLanes>(dox, staged_row<kMaxD>(v_stage, jj), lane));
      const float p = j0 + jj <= last_key ? expf(s - row_lse) : 0.0f;
      axpy_staged<kLanes>(dqx, p * (dp - row_delta), kj, lane);
    }
  }
  if (active) store_slice<kLanes>(dq + q_row * ld_q + q_offset, dqx, scale, head_dim, lane);
}

template <int kMaxD>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkv_kernel(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                                  int64_t ld_dout, const float* lse, const float* delta,
                                  const __nv_bfloat16* q, int64_t ld_q, const __nv_bfloat16* k,
                                  const __nv_bfloat16* v, int64_t ld_kv, const AttentionTile* tiles,
                                  int n_heads, int group, int head_dim, float scale) {
  constexpr int kLanes = TileLayout<kMaxD>::kLanes;
  __shared__ __align__(16) __nv_bfloat16 q_stage[kQueriesPerStep * kMaxD];
  __shared__ __align__(16) __nv_bfloat16 dout_stage[kQueriesPerStep * kMaxD];
  __shared__ float lse_stage[kQueriesPerStep];
  __shared__ float delta_stage[kQueriesPerStep];

  const AttentionTile tile = tiles[blockIdx.x];
  const int kv_head = blockIdx.y;
  const int64_t kv_offset = static_cast<int64_t>(kv_head) * head_dim;
  const int lane = threadIdx.x % kLanes;
  const int64_t j = tile.row0 + threadIdx.x / kLanes;  // key within the block
  const bool active = j < tile.n_kv;
  const int64_t causal_offset = tile.n_kv - tile.n_q;
  // Key j is seen by queries i >= j - offset; the tile's first key by the most.
  const int64_t first_query = max(int64_t{0}, j - causal_offset);
  const int64_t tile_first_query = max(int64_t{0}, tile.row0 - causal_offset);
  const int64_t kv_row = tile.kv_start + j;

  float kx[kDimsPerThread];
  float vx[kDimsPerThread];
  float dkx[kDimsPerThread];
  float dvx[kDimsPerThread];
  load_slice<kLanes>(kx, active ? k + kv_row * ld_kv + kv_offset : nullptr, head_dim, lane);
  load_slice<kLanes>(vx, active ? v + kv_row * ld_kv + kv_offset : nullptr, head_dim, lane);
#pragma unroll
  for (int d = 0; d < kDimsPerThread; ++d) {
    dkx[d] = 0.0f;
    dvx[d] = 0.0f;
  }

  for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    const int64_t q_offset = static_cast<int64_t>(head) * head_dim;
    const __nv_bfloat16* q_head = q + tile.q_start * ld_q + q_offset;
    const __nv_bfloat16* dout_head = dout + tile.q_start * ld_dout + q_offset;
    for (int64_t i0 = tile_first_query; i0 < tile.n_q; i0 += kQueriesPerStep) {
      __syncthreads();
      stage_rows<kMaxD, kQueriesPerStep>(q_stage, q_head + i0 * ld_q, ld_q, tile.n_q - i0,
                                         head_dim);
      stage_rows<kMaxD, kQueriesPerStep>(dout_stage, dout_head + i0 * ld_dout, ld_dout,
                                         tile.n_q - i0, head_dim);
      if (threadIdx.x < kQueriesPerStep) {
        const int64_t i = i0 + threadIdx.x;
        const int64_t stat = (tile.q_start + i) * n_heads + head;
        lse_stage[threadIdx.x] = i < tile.n_q ? lse[stat] : 0.0f;
        delta_stage[threadIdx.x] = i < tile.n_q ? delta[stat] : 0.0f;
      }
      __syncthreads();
#pragma unroll 2
      for (int ii = 0; ii < kQueriesPerStep; ++ii) {
        const int64_t i = i0 + ii;
        const __nv_bfloat162* qi = staged_row<kMaxD>(q_stage, ii);
        const __nv_bfloat162* doi = staged_row<kMaxD>(dout_stage, ii);
        const float s = scale * row_sum<kLanes>(dot_staged<kLanes>(kx, qi, lane));
        const float dp = row_sum<kLanes>(dot_staged<kLanes>(vx, doi, lane));
        const bool visible = active && i >= first_query && i < tile.n_q;
        const float p = visible ? expf(s - lse_stage[ii]) : 0.0f;
        axpy_staged<kLanes>(dvx, p, doi, lane);
        axpy_staged<kLanes>(dkx, p * (dp - delta_stage[ii]), qi, lane);
      }
    }
  }
  if (active) {
    store_slice<kLanes>(dk + kv_row * ld_kv + kv_offset, dkx, scale, head_dim, lane);
    store_slice<kLanes>(dv + kv_row * ld_kv + kv_offset, dvx, 1.0f, head_dim, lane);
  }
}

// Calls body(std::integral_constant<int, kMaxD>) for the smallest supported kMaxD >= head_dim.
template <typename Body>
void dispatch_head_dim(int head_dim, const char* where, Body&& body) {
  if (head_dim <= 32) {
    body(std::integral_constant<int, 32>());
  } else if (head_dim <= 64) {
    body(std::integral_constant<int, 64>());
  } else if (head_dim <= 128) {
    body(std::integral_constant<int, 128>());
  } else if (head_dim <= kMaxAttentionHeadDim) {
    body(std::integral_constant<int, 256>());
  } else {
    throw std::invalid_argument(std::string(where) + ": head_dim = " + std::to_string(head_dim) +
                                " exceeds the CUDA attention kernels' maximum of " +
                                std::to_string(kMaxAttentionHeadDim));
  }
}

dim3 tile_grid(int64_t n_tiles, int n_heads, const char* where) {
  if (n_tiles > INT32_MAX || n_heads > 65535) {
    throw std::invalid_argument(std::string(where) + ": " + std::to_string(n_tiles) + " tiles x " +
                                std::to_string(n_heads) +
                                " heads exceed the CUDA grid (2^31 - 1 x 65535)");
  }
  return dim3(static_cast<unsigned>(n_tiles), static_cast<unsigned>(n_heads));
}

}  // namespace

int attention_tile_rows(int head_dim) {
  int rows = 0;
  dispatch_head_dim(head_dim, "attention",
                    [&](auto max_d) { rows = TileLayout<decltype(max_d)::value>::kRows; });
  return rows;
}

void attention_forward(const LaunchContext& ctx, __nv_bfloat16* out, int64_t ld_out, float* lse,
                       const __nv_bfloat16* q, int64_t ld_q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, int64_t ld_kv, const AttentionTile* query_tiles,
                       int64_t n_query_tiles, const AttnShape& shape) {
  if (n_query_tiles <= 0) return;
  const dim3 grid = tile_grid(n_query_tiles, shape.n_heads, "attention_forward");
  const int group = shape.n_heads / shape.n_kv_heads;
  const float scale = static_cast<float>(shape.scale);
  dispatch_head_dim(shape.head_dim, "attention_forward", [&](auto max_d) {
    attention_forward_kernel<decltype(max_d)::value>
        <<<grid, kThreads, 0, ctx.stream>>>(out, ld_out, lse, q, ld_q, k, v, ld_kv, query_tiles,
                                            shape.n_heads, group, shape.head_dim, scale);
  });
  check_launch("attention_forward_kernel");
}

void attention_backward(const LaunchContext& ctx, __nv_bfloat16* dq, __nv_bfloat16* dk,
                        __nv_bfloat16* dv, const __nv_bfloat16* dout, int64_t ld_dout,
                        const __nv_bfloat16* out, const float* lse, const __nv_bfloat16* q,
                        int64_t ld_q, const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t ld_kv,
                        const AttentionTile* query_tiles, int64_t n_query_tiles,
                        const AttentionTile* key_tiles, int64_t n_key_tiles, int64_t n_query_rows,
                        const AttnShape& shape) {
  if (n_key_tiles <= 0) return;  // no key rows: no query rows either (n_kv >= n_q)
  const int group = shape.n_heads / shape.n_kv_heads;
  const float scale = static_cast<float>(shape.scale);
  ScratchBuffer delta(ctx, sizeof(float) * std::max<int64_t>(n_query_rows, 1) * shape.n_heads,
                      "attention_backward rowsum(dO o O)");
  dispatch_head_dim(shape.head_dim, "attention_backward", [&](auto max_d) {
    constexpr int kMaxD = decltype(max_d)::value;
    if (n_query_tiles > 0) {
      const dim3 grid = tile_grid(n_query_tiles, shape.n_heads, "attention_backward");
      attention_backward_dq_kernel<kMaxD><<<grid, kThreads, 0, ctx.stream>>>(
          dq, delta.as<float>(), dout, ld_dout, out, lse, q, ld_q, k, v, ld_kv, query_tiles,
          shape.n_heads, group, shape.head_dim, scale);
      check_launch("attention_backward_dq_kernel");
    }
    const dim3 grid = tile_grid(n_key_tiles, shape.n_kv_heads, "attention_backward");
    attention_backward_dkv_kernel<kMaxD><<<grid, kThreads, 0, ctx.stream>>>(
        dk, dv, dout, ld_dout, lse, delta.as<float>(), q, ld_q, k, v, ld_kv, key_tiles,
        shape.n_heads, group, shape.head_dim, scale);
    check_launch("attention_backward_dkv_kernel");
  });
}

}  // namespace freqkv::cuda
