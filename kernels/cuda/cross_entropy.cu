// Cross-entropy over the vocabulary with the gradient written over the logits (llm.c style), and
// its vocabulary-parallel pieces (statistics of a vocabulary shard, gradient from the global
// log-sum-exp), as in kernels/cpu/cross_entropy.cpp. One block per row: the maximum, then the sum
// of exp(x - max) in fp32 (two passes, so every exponent is <= 0 and the largest term is exactly
// 1), then the gradient grad_scale * (softmax - onehot). A row is read three times; with one row
// of at most a few hundred KiB per block the later passes mostly hit L2.
#include <math_constants.h>

#include <cmath>

#include "kernels/cuda/cuda_launchers.cuh"

namespace freqkv::cuda {

namespace {

constexpr int kThreads = 512;

// log sum_c exp(row[c]) over the block's threads, returned to all of them.
__device__ float row_logsumexp(const __nv_bfloat16* row, int64_t vocab, float* scratch) {
  float max_logit = -INFINITY;
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) {
    max_logit = fmaxf(max_logit, __bfloat162float(row[c]));
  }
  max_logit = block_max(max_logit, scratch, -INFINITY);
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) {
    sum += expf(__bfloat162float(row[c]) - max_logit);
  }
  sum = block_sum(sum, scratch);
  return max_logit + logf(sum);
}

// row[c] = grad_scale * (exp(row[c] - lse) - [c == target]); target may lie outside the row.
__device__ void write_row_gradient(__nv_bfloat16* row, int64_t vocab, float lse, int64_t target,
                                   float grad_scale) {
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) {
    const float prob = expf(__bfloat162float(row[c]) - lse);
    const float onehot = c == target ? 1.0f : 0.0f;
    row[c] = __float2bfloat16_rn(grad_scale * (prob - onehot));
  }
}

__device__ void zero_row(__nv_bfloat16* row, int64_t vocab) {
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) row[c] = __float2bfloat16_rn(0.0f);
}

__global__ void cross_entropy_kernel(float* losses, __nv_bfloat16* logits, int64_t ld_logits,
                                     const int32_t* targets, int64_t n_rows, int64_t vocab,
                                     float grad_scale, bool write_gradient,
                                     DeviceErrorReport* report) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    __nv_bfloat16* row = logits + r * ld_logits;
    const int32_t target = targets[r];
    if (target >= vocab) {  // block-uniform branch
      if (threadIdx.x == 0) {
        report_invalid_input(report, kTargetOutsideVocabulary, r, target, vocab);
        losses[r] = CUDART_NAN_F;
      }
      continue;
    }
    if (target < 0) {  // ignored position (padding, or no next token)
      if (threadIdx.x == 0) losses[r] = 0.0f;
      if (write_gradient) zero_row(row, vocab);
      continue;
    }
    // Read before the reductions below: their barriers order it before any gradient write.
    const float target_logit = threadIdx.x == 0 ? __bfloat162float(row[target]) : 0.0f;
    const float lse = row_logsumexp(row, vocab, scratch);
    if (threadIdx.x == 0) losses[r] = lse - target_logit;
    if (write_gradient) write_row_gradient(row, vocab, lse, target, grad_scale);
  }
}

__global__ void cross_entropy_stats_kernel(float* lse, float* target_logit,
                                           const __nv_bfloat16* logits, int64_t ld_logits,
                                           const int32_t* targets, int64_t n_rows, int64_t vocab,
                                           int64_t vocab_begin) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const __nv_bfloat16* row = logits + r * ld_logits;
    const float row_lse = row_logsumexp(row, vocab, scratch);
    if (threadIdx.x == 0) {
      const int64_t local = static_cast<int64_t>(targets[r]) - vocab_begin;
      lse[r] = row_lse;
      target_logit[r] =
          targets[r] >= 0 && local >= 0 && local < vocab ? __bfloat162float(row[local]) : 0.0f;
    }
  }
}

__global__ void cross_entropy_grad_kernel(__nv_bfloat16* logits, int64_t ld_logits,
                                          const float* lse, const int32_t* targets, int64_t n_rows,
                                          int64_t vocab, int64_t vocab_begin, float grad_scale) {
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    __nv_bfloat16* row = logits + r * ld_logits;
    if (targets[r] < 0) {
      zero_row(row, vocab);
    } else {
      write_row_gradient(row, vocab, lse[r], static_cast<int64_t>(targets[r]) - vocab_begin,
                         grad_scale);
    }
  }
}

}  // namespace

void cross_entropy(const LaunchContext& ctx, float* losses, __nv_bfloat16* logits,
                   int64_t ld_logits, const int32_t* targets, int64_t n_rows, int64_t vocab,
                   float grad_scale, bool write_gradient) {
  if (n_rows <= 0) return;
  cross_entropy_kernel<<<row_grid_size(n_rows), kThreads, 0, ctx.stream>>>(
      losses, logits, ld_logits, targets, n_rows, vocab, grad_scale, write_gradient,
      ctx.error_report);
  check_launch("cross_entropy_kernel");
}

void cross_entropy_stats(const LaunchContext& ctx, float* lse, float* target_logit,
                         const __nv_bfloat16* logits, int64_t ld_logits, const int32_t* targets,
                         int64_t n_rows, int64_t vocab, int64_t vocab_begin) {
  if (n_rows <= 0) return;
  cross_entropy_stats_kernel<<<row_grid_size(n_rows), kThreads, 0, ctx.stream>>>(
      lse, target_logit, logits, ld_logits, targets, n_rows, vocab, vocab_begin);
  check_launch("cross_entropy_stats_kernel");
}

void cross_entropy_grad(const LaunchContext& ctx, __nv_bfloat16* logits, int64_t ld_logits,
                        const float* lse, const int32_t* targets, int64_t n_rows, int64_t vocab,
                        int64_t vocab_begin, float grad_scale) {
  if (n_rows <= 0 || vocab <= 0) return;
  cross_entropy_grad_kernel<<<row_grid_size(n_rows), kThreads, 0, ctx.stream>>>(
      logits, ld_logits, lse, targets, n_rows, vocab, vocab_begin, grad_scale);
  check_launch("cross_entropy_grad_kernel");
}

}  // namespace freqkv::cuda
