#include "kernels/freqkv_matrix.h"

#include <cblas.h>

#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

namespace freqkv {

namespace {

constexpr double kPi = 3.14159265358979323846;

}  // namespace

std::vector<double> dct_matrix(int64_t n, int64_t rows) {
  if (n < 1) {
    throw std::invalid_argument("dct_matrix: the length must be >= 1, got n = " +
                                std::to_string(n));
  }
  if (rows < 0) rows = n;
  if (rows < 1 || rows > n) {
    throw std::invalid_argument("dct_matrix: rows must be in 1.." + std::to_string(n) + ", got " +
                                std::to_string(rows));
  }
  // cos(pi (2i+1) k / 2n) has period 4n in the integer (2i+1) k: reducing it first keeps the
  // argument of cos below 2 pi, where it is accurate, instead of growing like n^2.
  const int64_t period = 4 * n;
  const double a0 = std::sqrt(1.0 / static_cast<double>(n));
  const double ak = std::sqrt(2.0 / static_cast<double>(n));
  std::vector<double> d(static_cast<size_t>(rows * n));
  for (int64_t k = 0; k < rows; ++k) {
    const double norm = k == 0 ? a0 : ak;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t phase = ((2 * i + 1) * k) % period;
      d[static_cast<size_t>(k * n + i)] =
          norm * std::cos(kPi * static_cast<double>(phase) / static_cast<double>(2 * n));
    }
  }
  return d;
}

std::vector<double> freqkv_compression_matrix(int64_t n_in, int64_t n_out) {
  if (n_out < 1 || n_out > n_in) {
    throw std::invalid_argument("freqkv_compression_matrix: need 1 <= n_out <= n_in, got n_in = " +
                                std::to_string(n_in) + ", n_out = " + std::to_string(n_out));
  }
  if (n_in > INT_MAX) {
    throw std::invalid_argument("freqkv_compression_matrix: n_in = " + std::to_string(n_in) +
                                " exceeds the BLAS integer range");
  }
  const std::vector<double> d_out = dct_matrix(n_out);       // D_L, L x L
  const std::vector<double> d_in = dct_matrix(n_in, n_out);  // D_N[0:L, :], the kept frequencies
  const int L = static_cast<int>(n_out);
  const int N = static_cast<int>(n_in);
  // P[L, N] = sqrt(L/N) * D_L^T[L, L] * D_N[0:L, N]: one GEMM (L^2 N flops; a naive triple loop
  // would take seconds for the paper's L = 2046, N = 4092).
  std::vector<double> p(static_cast<size_t>(n_out * n_in));
  const double rescale = std::sqrt(static_cast<double>(n_out) / static_cast<double>(n_in));
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, L, N, L, rescale, d_out.data(), L,
              d_in.data(), N, 0.0, p.data(), N);
  return p;
}

std::vector<double> freqkv_memory_transfer_matrix(int64_t n_in, int64_t n_out, int64_t power) {
  if (power < 0) {
    throw std::invalid_argument("freqkv_memory_transfer_matrix: the power must be >= 0, got " +
                                std::to_string(power));
  }
  const std::vector<double> p = freqkv_compression_matrix(n_in, n_out);
  const int L = static_cast<int>(n_out);
  const size_t LL = static_cast<size_t>(n_out * n_out);
  std::vector<double> base(LL), result(LL, 0.0), scratch(LL);
  for (int64_t i = 0; i < n_out; ++i) {
    result[static_cast<size_t>(i * n_out + i)] = 1.0;
    for (int64_t j = 0; j < n_out; ++j)
      base[static_cast<size_t>(i * n_out + j)] = p[static_cast<size_t>(i * n_in + j)];
  }
  // Binary powering: log2(power) squarings of an L x L matrix.
  for (int64_t k = power; k > 0; k >>= 1) {
    if (k & 1) {
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, L, L, L, 1.0, result.data(), L,
                  base.data(), L, 0.0, scratch.data(), L);
      result.swap(scratch);
    }
    if (k > 1) {
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, L, L, L, 1.0, base.data(), L,
                  base.data(), L, 0.0, scratch.data(), L);
      base.swap(scratch);
    }
  }
  return result;
}

}  // namespace freqkv
