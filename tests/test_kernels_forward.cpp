// Every forward kernel of the CPU backend (fp32 and fp64) against a naive double-precision
// reference written here, independently of the kernels: small odd sizes, strides wider than the
// data, grouped-query attention with FreqKV-shaped and plain causal blocks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"

namespace {

using freqkv::AttnBlock;
using freqkv::AttnShape;
using freqkv::Buffer;
using freqkv::Kernels;

const double kPi = std::acos(-1.0);

std::vector<double> random_values(size_t n, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(lo, hi);
  std::vector<double> values(n);
  for (double& v : values) v = uniform(rng);
  return values;
}

// Checks got[i] against want[i] with |got - want| <= tol (1 + |want|), naming the first misses.
void expect_all_close(const std::vector<double>& got, const std::vector<double>& want, double tol,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = tol * (1.0 + std::abs(want[i]));
    if (!(std::abs(got[i] - want[i]) <= bound) && reported++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i]
                    << " (tolerance " << bound << ")";
    }
  }
}

template <typename T>
class CpuKernelsForward : public ::testing::Test {
 protected:
  // Relative tolerance of a kernel result against the double reference.
  static constexpr double kTol = std::is_same_v<T, float> ? 3e-6 : 1e-13;

  // Rounds host values to T, so that the reference sees exactly what the kernel sees.
  static std::vector<double> representable(std::vector<double> values) {
    for (double& v : values) v = static_cast<double>(static_cast<T>(v));
    return values;
  }

  Buffer<T> upload(const std::vector<double>& host) {
    Buffer<T> buffer(*kernels, static_cast<int64_t>(host.size()));
    kernels->upload(buffer.data(), host.data(), buffer.size());
    return buffer;
  }

  std::vector<double> download(const Buffer<T>& buffer) {
    std::vector<double> host(static_cast<size_t>(buffer.size()));
    kernels->download(host.data(), buffer.data(), buffer.size());
    return host;
  }

  std::unique_ptr<Kernels<T>> kernels = freqkv::make_cpu_kernels<T>();
};

using ElementTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(CpuKernelsForward, ElementTypes);

TYPED_TEST(CpuKernelsForward, NameSaysPrecision) {
  const std::string expected = std::is_same_v<TypeParam, float> ? "cpu-fp32" : "cpu-fp64";
  EXPECT_EQ(this->kernels->name(), expected);
}

TYPED_TEST(CpuKernelsForward, BuffersAreCountedUntilTheLastCopyGoes) {
  using T = TypeParam;
  auto& k = *this->kernels;
  const int64_t base = k.memory_in_use();
  k.reset_peak_memory();
  {
    Buffer<T> a(k, 100);
    Buffer<int32_t> b(k, 10);
    EXPECT_EQ(k.memory_in_use(), base + 100 * int64_t{sizeof(T)} + 40);
    Buffer<T> shared = a;  // a copy of the handle holds the same memory
    a = Buffer<T>();
    EXPECT_EQ(k.memory_in_use(), base + 100 * int64_t{sizeof(T)} + 40);
  }
  EXPECT_EQ(k.memory_in_use(), base);
  EXPECT_EQ(k.peak_memory(), base + 100 * int64_t{sizeof(T)} + 40);
  k.reset_peak_memory();
  EXPECT_EQ(k.peak_memory(), base);
}

TYPED_TEST(CpuKernelsForward, MemoryIsAlignedZeroedAndCopies) {
  using T = TypeParam;
  auto& k = *this->kernels;
  Buffer<T> a(k, 37);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 64, 0u);
  EXPECT_EQ(this->download(a), std::vector<double>(37, 0.0));

  const std::vector<float> host_f = {1.5f, -2.25f, 3.0f};
  Buffer<T> b(k, 3);
  k.upload(b.data(), host_f.data(), 3);
  std::vector<float> back_f(3);
  k.download(back_f.data(), b.data(), 3);
  EXPECT_EQ(back_f, host_f);

  const std::vector<double> host = this->representable(random_values(37, 1));
  Buffer<T> c = this->upload(host);
  k.copy_on_device(a.data(), c.data(), 37 * sizeof(T));
  EXPECT_EQ(this->download(a), host);
  k.fill_zero(a.data() + 10, 5 * sizeof(T));
  std::vector<double> expected = host;
  std::fill(expected.begin() + 10, expected.begin() + 15, 0.0);
  EXPECT_EQ(this->download(a), expected);

  std::vector<T> raw(37);
  k.copy_to_host(raw.data(), c.data(), 37 * sizeof(T));
  EXPECT_EQ(static_cast<double>(raw[36]), host[36]);
  raw[5] = T(42);
  k.copy_to_device(a.data(), raw.data(), 37 * sizeof(T));
  EXPECT_EQ(this->download(a)[5], 42.0);
  k.synchronize();
}

