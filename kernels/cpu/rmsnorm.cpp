// LLaMA RMSNorm (Hugging Face LlamaRMSNorm): y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps).
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace freqkv::cpu {

namespace {

constexpr int64_t kParallelMinElements = int64_t{1} << 15;
constexpr int64_t kColumnTile = 256;

}  // namespace

template <typename T>
void rmsnorm_forward(T* out, Acc<T>* rstd, const T* x, const T* weight, int64_t n_rows, int64_t dim,
                     double eps) {
  using A = Acc<T>;
#pragma omp parallel for if (n_rows * dim >= kParallelMinElements)
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* xr = x + r * dim;
    // The mean of squares in double whatever T is: it is one number per row, and an fp32 running
    // sum over thousands of features would drift from torch's (pairwise) reduction.
    double sum_sq = 0.0;
    for (int64_t c = 0; c < dim; ++c) sum_sq += static_cast<double>(xr[c]) * xr[c];
    const A row_rstd = static_cast<A>(1.0 / std::sqrt(sum_sq / static_cast<double>(dim) + eps));
    rstd[r] = row_rstd;
    T* yr = out + r * dim;
    // Hugging Face's order: normalise first, then multiply by the weight.
    for (int64_t c = 0; c < dim; ++c) {
      yr[c] = static_cast<T>(weight[c] * static_cast<T>(static_cast<A>(xr[c]) * row_rstd));
    }
  }
}

// With y_c = w_c x_c r and r = (mean(x^2) + eps)^(-1/2), dr/dx_c = -r^3 x_c / dim, so
//   dx_c = r w_c dy_c - x_c (r^3 / dim) sum_i w_i dy_i x_i,   dw_c = sum_rows dy_c x_c r.
template <typename T>
void rmsnorm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* weight,
                      const Acc<T>* rstd, int64_t n_rows, int64_t dim) {
  const bool parallel = n_rows * dim >= kParallelMinElements;
#pragma omp parallel for if (parallel)
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* xr = x + r * dim;
    const T* dyr = dout + r * dim;
    double weighted_dot = 0.0;  // sum_i w_i dy_i x_i
    for (int64_t c = 0; c < dim; ++c) {
      weighted_dot += static_cast<double>(weight[c]) * dyr[c] * xr[c];
    }
    const double row_rstd = rstd[r];
    const double x_coefficient =
        row_rstd * row_rstd * row_rstd * weighted_dot / static_cast<double>(dim);
    T* dxr = dx + r * dim;
    for (int64_t c = 0; c < dim; ++c) {
      dxr[c] += static_cast<T>(row_rstd * static_cast<double>(weight[c]) * dyr[c] -
                               x_coefficient * xr[c]);
    }
  }

  // dweight sums over rows: each task owns a tile of columns and walks all rows in order, so
  // there is no write race and the result does not depend on the number of threads.
  const int64_t n_tiles = (dim + kColumnTile - 1) / kColumnTile;
#pragma omp parallel for if (parallel)
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int64_t c0 = tile * kColumnTile;
    const int64_t c1 = std::min(dim, c0 + kColumnTile);
    std::vector<double> sums(static_cast<size_t>(c1 - c0), 0.0);
    for (int64_t r = 0; r < n_rows; ++r) {
      const double row_rstd = rstd[r];
      const T* xr = x + r * dim;
      const T* dyr = dout + r * dim;
      for (int64_t c = c0; c < c1; ++c) {
        sums[static_cast<size_t>(c - c0)] += static_cast<double>(dyr[c]) * xr[c] * row_rstd;
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      dweight[c] += static_cast<T>(sums[static_cast<size_t>(c - c0)]);
    }
  }
}

template void rmsnorm_forward<float>(float*, float*, const float*, const float*, int64_t, int64_t,
                                     double);
template void rmsnorm_forward<double>(double*, double*, const double*, const double*, int64_t,
                                      int64_t, double);
template void rmsnorm_backward<float>(float*, float*, const float*, const float*, const float*,
                                      const float*, int64_t, int64_t);
template void rmsnorm_backward<double>(double*, double*, const double*, const double*,
                                       const double*, const double*, int64_t, int64_t);

}  // namespace freqkv::cpu
