// The FFT route to FreqKV compression (kernels/dct_fft_math.h, used by the CUDA backend's cuFFT
// path) on the CPU, in double: the DCT-II, the DCT-III, the compression N -> L and its adjoint are
// rebuilt from the header's functions around a naive O(n^2) DFT written here (standing in for
// cuFFT's real-to-complex and complex-to-real transforms, half spectrum and all), and must equal
// the matrices of kernels/freqkv_matrix.h to ~1e-12. This is the proof of the cuFFT path's math
// that needs no GPU; the GPU tests then check the CUDA kernels against the CPU backend.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dct_fft_math.h"
#include "kernels/freqkv_matrix.h"

namespace {

using freqkv::dct2_coefficient;
using freqkv::dct3_bin;
using freqkv::dct_orthonormal_scale;
using freqkv::dct_resample_bin;
using freqkv::dct_resample_gain;
using freqkv::makhoul_position;
using freqkv::makhoul_source;

constexpr double kPi = 3.14159265358979323846;
constexpr double kTolerance = 1e-12;

// cuFFT's cufftComplex, in double.
struct ComplexD {
  double x = 0.0, y = 0.0;
};

// What cuFFT's real-to-complex transform computes: bins 0..n/2 of V_k = sum_m v_m e^{-2 pi i mk/n}
// (no normalisation), bin b stored at half[b * stride] (the layout of channel-interleaved data).
std::vector<ComplexD> naive_real_fft(const std::vector<double>& v, int64_t stride) {
  const int64_t n = static_cast<int64_t>(v.size());
  std::vector<ComplexD> half(static_cast<size_t>((n / 2 + 1) * stride));
  for (int64_t k = 0; k <= n / 2; ++k) {
    ComplexD sum;
    for (int64_t m = 0; m < n; ++m) {
      // The angle from m k mod n keeps cos/sin arguments below 2 pi.
      const double angle = -2.0 * kPi * static_cast<double>((m * k) % n) / static_cast<double>(n);
      sum.x += v[m] * std::cos(angle);
      sum.y += v[m] * std::sin(angle);
    }
    half[static_cast<size_t>(k * stride)] = sum;
  }
  return half;
}

// What cuFFT's complex-to-real transform computes from bins 0..n/2: the real part of
// sum_k W_k e^{+2 pi i mk/n} over the Hermitian-extended spectrum (W_{n-k} = conj(W_k)), no
// normalisation. Taking the real part also drops the imaginary parts of bins 0 and n/2, as
// cuFFT does.
std::vector<double> naive_inverse_real_fft(const std::vector<ComplexD>& half, int64_t n) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t m = 0; m < n; ++m) {
    double sum = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      const ComplexD w = freqkv::real_fft_bin(half.data(), 1, k, n);
      const double angle = 2.0 * kPi * static_cast<double>((m * k) % n) / static_cast<double>(n);
      sum += w.x * std::cos(angle) - w.y * std::sin(angle);
    }
    v[m] = sum;
  }
  return v;
}

// The orthonormal DCT-II of x through Makhoul's reordering and one real FFT.
std::vector<double> fft_dct2(const std::vector<double>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<double> v(x.size());
  for (int64_t m = 0; m < n; ++m) v[m] = x[makhoul_source(m, n)];
  const int64_t stride = 2;  // every other slot, as another channel's bins would sit between
  const std::vector<ComplexD> half = naive_real_fft(v, stride);
  std::vector<double> coefficients(x.size());
  for (int64_t k = 0; k < n; ++k) {
    coefficients[k] = dct_orthonormal_scale(k, n) * dct2_coefficient(half.data(), stride, k, n);
  }
  return coefficients;
}

// The orthonormal DCT-III (the inverse of fft_dct2) through one inverse real FFT.
std::vector<double> fft_dct3(const std::vector<double>& coefficients) {
  const int64_t n = static_cast<int64_t>(coefficients.size());
  // Unnormalised coefficients X_k = c_k / a_k, with X_n = 0.
  const auto unnormalised = [&](int64_t k) {
    return k < n ? coefficients[k] / dct_orthonormal_scale(k, n) : 0.0;
  };
  std::vector<ComplexD> half(static_cast<size_t>(n / 2 + 1));
  for (int64_t k = 0; k <= n / 2; ++k) {
    half[k] = dct3_bin<ComplexD>(unnormalised(k), k == 0 ? 0.0 : unnormalised(n - k), k, n);
  }
  const std::vector<double> v = naive_inverse_real_fft(half, n);
  std::vector<double> x(coefficients.size());
  for (int64_t i = 0; i < n; ++i) x[i] = v[makhoul_position(i, n)] / static_cast<double>(n);
  return x;
}

