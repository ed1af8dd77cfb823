// LLaMA RMSNorm (Hugging Face LlamaRMSNorm) and its backward, as in kernels/cpu/rmsnorm.cpp:
//   y = w * bf16(x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps)
// (Hugging Face normalises in fp32, rounds to the model's dtype, then multiplies by the weight.)
// One block per row for the row passes; the weight gradient, a sum over rows, is reduced in two
// deterministic passes (per chunk of rows, then over the chunks) instead of with atomics.
// Rows are read twice (statistics, then output); the second read mostly hits L2.
#include "kernels/cuda/cuda_launchers.cuh"

namespace freqkv::cuda {

namespace {

constexpr int kThreads = 256;
// The weight gradient's first pass: columns per block and at most this many chunks of rows.
constexpr int kColumnsPerBlock = 256;
constexpr int64_t kMaxRowChunks = 128;

__global__ void rmsnorm_forward_kernel(__nv_bfloat16* out, float* rstd, const __nv_bfloat16* x,
                                       const __nv_bfloat16* weight, int64_t n_rows, int64_t dim,
                                       float eps) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const __nv_bfloat16* xr = x + r * dim;
    float sum_sq = 0.0f;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float xc = __bfloat162float(xr[c]);
      sum_sq += xc * xc;
    }
    sum_sq = block_sum(sum_sq, scratch);
    const float row_rstd = 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
    if (threadIdx.x == 0) rstd[r] = row_rstd;
    __nv_bfloat16* yr = out + r * dim;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float normalised =
          __bfloat162float(__float2bfloat16_rn(__bfloat162float(xr[c]) * row_rstd));
      yr[c] = __float2bfloat16_rn(__bfloat162float(weight[c]) * normalised);
    }
  }
}

// dx += rstd w dy - x (rstd^3 / dim) sum_i w_i dy_i x_i
__global__ void rmsnorm_backward_dx_kernel(__nv_bfloat16* dx, const __nv_bfloat16* dout,
                                           const __nv_bfloat16* x, const __nv_bfloat16* weight,
                                           const float* rstd, int64_t n_rows, int64_t dim) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const __nv_bfloat16* xr = x + r * dim;
    const __nv_bfloat16* dyr = dout + r * dim;
    float weighted_dot = 0.0f;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      weighted_dot +=
          __bfloat162float(weight[c]) * __bfloat162float(dyr[c]) * __bfloat162float(xr[c]);
    }
    weighted_dot = block_sum(weighted_dot, scratch);
    const float row_rstd = rstd[r];
    const float x_coefficient =
        row_rstd * row_rstd * row_rstd * weighted_dot / static_cast<float>(dim);
    __nv_bfloat16* dxr = dx + r * dim;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float grad = row_rstd * __bfloat162float(weight[c]) * __bfloat162float(dyr[c]) -
                         x_coefficient * __bfloat162float(xr[c]);
      dxr[c] = __float2bfloat16_rn(__bfloat162float(dxr[c]) + grad);
    }
  }
}

// partials[chunk, c] = sum over the chunk's rows of dy[r, c] x[r, c] rstd[r]; grid (column
// blocks, chunks). Threads of a warp read consecutive columns of one row: coalesced.
__global__ void rmsnorm_dweight_partial_kernel(float* partials, const __nv_bfloat16* dout,
                                               const __nv_bfloat16* x, const float* rstd,
                                               int64_t n_rows, int64_t dim,
                                               int64_t rows_per_chunk) {
  const int64_t c = blockIdx.x * int64_t{kColumnsPerBlock} + threadIdx.x;
  if (c >= dim) return;
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = min(n_rows, r0 + rows_per_chunk);
  float sum = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    sum += __bfloat162float(dout[r * dim + c]) * __bfloat162float(x[r * dim + c]) * rstd[r];
  }
  partials[blockIdx.y * dim + c] = sum;
}

__global__ void rmsnorm_dweight_finish_kernel(__nv_bfloat16* dweight, const float* partials,
                                              int64_t n_chunks, int64_t dim) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < dim;
       c += int64_t{gridDim.x} * blockDim.x) {
    float sum = 0.0f;
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) sum += partials[chunk * dim + c];
    dweight[c] = __float2bfloat16_rn(__bfloat162float(dweight[c]) + sum);
  }
}

}  // namespace

void rmsnorm_forward(const LaunchContext& ctx, __nv_bfloat16* out, float* rstd,
                     const __nv_bfloat16* x, const __nv_bfloat16* weight, int64_t n_rows,
                     int64_t dim, float eps) {
  if (n_rows <= 0 || dim <= 0) return;
  rmsnorm_forward_kernel<<<row_grid_size(n_rows), kThreads, 0, ctx.stream>>>(out, rstd, x, weight,
                                                                             n_rows, dim, eps);
  check_launch("rmsnorm_forward_kernel");
}

void rmsnorm_backward(const LaunchContext& ctx, __nv_bfloat16* dx, __nv_bfloat16* dweight,
                      const __nv_bfloat16* dout, const __nv_bfloat16* x,
                      const __nv_bfloat16* weight, const float* rstd, int64_t n_rows, int64_t dim) {
  if (n_rows <= 0 || dim <= 0) return;
  rmsnorm_backward_dx_kernel<<<row_grid_size(n_rows), kThreads, 0, ctx.stream>>>(
      dx, dout, x, weight, rstd, n_rows, dim);
  check_launch("rmsnorm_backward_dx_kernel");

  const int64_t n_chunks = std::min(n_rows, kMaxRowChunks);
  const int64_t rows_per_chunk = (n_rows + n_chunks - 1) / n_chunks;
  ScratchBuffer partials(ctx, sizeof(float) * n_chunks * dim, "rmsnorm_backward weight partials");
  const dim3 grid(static_cast<unsigned>((dim + kColumnsPerBlock - 1) / kColumnsPerBlock),
                  static_cast<unsigned>(n_chunks));
  rmsnorm_dweight_partial_kernel<<<grid, kColumnsPerBlock, 0, ctx.stream>>>(
      partials.as<float>(), dout, x, rstd, n_rows, dim, rows_per_chunk);
  check_launch("rmsnorm_dweight_partial_kernel");
  rmsnorm_dweight_finish_kernel<<<grid_size(dim, kThreads, ctx), kThreads, 0, ctx.stream>>>(
      dweight, partials.as<float>(), n_chunks, dim);
  check_launch("rmsnorm_dweight_finish_kernel");
}

}  // namespace freqkv::cuda