TYPED_TEST(CpuKernelsForward, GemmEveryTransposeWithWideStrides) {
  const int64_t M = 5, N = 7, K = 3;
  const double alpha = 0.7, beta = -1.3;
  for (bool trans_a : {false, true}) {
    for (bool trans_b : {false, true}) {
      // Stored shapes: A is M x K (K x M when transposed), B is K x N (N x K when transposed);
      // every leading dimension is wider than its row.
      const int64_t a_rows = trans_a ? K : M, a_cols = trans_a ? M : K, lda = a_cols + 2;
      const int64_t b_rows = trans_b ? N : K, b_cols = trans_b ? K : N, ldb = b_cols + 3;
      const int64_t ldc = N + 1;
      const std::vector<double> A = this->representable(random_values(a_rows * lda, 2));
      const std::vector<double> B = this->representable(random_values(b_rows * ldb, 3));
      const std::vector<double> C0 = this->representable(random_values(M * ldc, 4));
      std::vector<double> want = C0;
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < N; ++j) {
          double sum = 0.0;
          for (int64_t p = 0; p < K; ++p) {
            const double a = trans_a ? A[p * lda + i] : A[i * lda + p];
            const double b = trans_b ? B[j * ldb + p] : B[p * ldb + j];
            sum += a * b;
          }
          want[i * ldc + j] = alpha * sum + beta * C0[i * ldc + j];
        }
      }
      Buffer<TypeParam> a = this->upload(A), b = this->upload(B), c = this->upload(C0);
      this->kernels->gemm(trans_a, trans_b, M, N, K, alpha, a.data(), lda, b.data(), ldb, beta,
                          c.data(), ldc);
      // The padding column of C (j = N) keeps its value: want copied it from C0.
      expect_all_close(this->download(c), want, this->kTol,
                       std::string("gemm trans_a=") + (trans_a ? "1" : "0") +
                           " trans_b=" + (trans_b ? "1" : "0"));
    }
  }
}

TYPED_TEST(CpuKernelsForward, GemmWithEmptySizes) {
  using T = TypeParam;
  const std::vector<double> C0 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0};
  Buffer<T> c = this->upload(C0);
  Buffer<T> dummy(*this->kernels, 4);
  // K = 0: the product is an empty sum, C = beta C.
  this->kernels->gemm(false, false, 2, 3, 0, 1.0, dummy.data(), 1, dummy.data(), 3, 0.5, c.data(),
                      3);
  EXPECT_EQ(this->download(c), (std::vector<double>{0.5, 1.0, 1.5, 2.0, 2.5, 3.0}));
  // beta = 0 overwrites, even NaN.
  std::vector<double> with_nan = C0;
  with_nan[4] = std::numeric_limits<double>::quiet_NaN();
  Buffer<T> c_nan = this->upload(with_nan);
  this->kernels->gemm(true, true, 2, 3, 0, 1.0, dummy.data(), 2, dummy.data(), 1, 0.0, c_nan.data(),
                      3);
  EXPECT_EQ(this->download(c_nan), std::vector<double>(6, 0.0));
  // M = 0 or N = 0: nothing to do, C untouched.
  this->kernels->gemm(false, false, 0, 3, 2, 1.0, dummy.data(), 2, dummy.data(), 3, 0.0, c.data(),
                      3);
  this->kernels->gemm(false, false, 2, 0, 2, 1.0, dummy.data(), 2, dummy.data(), 1, 0.0, c.data(),
                      1);
  EXPECT_EQ(this->download(c), (std::vector<double>{0.5, 1.0, 1.5, 2.0, 2.5, 3.0}));
  // A leading dimension narrower than the stored row is an error, not a silent BLAS message.
  EXPECT_THROW(this->kernels->gemm(false, false, 2, 3, 2, 1.0, dummy.data(), 1, dummy.data(), 3,
                                   0.0, c.data(), 3),
               std::invalid_argument);
}

