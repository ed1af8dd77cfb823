// The FreqKV compression matrix against its definition: DCT-II, keep the lowest L frequencies,
// inverse DCT of length L, rescale by sqrt(L/N), written here with explicit cosine sums.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/freqkv_matrix.h"

namespace {

const double kPi = std::acos(-1.0);

// Orthonormal DCT-II of x (length N), straight from the formula.
std::vector<double> dct_ii(const std::vector<double>& x) {
  const size_t n = x.size();
  std::vector<double> X(n, 0.0);
  for (size_t k = 0; k < n; ++k) {
    const double a = k == 0 ? std::sqrt(1.0 / n) : std::sqrt(2.0 / n);
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) sum += x[i] * std::cos(kPi * (2.0 * i + 1.0) * k / (2.0 * n));
    X[k] = a * sum;
  }
  return X;
}

// Orthonormal DCT-III (the inverse of dct_ii), straight from the formula.
std::vector<double> dct_iii(const std::vector<double>& X) {
  const size_t n = X.size();
  std::vector<double> x(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    double sum = 0.0;
    for (size_t k = 0; k < n; ++k) {
      const double a = k == 0 ? std::sqrt(1.0 / n) : std::sqrt(2.0 / n);
      sum += a * X[k] * std::cos(kPi * (2.0 * i + 1.0) * k / (2.0 * n));
    }
    x[i] = sum;
  }
  return x;
}

// y = sqrt(L/N) IDCT_L(DCT_N(x)[0:L]), the spec's definition of compression.
std::vector<double> compress_by_definition(const std::vector<double>& x, size_t n_out) {
  std::vector<double> spectrum = dct_ii(x);
  spectrum.resize(n_out);
  std::vector<double> y = dct_iii(spectrum);
  for (double& v : y) v *= std::sqrt(static_cast<double>(n_out) / x.size());
  return y;
}

std::vector<double> matvec(const std::vector<double>& m, int64_t rows, int64_t cols,
                           const std::vector<double>& x) {
  std::vector<double> y(static_cast<size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) y[r] += m[r * cols + c] * x[c];
  }
  return y;
}

std::string expect_invalid_argument(int64_t n_in, int64_t n_out) {
  try {
    freqkv::freqkv_compression_matrix(n_in, n_out);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  ADD_FAILURE() << "no exception for n_in = " << n_in << ", n_out = " << n_out;
  return "";
}

TEST(DctMatrix, EntriesFollowTheFormula) {
  for (int64_t n : {1, 2, 5, 8}) {
    const std::vector<double> d = freqkv::dct_matrix(n);
    ASSERT_EQ(d.size(), static_cast<size_t>(n * n));
    for (int64_t k = 0; k < n; ++k) {
      const double a = k == 0 ? std::sqrt(1.0 / n) : std::sqrt(2.0 / n);
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_NEAR(d[k * n + i], a * std::cos(kPi * (2.0 * i + 1.0) * k / (2.0 * n)), 1e-14)
            << "n = " << n << ", k = " << k << ", i = " << i;
      }
    }
  }
  // Two hand-known values: D_2 = [[1, 1], [1, -1]] / sqrt(2).
  const std::vector<double> d2 = freqkv::dct_matrix(2);
  EXPECT_NEAR(d2[0], std::sqrt(0.5), 1e-15);
  EXPECT_NEAR(d2[3], -std::sqrt(0.5), 1e-15);
}

TEST(DctMatrix, IsOrthonormal) {
  for (int64_t n : {1, 3, 7, 16, 301}) {
    const std::vector<double> d = freqkv::dct_matrix(n);
    double worst = 0.0;
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = 0; b < n; ++b) {
        double dot = 0.0;
        for (int64_t i = 0; i < n; ++i) dot += d[a * n + i] * d[b * n + i];
        worst = std::max(worst, std::abs(dot - (a == b ? 1.0 : 0.0)));
      }
    }
    EXPECT_LT(worst, 1e-12) << "D D^T deviates from I for n = " << n;
  }
}

TEST(DctMatrix, RejectsBadSizesAndBuildsLeadingRows) {
  EXPECT_THROW(freqkv::dct_matrix(0), std::invalid_argument);
  EXPECT_THROW(freqkv::dct_matrix(-3), std::invalid_argument);
  EXPECT_THROW(freqkv::dct_matrix(4, 5), std::invalid_argument);
  EXPECT_THROW(freqkv::dct_matrix(4, 0), std::invalid_argument);
  // The first rows alone are the full matrix's first rows.
  const std::vector<double> full = freqkv::dct_matrix(7), low = freqkv::dct_matrix(7, 3);
  ASSERT_EQ(low.size(), 21u);
  for (size_t i = 0; i < low.size(); ++i) EXPECT_EQ(low[i], full[i]) << i;
}

