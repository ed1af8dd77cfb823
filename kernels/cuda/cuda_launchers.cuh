// The kernel families of the CUDA backend, one .cu file each, as host functions that enqueue
// their kernels on the context's stream. Arguments are already validated by CudaKernels
// (cuda_kernels.cu), which also owns every cache; these functions only launch.
// Storage is __nv_bfloat16, arithmetic fp32 unless a comment says otherwise.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/flash_attention_math.h"
#include "kernels/kernels.h"

namespace freqkv::cuda {

// ---- elementwise.cu -----------------------------------------------------------------------------
void add(const LaunchContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* a,
         const __nv_bfloat16* b, int64_t n);
void axpy(const LaunchContext& ctx, __nv_bfloat16* y, float alpha, const __nv_bfloat16* x,
          int64_t n);
void scale(const LaunchContext& ctx, __nv_bfloat16* x, float alpha, int64_t n);
// *device_result = sum of x[i]^2, accumulated in double in a fixed order (deterministic).
void sum_squares(const LaunchContext& ctx, const __nv_bfloat16* x, int64_t n,
                 double* device_result);
// C[rows, cols] = beta C; beta == 0 writes zeros (NaN in C does not survive), as BLAS does.
void scale_matrix(const LaunchContext& ctx, __nv_bfloat16* c, int64_t ldc, int64_t rows,
                  int64_t cols, float beta);
void swiglu_forward(const LaunchContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* gate,
                    const __nv_bfloat16* up, int64_t n);
void swiglu_backward(const LaunchContext& ctx, __nv_bfloat16* dgate, __nv_bfloat16* dup,
                     const __nv_bfloat16* dout, const __nv_bfloat16* gate, const __nv_bfloat16* up,
                     int64_t n);

// The scalars of one AdamW step, computed on the host in double and rounded to fp32 exactly as
// the CPU backend does (kernels/cpu/elementwise.cpp).
struct AdamWScalars {
  float decay;        // 1 - lr * weight_decay
  float lerp_weight;  // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  double grad_scale;
};
void adamw_update(const LaunchContext& ctx, float* master, float* m, float* v, __nv_bfloat16* param,
                  const __nv_bfloat16* grad, int64_t n, const AdamWScalars& scalars);

// ---- rows.cu ------------------------------------------------------------------------------------
void gather_rows(const LaunchContext& ctx, __nv_bfloat16* dst, int64_t ld_dst,
                 const __nv_bfloat16* src, int64_t ld_src, const int64_t* map, int64_t n_rows,
                 int64_t width);
// Deterministic: the rows adding into one destination row are summed in fp32, in row order, and
// added to it once.
void scatter_add_rows(const LaunchContext& ctx, __nv_bfloat16* dsrc, int64_t ld_src,
                      const __nv_bfloat16* ddst, int64_t ld_dst, const int64_t* map, int64_t n_rows,
                      int64_t width);
void embedding_forward(const LaunchContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* table,
                       const int32_t* tokens, int64_t n_tokens, int64_t dim);
// Deterministic, like scatter_add_rows.
void embedding_backward(const LaunchContext& ctx, __nv_bfloat16* dtable, const __nv_bfloat16* dout,
                        const int32_t* tokens, int64_t n_tokens, int64_t dim);

// ---- rmsnorm.cu ---------------------------------------------------------------------------------
void rmsnorm_forward(const LaunchContext& ctx, __nv_bfloat16* out, float* rstd,
                     const __nv_bfloat16* x, const __nv_bfloat16* weight, int64_t n_rows,
                     int64_t dim, float eps);
void rmsnorm_backward(const LaunchContext& ctx, __nv_bfloat16* dx, __nv_bfloat16* dweight,
                      const __nv_bfloat16* dout, const __nv_bfloat16* x,
                      const __nv_bfloat16* weight, const float* rstd, int64_t n_rows, int64_t dim);

// ---- rope.cu ------------------------------------------------------------------------------------
// inv_freq: device array of head_dim / 2 frequencies theta^(-2i/D), computed on the host in double.
void rope(const LaunchContext& ctx, __nv_bfloat16* out, int64_t ld_out, const __nv_bfloat16* x,
          int64_t ld_x, const int32_t* positions, int64_t n_rows, int n_heads, int head_dim,
          const double* inv_freq, bool inverse);

// ---- cross_entropy.cu ---------------------------------------------------------------------------
void cross_entropy(const LaunchContext& ctx, float* losses, __nv_bfloat16* logits,
                   int64_t ld_logits, const int32_t* targets, int64_t n_rows, int64_t vocab,
                   float grad_scale, bool write_gradient);
// Vocabulary-parallel pieces: a shard's log-sum-exp and local target logit per row, and the
// gradient from the global log-sum-exp (Kernels::cross_entropy_stats / cross_entropy_grad).
void cross_entropy_stats(const LaunchContext& ctx, float* lse, float* target_logit,
                         const __nv_bfloat16* logits, int64_t ld_logits, const int32_t* targets,
                         int64_t n_rows, int64_t vocab, int64_t vocab_begin);
void cross_entropy_grad(const LaunchContext& ctx, __nv_bfloat16* logits, int64_t ld_logits,
                        const float* lse, const int32_t* targets, int64_t n_rows, int64_t vocab,
                        int64_t vocab_begin, float grad_scale);

// ---- attention.cu -------------------------------------------------------------------------------
// One thread block's share of an AttnBlock: the rows of the tile size starting at row `row0`
// of the block (query rows for the forward and dq passes, key rows for the dk/dv pass). Built by
// flash::make_query_tiles / make_key_tiles (kernels/flash_attention_math.h) for both kernels.
using AttentionTile = flash::Tile;

// Rows per tile of the kernel that serves head_dim (256 threads, 32 dimensions per thread).
// Throws std::invalid_argument for head_dim > kMaxAttentionHeadDim.
constexpr int kMaxAttentionHeadDim = 256;
int attention_tile_rows(int head_dim);

void attention_forward(const LaunchContext& ctx, __nv_bfloat16* out, int64_t ld_out, float* lse,
                       const __nv_bfloat16* q, int64_t ld_q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, int64_t ld_kv, const AttentionTile* query_tiles,
                       int64_t n_query_tiles, const AttnShape& shape);
// n_query_rows: one past the last query row of any block (sizes the rowsum(dO o O) scratch).
void attention_backward(const LaunchContext& ctx, __nv_bfloat16* dq, __nv_bfloat16* dk,
                        __nv_bfloat16* dv, const __nv_bfloat16* dout, int64_t ld_dout,
                        const __nv_bfloat16* out, const float* lse, const __nv_bfloat16* q,
                        int64_t ld_q, const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t ld_kv,
                        const AttentionTile* query_tiles, int64_t n_query_tiles,
                        const AttentionTile* key_tiles, int64_t n_key_tiles, int64_t n_query_rows,
                        const AttnShape& shape);

// ---- flash_attention.cu ---------------------------------------------------------------------------
// The same contract on tensor cores (FlashAttention-2 tiling, WMMA bf16), for head_dim 64 and 128
// only (flash_attention_supported); tiles of flash::kTileRows rows. Deterministic.
bool flash_attention_supported(int head_dim);
void flash_attention_forward(const LaunchContext& ctx, __nv_bfloat16* out, int64_t ld_out,
                             float* lse, const __nv_bfloat16* q, int64_t ld_q,
                             const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t ld_kv,
                             const AttentionTile* query_tiles, int64_t n_query_tiles,
                             const AttnShape& shape);
void flash_attention_backward(const LaunchContext& ctx, __nv_bfloat16* dq, __nv_bfloat16* dk,
                              __nv_bfloat16* dv, const __nv_bfloat16* dout, int64_t ld_dout,
                              const __nv_bfloat16* out, const float* lse, const __nv_bfloat16* q,
                              int64_t ld_q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                              int64_t ld_kv, const AttentionTile* query_tiles,
                              int64_t n_query_tiles, const AttentionTile* key_tiles,
                              int64_t n_key_tiles, int64_t n_query_rows, const AttnShape& shape);

}  // namespace freqkv::cuda