TYPED_TEST(CpuKernelsForward, VectorOperations) {
  // One odd size below the threading threshold and one above it.
  for (int64_t n : {int64_t{1001}, int64_t{40001}}) {
    const std::vector<double> a = this->representable(random_values(n, 5));
    const std::vector<double> b = this->representable(random_values(n, 6));
    Buffer<TypeParam> da = this->upload(a), db = this->upload(b), dout(*this->kernels, n);

    this->kernels->add(dout.data(), da.data(), db.data(), n);
    std::vector<double> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = a[i] + b[i];
    expect_all_close(this->download(dout), want, this->kTol, "add");

    this->kernels->axpy(da.data(), -0.375, db.data(), n);
    for (int64_t i = 0; i < n; ++i) want[i] = a[i] - 0.375 * b[i];
    expect_all_close(this->download(da), want, this->kTol, "axpy");

    this->kernels->scale(db.data(), 2.5, n);
    for (int64_t i = 0; i < n; ++i) want[i] = 2.5 * b[i];
    expect_all_close(this->download(db), want, this->kTol, "scale");

    // The sum of squares is accumulated in double whatever T is: exact to double rounding.
    Buffer<TypeParam> fresh = this->upload(a);
    double sum = 0.0;
    for (double x : a) sum += x * x;
    EXPECT_NEAR(this->kernels->sum_squares(fresh.data(), n), sum, 1e-12 * sum);
  }
}

TYPED_TEST(CpuKernelsForward, GatherRowsSkipsNegativeIndices) {
  const int64_t src_rows = 6, ld_src = 9, width = 5, dst_rows = 4, ld_dst = 7;
  const std::vector<double> src = this->representable(random_values(src_rows * ld_src, 7));
  const std::vector<double> dst0 = this->representable(random_values(dst_rows * ld_dst, 8));
  const std::vector<int64_t> map = {3, -1, 0, 3};
  std::vector<double> want = dst0;
  for (int64_t r = 0; r < dst_rows; ++r) {
    if (map[r] < 0) continue;
    for (int64_t c = 0; c < width; ++c) want[r * ld_dst + c] = src[map[r] * ld_src + c];
  }
  Buffer<TypeParam> dsrc = this->upload(src), ddst = this->upload(dst0);
  Buffer<int64_t> dmap = freqkv::upload_array(*this->kernels, map);
  this->kernels->gather_rows(ddst.data(), ld_dst, dsrc.data(), ld_src, dmap.data(), dst_rows,
                             width);
  EXPECT_EQ(this->download(ddst), want);
}

TYPED_TEST(CpuKernelsForward, ScatterAddRowsSumsRepeatedIndices) {
  const int64_t src_rows = 4, ld_src = 6, width = 5, dst_rows = 5, ld_dst = 8;
  const std::vector<double> dsrc0 = this->representable(random_values(src_rows * ld_src, 9));
  const std::vector<double> ddst = this->representable(random_values(dst_rows * ld_dst, 10));
  const std::vector<int64_t> map = {2, -1, 2, 0, 2};
  std::vector<double> want = dsrc0;
  for (int64_t r = 0; r < dst_rows; ++r) {
    if (map[r] < 0) continue;
    for (int64_t c = 0; c < width; ++c) want[map[r] * ld_src + c] += ddst[r * ld_dst + c];
  }
  Buffer<TypeParam> a = this->upload(dsrc0), b = this->upload(ddst);
  Buffer<int64_t> dmap = freqkv::upload_array(*this->kernels, map);
  this->kernels->scatter_add_rows(a.data(), ld_src, b.data(), ld_dst, dmap.data(), dst_rows, width);
  expect_all_close(this->download(a), want, this->kTol, "scatter_add_rows");
}