// Compression (n_src = N, n_dst = L) or its adjoint (n_src = L, n_dst = N), exactly as the
// CUDA kernels do it: reorder, real FFT, dct_resample_bin per output bin, inverse real FFT,
// reorder back (dct_resample_gain holds every scale, the inverse FFT's 1/n_dst included).
std::vector<double> fft_resample(const std::vector<double>& src, int64_t n_dst) {
  const int64_t n_src = static_cast<int64_t>(src.size());
  std::vector<double> v(src.size());
  for (int64_t m = 0; m < n_src; ++m) v[m] = src[makhoul_source(m, n_src)];
  const int64_t stride = 3;
  const std::vector<ComplexD> src_half = naive_real_fft(v, stride);
  const double gain = dct_resample_gain(n_src, n_dst);
  std::vector<ComplexD> dst_half(static_cast<size_t>(n_dst / 2 + 1));
  for (int64_t k = 0; k <= n_dst / 2; ++k) {
    dst_half[k] = dct_resample_bin(src_half.data(), stride, k, n_src, n_dst, gain);
  }
  const std::vector<double> w = naive_inverse_real_fft(dst_half, n_dst);
  std::vector<double> dst(static_cast<size_t>(n_dst));
  for (int64_t m = 0; m < n_dst; ++m) dst[makhoul_source(m, n_dst)] = w[m];
  return dst;
}

// The rows x cols matrix of a linear map, column j = map(unit vector j), row-major.
template <typename Map>
std::vector<double> matrix_of(Map map, int64_t rows, int64_t cols) {
  std::vector<double> matrix(static_cast<size_t>(rows * cols));
  for (int64_t j = 0; j < cols; ++j) {
    std::vector<double> unit(static_cast<size_t>(cols), 0.0);
    unit[j] = 1.0;
    const std::vector<double> column = map(unit);
    EXPECT_EQ(static_cast<int64_t>(column.size()), rows);
    for (int64_t i = 0; i < rows; ++i) matrix[i * cols + j] = column[i];
  }
  return matrix;
}

void expect_matrices_near(const std::vector<double>& got, const std::vector<double>& want,
                          int64_t cols, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::abs(got[i] - want[i]) <= kTolerance) && reported++ < 5) {
      ADD_FAILURE() << what << "[" << i / cols << ", " << i % cols << "]: fft route " << got[i]
                    << ", matrix " << want[i] << " (difference " << got[i] - want[i] << ")";
    }
  }
}

// n odd and even, 1 and 2 (where the half spectrum is all of it), powers of two and not.
const std::vector<int64_t> kLengths = {1, 2, 3, 4, 5, 7, 8, 15, 16, 33, 60, 64, 101};

TEST(DctFftMath, MakhoulReorderingIsAPermutationAndItsInverse) {
  for (int64_t n : kLengths) {
    std::vector<int> hits(static_cast<size_t>(n), 0);
    for (int64_t m = 0; m < n; ++m) {
      const int64_t i = makhoul_source(m, n);
      ASSERT_GE(i, 0) << "n = " << n << ", m = " << m;
      ASSERT_LT(i, n) << "n = " << n << ", m = " << m;
      ++hits[i];
      EXPECT_EQ(makhoul_position(i, n), m) << "n = " << n << ", m = " << m;
    }
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[i], 1) << "n = " << n << ", element " << i;
  }
  // n = 5: v = x0 x2 x4 x3 x1.
  const std::vector<int64_t> want = {0, 2, 4, 3, 1};
  for (int64_t m = 0; m < 5; ++m) EXPECT_EQ(makhoul_source(m, 5), want[m]) << "m = " << m;
}

