// Elementwise vector operations, row gathers/scatters and the AdamW step.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cpu/cpu_kernels.h"

namespace freqkv::cpu {

namespace {

// Below this many elements a loop is cheaper than waking the OpenMP team.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;

// Columns handled by one task of a scatter: rows that add into the same destination row are
// walked in order by one thread, so there is no race and the sum does not depend on threads.
constexpr int64_t kScatterColumnTile = 256;

}  // namespace

template <typename T>
void add(T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for simd if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

template <typename T>
void axpy(T* y, double alpha, const T* x, int64_t n) {
  const T a = static_cast<T>(alpha);
#pragma omp parallel for simd if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
double sum_squares(const T* x, int64_t n) {
  double total = 0.0;
#pragma omp parallel for simd reduction(+ : total) if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const double xi = static_cast<double>(x[i]);
    total += xi * xi;
  }
  return total;
}

template <typename T>
void scale(T* x, double alpha, int64_t n) {
  const T a = static_cast<T>(alpha);
#pragma omp parallel for simd if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

template <typename T>
void gather_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, const int64_t* map,
                 int64_t n_rows, int64_t width) {
  if (width <= 0) return;
#pragma omp parallel for if (n_rows * width >= kParallelMinElements)
  for (int64_t r = 0; r < n_rows; ++r) {
    if (map[r] < 0) continue;
    std::memcpy(dst + r * ld_dst, src + map[r] * ld_src, static_cast<size_t>(width) * sizeof(T));
  }
}

template <typename T>
void scatter_add_rows(T* dsrc, int64_t ld_src, const T* ddst, int64_t ld_dst, const int64_t* map,
                      int64_t n_rows, int64_t width) {
  const int64_t n_tiles = (width + kScatterColumnTile - 1) / kScatterColumnTile;
#pragma omp parallel for if (n_rows * width >= kParallelMinElements)
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int64_t c0 = tile * kScatterColumnTile;
    const int64_t c1 = std::min(width, c0 + kScatterColumnTile);
    for (int64_t r = 0; r < n_rows; ++r) {
      if (map[r] < 0) continue;
      T* to = dsrc + map[r] * ld_src;
      const T* from = ddst + r * ld_dst;
      for (int64_t c = c0; c < c1; ++c) to[c] += from[c];
    }
  }
}

// torch.optim.AdamW's single-tensor implementation, operation by operation in fp32 with the same
// scalars (computed in double, as Python does, then used as fp32):
//   param.mul_(1 - lr * wd)
//   exp_avg.lerp_(grad, 1 - beta1)                     m += (1 - b1) (g - m)
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//   denom = exp_avg_sq.sqrt() / sqrt(1 - beta2^t) + eps
//   param.addcdiv_(exp_avg, denom, -lr / (1 - beta1^t))
template <typename T>
void adamw_update(float* master, float* m, float* v, T* param, const T* grad, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step,
                  double grad_scale) {
  if (step < 1) {
    throw std::invalid_argument("adamw_update: step must be >= 1 (bias correction), got " +
                                std::to_string(step));
  }
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float lerp_weight = static_cast<float>(1.0 - beta1);
  const float beta2_f = static_cast<float>(beta2);
  const float one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const float bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  const float eps_f = static_cast<float>(eps);
  const float neg_step_size = static_cast<float>(-lr / bias_correction1);
#pragma omp parallel for simd if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const float g = static_cast<float>(static_cast<double>(grad[i]) * grad_scale);
    const float p = master[i] * decay;
    // torch.lerp's two-sided formula (exact at weight 0 and 1).
    const float mi = lerp_weight < 0.5f ? m[i] + lerp_weight * (g - m[i])
                                        : g - (g - m[i]) * (1.0f - lerp_weight);
    const float vi = v[i] * beta2_f + one_minus_beta2 * g * g;
    const float denom = std::sqrt(vi) / bias_correction2_sqrt + eps_f;
    const float updated = p + neg_step_size * mi / denom;
    m[i] = mi;
    v[i] = vi;
    master[i] = updated;
    param[i] = static_cast<T>(updated);
  }
}

#define FREQKV_INSTANTIATE_ELEMENTWISE(T)                                                         \
  template void add<T>(T*, const T*, const T*, int64_t);                                          \
  template void axpy<T>(T*, double, const T*, int64_t);                                           \
  template double sum_squares<T>(const T*, int64_t);                                              \
  template void scale<T>(T*, double, int64_t);                                                    \
  template void gather_rows<T>(T*, int64_t, const T*, int64_t, const int64_t*, int64_t, int64_t); \
  template void scatter_add_rows<T>(T*, int64_t, const T*, int64_t, const int64_t*, int64_t,      \
                                    int64_t);                                                     \
  template void adamw_update<T>(float*, float*, float*, T*, const T*, int64_t, double, double,    \
                                double, double, double, int64_t, double);

FREQKV_INSTANTIATE_ELEMENTWISE(float)
FREQKV_INSTANTIATE_ELEMENTWISE(double)
#undef FREQKV_INSTANTIATE_ELEMENTWISE

}  // namespace freqkv::cpu