TYPED_TEST(CpuKernelsForward, EmbeddingLooksUpRows) {
  const int64_t vocab = 11, dim = 6;
  const std::vector<double> table = this->representable(random_values(vocab * dim, 11));
  const std::vector<int32_t> tokens = {3, 0, 10, 3, 7};
  std::vector<double> want;
  for (int32_t t : tokens)
    want.insert(want.end(), table.begin() + t * dim, table.begin() + (t + 1) * dim);
  Buffer<TypeParam> dtable = this->upload(table), out(*this->kernels, 5 * dim);
  Buffer<int32_t> dtokens = freqkv::upload_array(*this->kernels, tokens);
  this->kernels->embedding_forward(out.data(), dtable.data(), dtokens.data(), 5, dim);
  EXPECT_EQ(this->download(out), want);

  Buffer<int32_t> negative = freqkv::upload_array(*this->kernels, std::vector<int32_t>{1, -4});
  EXPECT_THROW(this->kernels->embedding_forward(out.data(), dtable.data(), negative.data(), 2, dim),
               std::out_of_range);
}

TYPED_TEST(CpuKernelsForward, RmsNormMatchesHuggingFace) {
  const int64_t rows = 5, dim = 13;
  const double eps = 1e-5;
  std::vector<double> x = random_values(rows * dim, 12, -2.0, 2.0);
  for (int64_t c = 0; c < dim; ++c) x[dim + c] *= 1e-3;  // a row whose eps matters
  x = this->representable(x);
  const std::vector<double> w = this->representable(random_values(dim, 13, 0.5, 1.5));
  std::vector<double> want(rows * dim), want_rstd(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double mean_sq = 0.0;
    for (int64_t c = 0; c < dim; ++c) mean_sq += x[r * dim + c] * x[r * dim + c] / dim;
    want_rstd[r] = 1.0 / std::sqrt(mean_sq + eps);
    for (int64_t c = 0; c < dim; ++c) want[r * dim + c] = w[c] * x[r * dim + c] * want_rstd[r];
  }
  using A = freqkv::Acc<TypeParam>;
  Buffer<TypeParam> dx = this->upload(x), dw = this->upload(w), out(*this->kernels, rows * dim);
  Buffer<A> rstd(*this->kernels, rows);
  this->kernels->rmsnorm_forward(out.data(), rstd.data(), dx.data(), dw.data(), rows, dim, eps);
  expect_all_close(this->download(out), want, this->kTol, "rmsnorm out");
  std::vector<A> got_rstd(rows);
  this->kernels->copy_to_host(got_rstd.data(), rstd.data(), rows * sizeof(A));
  expect_all_close(std::vector<double>(got_rstd.begin(), got_rstd.end()), want_rstd, this->kTol,
                   "rmsnorm rstd");
}

// Rotate-half RoPE written from the Hugging Face definition: cat(-x2, x1) * sin + x * cos.
std::vector<double> rope_reference(const std::vector<double>& x, int64_t ld_x,
                                   const std::vector<int32_t>& positions, int n_heads, int D,
                                   double theta, int64_t ld_out, const std::vector<double>& out0) {
  std::vector<double> out = out0;
  for (size_t r = 0; r < positions.size(); ++r) {
    for (int h = 0; h < n_heads; ++h) {
      const double* xh = &x[r * ld_x + h * D];
      for (int d = 0; d < D; ++d) {
        const int i = d % (D / 2);
        const double angle = positions[r] / std::pow(theta, 2.0 * i / D);
        const double rotated_half = d < D / 2 ? -xh[d + D / 2] : xh[d - D / 2];
        out[r * ld_out + h * D + d] = xh[d] * std::cos(angle) + rotated_half * std::sin(angle);
      }
    }
  }
  return out;
}

