// Elementwise kernels: vector arithmetic, the sum of squares, C = beta C, SwiGLU and AdamW.
// Grid-stride loops over 64-bit indices with scalar bf16 loads: simple and bandwidth-bound, not
// vectorised (no 16-byte loads), which costs some bandwidth on long vectors.
#include <cuda_bf16.h>

#include "kernels/cuda/cuda_launchers.cuh"
#include "kernels/kernel_math.h"

namespace freqkv::cuda {

namespace {

constexpr int kThreads = 256;
// Partial sums of sum_squares: one per block of the first pass, summed by one block after.
constexpr int kMaxPartials = 1024;

__global__ void add_kernel(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b,
                           int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(b[i]));
  }
}

__global__ void axpy_kernel(__nv_bfloat16* y, float alpha, const __nv_bfloat16* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + alpha * __bfloat162float(x[i]));
  }
}

__global__ void scale_kernel(__nv_bfloat16* x, float alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = __float2bfloat16_rn(__bfloat162float(x[i]) * alpha);
  }
}

// First pass: each block's sum of squares (double) into partials[blockIdx.x].
__global__ void sum_squares_partial_kernel(const __nv_bfloat16* x, int64_t n, double* partials) {
  __shared__ double scratch[32];
  double sum = 0.0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const double xi = __bfloat162float(x[i]);
    sum += xi * xi;
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// Second pass: one block adds the partials in a fixed order.
__global__ void sum_partials_kernel(const double* partials, int n_partials, double* result) {
  __shared__ double scratch[32];
  double sum = 0.0;
  for (int i = threadIdx.x; i < n_partials; i += blockDim.x) sum += partials[i];
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) *result = sum;
}

__global__ void scale_matrix_kernel(__nv_bfloat16* c, int64_t ldc, int64_t rows, int64_t cols,
                                    float beta) {
  const int64_t n = rows * cols;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < n;
       idx += int64_t{gridDim.x} * blockDim.x) {
    __nv_bfloat16* element = c + (idx / cols) * ldc + idx % cols;
    *element = beta == 0.0f ? __float2bfloat16_rn(0.0f)
                            : __float2bfloat16_rn(beta * __bfloat162float(*element));
  }
}

__global__ void swiglu_forward_kernel(__nv_bfloat16* out, const __nv_bfloat16* gate,
                                      const __nv_bfloat16* up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __float2bfloat16_rn(silu(__bfloat162float(gate[i])) * __bfloat162float(up[i]));
  }
}

__global__ void swiglu_backward_kernel(__nv_bfloat16* dgate, __nv_bfloat16* dup,
                                       const __nv_bfloat16* dout, const __nv_bfloat16* gate,
                                       const __nv_bfloat16* up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    // Everything is read before anything is written: dgate or dup may alias dout.
    const float g = __bfloat162float(gate[i]);
    const float dy = __bfloat162float(dout[i]);
    const float u = __bfloat162float(up[i]);
    const float new_dgate = dy * u * silu_derivative(g);
    const float new_dup = dy * silu(g);
    dgate[i] = __float2bfloat16_rn(new_dgate);
    dup[i] = __float2bfloat16_rn(new_dup);
  }
}

// The CPU backend's AdamW, operation for operation. The explicit round-to-nearest intrinsics keep
// nvcc from contracting a*b+c into FMAs, so the fp32 results are those of the CPU backend (and of
// torch.optim.AdamW's single-tensor path) bit for bit.
__global__ void adamw_kernel(float* master, float* m, float* v, __nv_bfloat16* param,
                             const __nv_bfloat16* grad, int64_t n, AdamWScalars s) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g =
        static_cast<float>(static_cast<double>(__bfloat162float(grad[i])) * s.grad_scale);
    const float p = __fmul_rn(master[i], s.decay);
    const float m_old = m[i];
    // torch.lerp's two-sided formula (exact at weight 0 and 1).
    const float mi =
        s.lerp_weight < 0.5f
            ? __fadd_rn(m_old, __fmul_rn(s.lerp_weight, __fsub_rn(g, m_old)))
            : __fsub_rn(g, __fmul_rn(__fsub_rn(g, m_old), __fsub_rn(1.0f, s.lerp_weight)));
    const float vi =
        __fadd_rn(__fmul_rn(v[i], s.beta2), __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bias_correction2_sqrt), s.eps);
    const float updated = __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step_size, mi), denom));
    m[i] = mi;
    v[i] = vi;
    master[i] = updated;
    param[i] = __float2bfloat16_rn(updated);
  }
}

}  // namespace

void add(const LaunchContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* a,
         const __nv_bfloat16* b, int64_t n) {
  if (n <= 0) return;
  add_kernel<<<grid_size(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(out, a, b, n);
  check_launch("add_kernel");
}

void axpy(const LaunchContext& ctx, __nv_bfloat16* y, float alpha, const __nv_bfloat16* x,
          int64_t n) {
  if (n <= 0) return;
  axpy_kernel<<<grid_size(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(y, alpha, x, n);
  check_launch("axpy_kernel");
}

void scale(const LaunchContext& ctx, __nv_bfloat16* x, float alpha, int64_t n) {
  if (n <= 0) return;
  scale_kernel<<<grid_size(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(x, alpha, n);
  check_launch("scale_kernel");
}

void sum_squares(const LaunchContext& ctx, const __nv_bfloat16* x, int64_t n,
                 double* device_result) {
  const int n_partials = std::min(grid_size(n, kThreads, ctx, 4), kMaxPartials);
  ScratchBuffer partials(ctx, sizeof(double) * n_partials, "sum_squares partial sums");
  sum_squares_partial_kernel<<<n_partials, kThreads, 0, ctx.stream>>>(x, std::max<int64_t>(n, 0),
                                                                      partials.as<double>());
  check_launch("sum_squares_partial_kernel");
  sum_partials_kernel<<<1, kThreads, 0, ctx.stream>>>(partials.as<double>(), n_partials,
                                                      device_result);
  check_launch("sum_partials_kernel");
}

void scale_matrix(const LaunchContext& ctx, __nv_bfloat16* c, int64_t ldc, int64_t rows,
                  int64_t cols, float beta) {
  if (rows <= 0 || cols <= 0) return;
  scale_matrix_kernel<<<grid_size(rows * cols, kThreads, ctx), kThreads, 0, ctx.stream>>>(
      c, ldc, rows, cols, beta);
  check_launch("scale_matrix_kernel");
}

void swiglu_forward(const LaunchContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* gate,
                    const __nv_bfloat16* up, int64_t n) {
  if (n <= 0) return;
  swiglu_forward_kernel<<<grid_size(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(out, gate, up, n);
  check_launch("swiglu_forward_kernel");
}

void swiglu_backward(const LaunchContext& ctx, __nv_bfloat16* dgate, __nv_bfloat16* dup,
                     const __nv_bfloat16* dout, const __nv_bfloat16* gate, const __nv_bfloat16* up,
                     int64_t n) {
  if (n <= 0) return;
  swiglu_backward_kernel<<<grid_size(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(dgate, dup, dout,
                                                                                   gate, up, n);
  check_launch("swiglu_backward_kernel");
}

void adamw_update(const LaunchContext& ctx, float* master, float* m, float* v, __nv_bfloat16* param,
                  const __nv_bfloat16* grad, int64_t n, const AdamWScalars& scalars) {
  if (n <= 0) return;
  adamw_kernel<<<grid_size(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(master, m, v, param, grad,
                                                                         n, scalars);
  check_launch("adamw_kernel");
}

}  // namespace freqkv::cuda
