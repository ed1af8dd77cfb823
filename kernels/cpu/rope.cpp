// Rotary position embedding, Hugging Face rotate-half convention.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernel_math.h"

namespace freqkv::cpu {

namespace {

constexpr int64_t kParallelMinElements = int64_t{1} << 14;

void check_rope_arguments(const void* out, int64_t ld_out, const void* x, int64_t ld_x, int n_heads,
                          int head_dim) {
  if (head_dim <= 0 || head_dim % 2 != 0 || n_heads <= 0) {
    throw std::invalid_argument("rope: need n_heads > 0 and an even head_dim > 0, got n_heads = " +
                                std::to_string(n_heads) +
                                ", head_dim = " + std::to_string(head_dim));
  }
  const int64_t width = static_cast<int64_t>(n_heads) * head_dim;
  if (ld_out < width || ld_x < width) {
    throw std::invalid_argument("rope: ld_out = " + std::to_string(ld_out) +
                                " and ld_x = " + std::to_string(ld_x) +
                                " must be >= n_heads * head_dim = " + std::to_string(width));
  }
  // In place means row for row: with different strides, writing row r would clobber input rows
  // not yet read.
  if (out == x && ld_out != ld_x) {
    throw std::invalid_argument("rope: in place (out == x) needs ld_out == ld_x, got " +
                                std::to_string(ld_out) + " and " + std::to_string(ld_x));
  }
}

}  // namespace

template <typename T>
void rope(T* out, int64_t ld_out, const T* x, int64_t ld_x, const int32_t* positions,
          int64_t n_rows, int n_heads, int head_dim, double theta, bool inverse) {
  check_rope_arguments(out, ld_out, x, ld_x, n_heads, head_dim);
  const int half = head_dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i)
    inv_freq[static_cast<size_t>(i)] = rope_inv_freq(i, head_dim, theta);
  const double sin_sign = inverse ? -1.0 : 1.0;

#pragma omp parallel if (n_rows * n_heads * head_dim >= kParallelMinElements)
  {
    // One row's cos/sin, shared by all its heads. Angle, cos and sin in double: positions are
    // large and an fp32 angle would lose digits; the rotation itself is rounded to T once.
    std::vector<double> cos_row(static_cast<size_t>(half));
    std::vector<double> sin_row(static_cast<size_t>(half));
#pragma omp for
    for (int64_t r = 0; r < n_rows; ++r) {
      const double position = positions[r];
      for (int i = 0; i < half; ++i) {
        const double angle = position * inv_freq[static_cast<size_t>(i)];
        cos_row[static_cast<size_t>(i)] = std::cos(angle);
        sin_row[static_cast<size_t>(i)] = sin_sign * std::sin(angle);
      }
      for (int h = 0; h < n_heads; ++h) {
        const T* xh = x + r * ld_x + static_cast<int64_t>(h) * head_dim;
        T* yh = out + r * ld_out + static_cast<int64_t>(h) * head_dim;
        for (int i = 0; i < half; ++i) {
          // Both inputs are read before either output is written: safe in place.
          double lo = 0.0;
          double hi = 0.0;
          rope_rotate_pair<double>(xh[i], xh[i + half], cos_row[static_cast<size_t>(i)],
                                   sin_row[static_cast<size_t>(i)], &lo, &hi);
          yh[i] = static_cast<T>(lo);
          yh[i + half] = static_cast<T>(hi);
        }
      }
    }
  }
}

template void rope<float>(float*, int64_t, const float*, int64_t, const int32_t*, int64_t, int, int,
                          double, bool);
template void rope<double>(double*, int64_t, const double*, int64_t, const int32_t*, int64_t, int,
                           int, double, bool);

}  // namespace freqkv::cpu