TYPED_TEST(CpuKernelsForward, RopeRotatesHalvesInPlaceAndInverts) {
  const int n_heads = 3, D = 6;
  const int64_t ld_x = n_heads * D + 4, ld_out = n_heads * D + 2;
  const double theta = 10000.0;
  const std::vector<int32_t> positions = {0, 1, 7, 1000, 65535};
  const int64_t rows = static_cast<int64_t>(positions.size());
  const std::vector<double> x = this->representable(random_values(rows * ld_x, 14));
  const std::vector<double> out0 = this->representable(random_values(rows * ld_out, 15));
  const std::vector<double> want =
      rope_reference(x, ld_x, positions, n_heads, D, theta, ld_out, out0);
  // An angle near 65535 carries an absolute rounding error of ~1e-11 in double however it is
  // computed (p / theta^e here, p * theta^-e in the kernel): that bounds the achievable agreement.
  const double tol = std::max(this->kTol, 65535 * 4e-16);
  auto& k = *this->kernels;
  Buffer<int32_t> dpos = freqkv::upload_array(k, positions);
  Buffer<TypeParam> dx = this->upload(x), dout = this->upload(out0);
  k.rope(dout.data(), ld_out, dx.data(), ld_x, dpos.data(), rows, n_heads, D, theta, false);
  expect_all_close(this->download(dout), want, tol, "rope out of place");

  // In place (out == x, same stride): the same rotation; x's padding columns are kept.
  const std::vector<double> want_in_place =
      rope_reference(x, ld_x, positions, n_heads, D, theta, ld_x, x);
  k.rope(dx.data(), ld_x, dx.data(), ld_x, dpos.data(), rows, n_heads, D, theta, false);
  expect_all_close(this->download(dx), want_in_place, tol, "rope in place");

  // The inverse rotation undoes it.
  k.rope(dx.data(), ld_x, dx.data(), ld_x, dpos.data(), rows, n_heads, D, theta, true);
  expect_all_close(this->download(dx), x, 4 * this->kTol, "inverse rope of rope");

  EXPECT_THROW(k.rope(dx.data(), ld_x, dx.data(), ld_x, dpos.data(), rows, 3, 5, theta, false),
               std::invalid_argument);
  EXPECT_THROW(k.rope(dx.data(), ld_x + 1, dx.data(), ld_x, dpos.data(), rows, 3, 6, theta, false),
               std::invalid_argument);
}

// The attention layout used by the forward and backward tests: a plain causal block, a FreqKV
// chunk (n_kv = sink + memory + n_q) whose keys live elsewhere, a one-query chunk, and one key row
// (5) that belongs to no block.
struct AttentionCase {
  AttnShape shape{4, 2, 6, 1.0 / std::sqrt(6.0)};
  std::vector<AttnBlock> blocks{{0, 5, 0, 5}, {5, 3, 6, 7}, {8, 1, 13, 4}};
  int64_t q_rows = 9, kv_rows = 17;
  int64_t ld_q = 4 * 6 + 3, ld_out = 4 * 6 + 2, ld_kv = 2 * 6 + 1;
};

// Naive attention in double: explicit mask, softmax by definition.
void attention_reference(const AttentionCase& c, const std::vector<double>& q,
                         const std::vector<double>& k, const std::vector<double>& v,
                         std::vector<double>& out, std::vector<double>& lse) {
  const int D = c.shape.head_dim, Hq = c.shape.n_heads;
  const int per_kv = Hq / c.shape.n_kv_heads;
  for (const AttnBlock& b : c.blocks) {
    for (int h = 0; h < Hq; ++h) {
      const int g = h / per_kv;
      for (int64_t i = 0; i < b.n_q; ++i) {
        const int64_t row = b.q_start + i;
        std::vector<double> scores;
        for (int64_t j = 0; j < b.n_kv; ++j) {
          if (j > i + b.n_kv - b.n_q) break;  // causal, bottom-right aligned
          double s = 0.0;
          for (int d = 0; d < D; ++d) {
            s += q[row * c.ld_q + h * D + d] * k[(b.kv_start + j) * c.ld_kv + g * D + d];
          }
          scores.push_back(s * c.shape.scale);
        }
        double z = 0.0;
        for (double s : scores) z += std::exp(s);
        lse[row * Hq + h] = std::log(z);
        for (int d = 0; d < D; ++d) {
          double o = 0.0;
          for (size_t j = 0; j < scores.size(); ++j) {
            o += std::exp(scores[j]) / z * v[(b.kv_start + j) * c.ld_kv + g * D + d];
          }
          out[row * c.ld_out + h * D + d] = o;
        }
      }
    }
  }
}