TEST(DctFftMath, ScalesAndGain) {
  EXPECT_DOUBLE_EQ(dct_orthonormal_scale(0, 8), std::sqrt(1.0 / 8));
  EXPECT_DOUBLE_EQ(dct_orthonormal_scale(3, 8), std::sqrt(2.0 / 8));
  EXPECT_DOUBLE_EQ(freqkv::freqkv_rescale(4092, 2046), std::sqrt(0.5));
  EXPECT_DOUBLE_EQ(freqkv::freqkv_rescale(2046, 4092), std::sqrt(0.5));
  // Forward and backward both come out as 1/N.
  EXPECT_NEAR(dct_resample_gain(4092, 2046), 1.0 / 4092, 1e-18);
  EXPECT_NEAR(dct_resample_gain(2046, 4092), 1.0 / 4092, 1e-18);
  EXPECT_NEAR(dct_resample_gain(7, 7), 1.0 / 7, 1e-18);
}

TEST(DctFftMath, Dct2ThroughOneRealFftIsTheDctMatrix) {
  for (int64_t n : kLengths) {
    expect_matrices_near(matrix_of(fft_dct2, n, n), freqkv::dct_matrix(n), n,
                         "DCT-II, n = " + std::to_string(n));
  }
}

TEST(DctFftMath, Dct3ThroughOneInverseRealFftIsTheTransposedDctMatrix) {
  for (int64_t n : kLengths) {
    const std::vector<double> d = freqkv::dct_matrix(n);
    std::vector<double> d_transposed(d.size());
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t i = 0; i < n; ++i) d_transposed[i * n + k] = d[k * n + i];
    }
    expect_matrices_near(matrix_of(fft_dct3, n, n), d_transposed, n,
                         "DCT-III, n = " + std::to_string(n));
  }
}

struct CompressionSize {
  int64_t n_in, n_out;
};
// L = N, L = 1, odd and even N and L, the usual L = N/2 and FreqKV-like uneven ratios.
const std::vector<CompressionSize> kCompressionSizes = {
    {1, 1},  {2, 1},  {2, 2},   {3, 2},   {5, 5},   {7, 3},   {8, 4},    {9, 1},
    {16, 1}, {16, 16}, {31, 15}, {33, 17}, {60, 30}, {64, 63}, {101, 50}, {128, 64}};

TEST(DctFftMath, CompressionThroughFftsIsTheCompressionMatrix) {
  for (const CompressionSize& size : kCompressionSizes) {
    const auto compress = [&](const std::vector<double>& x) { return fft_resample(x, size.n_out); };
    expect_matrices_near(matrix_of(compress, size.n_out, size.n_in),
                         freqkv::freqkv_compression_matrix(size.n_in, size.n_out), size.n_in,
                         "compression " + std::to_string(size.n_in) + " -> " +
                             std::to_string(size.n_out));
  }
}

TEST(DctFftMath, AdjointThroughFftsIsTheTransposedCompressionMatrix) {
  for (const CompressionSize& size : kCompressionSizes) {
    const std::vector<double> p = freqkv::freqkv_compression_matrix(size.n_in, size.n_out);
    std::vector<double> p_transposed(p.size());
    for (int64_t l = 0; l < size.n_out; ++l) {
      for (int64_t i = 0; i < size.n_in; ++i) {
        p_transposed[i * size.n_out + l] = p[l * size.n_in + i];
      }
    }
    const auto adjoint = [&](const std::vector<double>& dy) { return fft_resample(dy, size.n_in); };
    expect_matrices_near(matrix_of(adjoint, size.n_in, size.n_out), p_transposed, size.n_out,
                         "adjoint " + std::to_string(size.n_out) + " -> " +
                             std::to_string(size.n_in));
  }
}

// The float twiddles the CUDA kernels use (on the host here, with cos/sin instead of the device's
// sincospif) agree with the double ones to float accuracy.
TEST(DctFftMath, FloatTwiddlesAgreeWithDouble) {
  for (int64_t n : {7, 64, 4092}) {
    for (int64_t k : {int64_t{0}, int64_t{1}, n / 3, n - 1}) {
      float cf, sf;
      double cd, sd;
      freqkv::dct_twiddle(k, n, &cf, &sf);
      freqkv::dct_twiddle(k, n, &cd, &sd);
      EXPECT_NEAR(cf, cd, 2e-7) << "cos, n = " << n << ", k = " << k;
      EXPECT_NEAR(sf, sd, 2e-7) << "sin, n = " << n << ", k = " << k;
    }
  }
}

}  // namespace
