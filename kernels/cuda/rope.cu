// Rotary position embedding, Hugging Face rotate-half convention (see kernels/cpu/rope.cpp).
// One thread per (row, pair i): the angle position * inv_freq[i] and its sine and cosine are
// computed in double, as the CPU backend does (positions reach tens of thousands, and an fp32
// angle would lose several digits), then the thread rotates pair i of every head in fp32.
// inv_freq comes from the host, computed there in double with kernels/kernel_math.h.
#include "kernels/cuda/cuda_launchers.cuh"
#include "kernels/kernel_math.h"

namespace freqkv::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void rope_kernel(__nv_bfloat16* out, int64_t ld_out, const __nv_bfloat16* x,
                            int64_t ld_x, const int32_t* positions, int64_t n_rows, int n_heads,
                            int head_dim, const double* inv_freq, double sin_sign) {
  const int half = head_dim / 2;
  const int64_t n_items = n_rows * half;
  for (int64_t item = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; item < n_items;
       item += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = item / half;
    const int i = static_cast<int>(item % half);
    double sin_angle = 0.0;
    double cos_angle = 0.0;
    sincos(static_cast<double>(positions[r]) * inv_freq[i], &sin_angle, &cos_angle);
    const float cos_a = static_cast<float>(cos_angle);
    const float sin_a = static_cast<float>(sin_sign * sin_angle);
    const __nv_bfloat16* xr = x + r * ld_x;
    __nv_bfloat16* yr = out + r * ld_out;
    for (int h = 0; h < n_heads; ++h) {
      const int64_t lo_index = static_cast<int64_t>(h) * head_dim + i;
      // Both inputs are read before either output is written: safe in place.
      float lo = 0.0f;
      float hi = 0.0f;
      rope_rotate_pair<float>(__bfloat162float(xr[lo_index]), __bfloat162float(xr[lo_index + half]),
                              cos_a, sin_a, &lo, &hi);
      yr[lo_index] = __float2bfloat16_rn(lo);
      yr[lo_index + half] = __float2bfloat16_rn(hi);
    }
  }
}

}  // namespace

void rope(const LaunchContext& ctx, __nv_bfloat16* out, int64_t ld_out, const __nv_bfloat16* x,
          int64_t ld_x, const int32_t* positions, int64_t n_rows, int n_heads, int head_dim,
          const double* inv_freq, bool inverse) {
  const int64_t n_items = n_rows * (head_dim / 2);
  if (n_items <= 0) return;
  rope_kernel<<<grid_size(n_items, kThreads, ctx), kThreads, 0, ctx.stream>>>(
      out, ld_out, x, ld_x, positions, n_rows, n_heads, head_dim, inv_freq, inverse ? -1.0 : 1.0);
  check_launch("rope_kernel");
}

}  // namespace freqkv::cuda