TYPED_TEST(CpuKernelsForward, AttentionGroupedQueryCausalBlocks) {
  using T = TypeParam;
  using A = freqkv::Acc<T>;
  const AttentionCase c;
  const std::vector<double> q = this->representable(random_values(c.q_rows * c.ld_q, 16, -2, 2));
  const std::vector<double> k = this->representable(random_values(c.kv_rows * c.ld_kv, 17, -2, 2));
  const std::vector<double> v = this->representable(random_values(c.kv_rows * c.ld_kv, 18));
  const std::vector<double> out0 = this->representable(random_values(c.q_rows * c.ld_out, 19));
  std::vector<double> want = out0, want_lse(c.q_rows * c.shape.n_heads, 0.0);
  attention_reference(c, q, k, v, want, want_lse);

  auto& kern = *this->kernels;
  Buffer<T> dq = this->upload(q), dk = this->upload(k), dv = this->upload(v);
  Buffer<T> dout = this->upload(out0);
  Buffer<A> lse(kern, c.q_rows * c.shape.n_heads);
  kern.attention_forward(dout.data(), c.ld_out, lse.data(), dq.data(), c.ld_q, dk.data(), dv.data(),
                         c.ld_kv, c.blocks, c.shape);
  expect_all_close(this->download(dout), want, this->kTol, "attention out");
  std::vector<A> got_lse(want_lse.size());
  kern.copy_to_host(got_lse.data(), lse.data(), got_lse.size() * sizeof(A));
  expect_all_close(std::vector<double>(got_lse.begin(), got_lse.end()), want_lse, this->kTol,
                   "attention lse");
  // The first query of a causal block sees only itself: its output is its value row.
  for (int d = 0; d < 6; ++d) EXPECT_NEAR(want[d], v[d], 1e-15);

  auto run = [&](std::vector<AttnBlock> blocks, AttnShape shape) {
    kern.attention_forward(dout.data(), c.ld_out, lse.data(), dq.data(), c.ld_q, dk.data(),
                           dv.data(), c.ld_kv, blocks, shape);
  };
  EXPECT_THROW(run({{0, 4, 0, 3}}, c.shape), std::invalid_argument);                // n_kv < n_q
  EXPECT_THROW(run({{0, 4, 0, 4}, {3, 2, 4, 2}}, c.shape), std::invalid_argument);  // overlap
  EXPECT_THROW(run(c.blocks, AttnShape{4, 3, 6, 1.0}),
               std::invalid_argument);  // 3 does not divide 4
}

TYPED_TEST(CpuKernelsForward, SwigluIsSiluTimesUp) {
  const int64_t n = 29;
  std::vector<double> gate = random_values(n, 20, -6.0, 6.0);
  gate[0] = -1000.0;  // e^1000 overflows: silu must still be 0, not NaN
  gate[1] = 80.0;
  gate = this->representable(gate);
  const std::vector<double> up = this->representable(random_values(n, 21));
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
  Buffer<TypeParam> dg = this->upload(gate), du = this->upload(up), out(*this->kernels, n);
  this->kernels->swiglu_forward(out.data(), dg.data(), du.data(), n);
  const std::vector<double> got = this->download(out);
  expect_all_close(got, want, this->kTol, "swiglu");
  EXPECT_EQ(got[0], 0.0);
}