TEST(FreqkvCompressionMatrix, MatchesDctTruncateIdct) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  const std::vector<std::pair<int64_t, int64_t>> cases = {{5, 3}, {8, 4},   {13, 6},
                                                          {9, 1}, {12, 11}, {30, 15}};
  for (const auto& [n_in, n_out] : cases) {
    const std::vector<double> p = freqkv::freqkv_compression_matrix(n_in, n_out);
    ASSERT_EQ(p.size(), static_cast<size_t>(n_in * n_out));
    // Column j of P is the compression of the unit vector e_j.
    for (int64_t j = 0; j < n_in; ++j) {
      std::vector<double> unit(static_cast<size_t>(n_in), 0.0);
      unit[j] = 1.0;
      const std::vector<double> column = compress_by_definition(unit, n_out);
      for (int64_t l = 0; l < n_out; ++l) {
        EXPECT_NEAR(p[l * n_in + j], column[l], 1e-13)
            << "N = " << n_in << ", L = " << n_out << ", entry (" << l << ", " << j << ")";
      }
    }
    // And a random signal.
    std::vector<double> x(static_cast<size_t>(n_in));
    for (double& v : x) v = uniform(rng);
    const std::vector<double> expected = compress_by_definition(x, n_out);
    const std::vector<double> got = matvec(p, n_out, n_in, x);
    for (int64_t l = 0; l < n_out; ++l) EXPECT_NEAR(got[l], expected[l], 1e-13);
  }
}

TEST(FreqkvCompressionMatrix, KeepsConstantSignals) {
  for (const auto& [n_in, n_out] :
       std::vector<std::pair<int64_t, int64_t>>{{2, 1}, {7, 3}, {16, 8}, {100, 37}, {512, 256}}) {
    const std::vector<double> p = freqkv::freqkv_compression_matrix(n_in, n_out);
    const std::vector<double> y = matvec(p, n_out, n_in, std::vector<double>(n_in, 2.5));
    for (int64_t l = 0; l < n_out; ++l) {
      EXPECT_NEAR(y[l], 2.5, 1e-12) << "N = " << n_in << ", L = " << n_out << ", row " << l;
    }
  }
}

TEST(FreqkvCompressionMatrix, SingleOutputIsTheMean) {
  // L = 1 keeps only the DC coefficient: every token gets weight 1/N.
  const std::vector<double> p = freqkv::freqkv_compression_matrix(6, 1);
  for (double w : p) EXPECT_NEAR(w, 1.0 / 6.0, 1e-15);
}

TEST(FreqkvCompressionMatrix, IsIdentityWithoutCompression) {
  for (int64_t n : {1, 4, 9, 33}) {
    const std::vector<double> p = freqkv::freqkv_compression_matrix(n, n);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < n; ++c) {
        EXPECT_NEAR(p[r * n + c], r == c ? 1.0 : 0.0, 1e-13) << "n = " << n;
      }
    }
  }
}

TEST(FreqkvMemoryTransferMatrix, IsThePowerOfTheMemoryColumns) {
  // Against multiplying P[:, 0:L] out k times, and against running the chain itself: k
  // compressions of [M ; zero tokens] starting from a random memory.
  for (const auto& [n, l] : std::vector<std::pair<int64_t, int64_t>>{{6, 3}, {9, 4}, {10, 10}}) {
    const std::vector<double> p = freqkv::freqkv_compression_matrix(n, l);
    std::vector<double> power(static_cast<size_t>(l * l), 0.0);
    for (int64_t i = 0; i < l; ++i) power[static_cast<size_t>(i * l + i)] = 1.0;
    std::mt19937_64 rng(7);
    std::normal_distribution<double> normal;
    std::vector<double> memory(static_cast<size_t>(l));
    for (double& m : memory) m = normal(rng);
    const std::vector<double> start = memory;
    for (int64_t k = 0; k <= 5; ++k) {
      const std::vector<double> a = freqkv::freqkv_memory_transfer_matrix(n, l, k);
      ASSERT_EQ(a.size(), power.size());
      for (size_t e = 0; e < a.size(); ++e) EXPECT_NEAR(a[e], power[e], 1e-13) << n << " " << k;
      for (int64_t i = 0; i < l; ++i) {  // A · M_0 equals the chain's memory after k steps
        double am = 0;
        for (int64_t j = 0; j < l; ++j) am += a[static_cast<size_t>(i * l + j)] * start[static_cast<size_t>(j)];
        EXPECT_NEAR(am, memory[static_cast<size_t>(i)], 1e-12) << n << " " << k << " " << i;
      }
      std::vector<double> next_power(power.size(), 0.0), next_memory(memory.size(), 0.0);
      for (int64_t i = 0; i < l; ++i)
        for (int64_t j = 0; j < l; ++j) {
          next_memory[static_cast<size_t>(i)] += p[static_cast<size_t>(i * n + j)] * memory[static_cast<size_t>(j)];
          for (int64_t q = 0; q < l; ++q)
            next_power[static_cast<size_t>(i * l + j)] +=
                p[static_cast<size_t>(i * n + q)] * power[static_cast<size_t>(q * l + j)];
        }
      power = next_power;
      memory = next_memory;
    }
  }
  EXPECT_THROW(freqkv::freqkv_memory_transfer_matrix(6, 3, -1), std::invalid_argument);
  EXPECT_THROW(freqkv::freqkv_memory_transfer_matrix(3, 6, 1), std::invalid_argument);
}

TEST(FreqkvCompressionMatrix, RejectsInvalidLengthsNamingThem) {
  EXPECT_NE(expect_invalid_argument(8, 0).find("n_out = 0"), std::string::npos);
  const std::string too_long = expect_invalid_argument(4, 5);
  EXPECT_NE(too_long.find("n_in = 4"), std::string::npos) << too_long;
  EXPECT_NE(too_long.find("n_out = 5"), std::string::npos) << too_long;
  expect_invalid_argument(0, 0);
  expect_invalid_argument(-2, 1);
}

}  // namespace