TYPED_TEST(CpuKernelsForward, CrossEntropyLossAndFusedGradient) {
  using T = TypeParam;
  using A = freqkv::Acc<T>;
  const int64_t rows = 4, vocab = 9, ld = 11;
  std::vector<double> logits = random_values(rows * ld, 22, -3.0, 3.0);
  for (int64_t c = 0; c < vocab; ++c) logits[2 * ld + c] += 1000.0;  // exp would overflow
  logits = this->representable(logits);
  const std::vector<int32_t> targets = {2, -1, 8, 0};
  const double grad_scale = 0.25;

  std::vector<double> want_loss(rows, 0.0), want_grad = logits;
  for (int64_t r = 0; r < rows; ++r) {
    double max_logit = -1e300;
    for (int64_t c = 0; c < vocab; ++c) max_logit = std::max(max_logit, logits[r * ld + c]);
    double z = 0.0;
    for (int64_t c = 0; c < vocab; ++c) z += std::exp(logits[r * ld + c] - max_logit);
    for (int64_t c = 0; c < vocab; ++c) {
      const double p = std::exp(logits[r * ld + c] - max_logit) / z;
      want_grad[r * ld + c] = targets[r] < 0 ? 0.0 : grad_scale * (p - (c == targets[r]));
    }
    if (targets[r] >= 0) want_loss[r] = max_logit + std::log(z) - logits[r * ld + targets[r]];
  }

  auto& k = *this->kernels;
  Buffer<int32_t> dtargets = freqkv::upload_array(k, targets);
  Buffer<A> losses(k, rows);
  std::vector<A> got_loss(rows);

  // grad_scale = 0: losses only, logits untouched.
  Buffer<T> dlogits = this->upload(logits);
  k.cross_entropy(losses.data(), dlogits.data(), ld, dtargets.data(), rows, vocab, 0.0);
  k.copy_to_host(got_loss.data(), losses.data(), rows * sizeof(A));
  expect_all_close(std::vector<double>(got_loss.begin(), got_loss.end()), want_loss, this->kTol,
                   "cross-entropy losses");
  EXPECT_EQ(this->download(dlogits), logits);

  k.cross_entropy(losses.data(), dlogits.data(), ld, dtargets.data(), rows, vocab, grad_scale);
  k.copy_to_host(got_loss.data(), losses.data(), rows * sizeof(A));
  expect_all_close(std::vector<double>(got_loss.begin(), got_loss.end()), want_loss, this->kTol,
                   "cross-entropy losses with gradient");
  expect_all_close(this->download(dlogits), want_grad, this->kTol, "cross-entropy gradient");

  Buffer<int32_t> bad = freqkv::upload_array(k, std::vector<int32_t>{9});
  EXPECT_THROW(k.cross_entropy(losses.data(), dlogits.data(), ld, bad.data(), 1, vocab, 0.0),
               std::out_of_range);
}

// DCT along the rows of one channel, truncation, inverse DCT, rescale: cosine sums by definition.
std::vector<double> compress_column_reference(const std::vector<double>& x, int64_t L) {
  const int64_t N = static_cast<int64_t>(x.size());
  std::vector<double> y(L, 0.0);
  for (int64_t f = 0; f < L; ++f) {
    double coefficient = 0.0;
    for (int64_t n = 0; n < N; ++n)
      coefficient += x[n] * std::cos(kPi * (2 * n + 1) * f / (2.0 * N));
    coefficient *= f == 0 ? std::sqrt(1.0 / N) : std::sqrt(2.0 / N);
    const double a_out = f == 0 ? std::sqrt(1.0 / L) : std::sqrt(2.0 / L);
    for (int64_t l = 0; l < L; ++l)
      y[l] += a_out * coefficient * std::cos(kPi * (2 * l + 1) * f / (2.0 * L));
  }
  for (double& v : y) v *= std::sqrt(static_cast<double>(L) / N);
  return y;
}

TYPED_TEST(CpuKernelsForward, FreqkvCompressMatchesDctDefinition) {
  for (const auto& [N, L] : std::vector<std::pair<int64_t, int64_t>>{{9, 4}, {12, 6}, {5, 5}}) {
    const int64_t channels = 5, ld_in = 7, ld_out = 6;
    const std::vector<double> in = this->representable(random_values(N * ld_in, 23));
    const std::vector<double> out0 = this->representable(random_values(L * ld_out, 24));
    std::vector<double> want = out0;
    for (int64_t c = 0; c < channels; ++c) {
      std::vector<double> column(N);
      for (int64_t n = 0; n < N; ++n) column[n] = in[n * ld_in + c];
      const std::vector<double> y = compress_column_reference(column, L);
      for (int64_t l = 0; l < L; ++l) want[l * ld_out + c] = y[l];
    }
    Buffer<TypeParam> din = this->upload(in), dout = this->upload(out0);
    // Twice: the second call uses the cached matrix.
    for (int repeat = 0; repeat < 2; ++repeat) {
      this->kernels->freqkv_compress(dout.data(), ld_out, din.data(), ld_in, N, L, channels);
      expect_all_close(this->download(dout), want, 4 * this->kTol,
                       "compress " + std::to_string(N) + " -> " + std::to_string(L));
    }
  }
}

}  // namespace
