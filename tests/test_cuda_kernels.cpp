// Every method of the CUDA backend (CudaKernels, bf16 storage, fp32 arithmetic) against the CPU
// backend in fp32 (CpuKernels<float>), on random inputs rounded to bf16 first so that both see
// exactly the same numbers.
//
// Tolerance, after flash-attention's tests: the largest error of the bf16 GPU result against the
// fp32 reference may be at most kBf16ErrorFactor times the largest error that rounding the
// reference itself to bf16 makes. That baseline is the error of a perfect bf16 kernel, so the
// bound adapts to each output's magnitude and leaves room only for the kernel's own fp32
// arithmetic and intermediate roundings. fp32 outputs (log-sum-exp, 1/rms, losses, AdamW state)
// get relative bounds; copies must be exact.
//
// The tests need a CUDA device and skip themselves (GTEST_SKIP) without one; ctest label: gpu.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/dtype.h"
#include "kernels/kernels.h"

namespace {

using freqkv::AttnBlock;
using freqkv::AttnShape;
using freqkv::bf16;
using freqkv::Buffer;
using freqkv::Kernels;

constexpr double kBf16ErrorFactor = 3.0;

float round_bf16(float x) { return bf16::to_float(bf16::from_float(x)); }

// Uniform values in [lo, hi), rounded to bf16.
std::vector<float> random_bf16_values(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(lo, hi);
  std::vector<float> values(n);
  for (float& v : values) v = round_bf16(uniform(rng));
  return values;
}

std::vector<float> round_all_bf16(std::vector<float> values) {
  for (float& v : values) v = round_bf16(v);
  return values;
}

// max |got - reference| <= kBf16ErrorFactor * max |bf16(reference) - reference| (+ a floor of
// 1e-6 of the largest reference value, for outputs that bf16 represents exactly).
void expect_bf16_close(const std::vector<float>& got, const std::vector<float>& reference,
                       const std::string& what, double factor = kBf16ErrorFactor) {
  ASSERT_EQ(got.size(), reference.size()) << what;
  double baseline = 0.0;
  double largest = 0.0;
  double worst = 0.0;
  size_t worst_index = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double ref = reference[i];
    baseline = std::max(baseline, std::abs(static_cast<double>(round_bf16(reference[i])) - ref));
    largest = std::max(largest, std::abs(ref));
    const double error = std::isnan(got[i]) ? std::numeric_limits<double>::infinity()
                                            : std::abs(static_cast<double>(got[i]) - ref);
    if (error > worst) {
      worst = error;
      worst_index = i;
    }
  }
  const double bound = factor * baseline + 1e-6 * largest;
  EXPECT_LE(worst, bound) << what << ": largest error " << worst << " at index " << worst_index
                          << " (gpu " << got[worst_index] << ", fp32 reference "
                          << reference[worst_index] << "); bf16 rounding of the reference errs "
                          << "by up to " << baseline << ", allowed " << factor << "x that";
}

// |got - reference| <= tolerance (1 + |reference|) element by element, naming the first misses.
void expect_close(const std::vector<float>& got, const std::vector<float>& reference,
                  double tolerance, const std::string& what) {
  ASSERT_EQ(got.size(), reference.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = tolerance * (1.0 + std::abs(static_cast<double>(reference[i])));
    if (!(std::abs(static_cast<double>(got[i]) - reference[i]) <= bound) && reported++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", reference " << reference[i]
                    << " (tolerance " << bound << ")";
    }
  }
}

// |got - reference| <= tolerance |reference|: for values that should agree to the last bits.
void expect_relative_close(const std::vector<float>& got, const std::vector<float>& reference,
                           double tolerance, const std::string& what) {
  ASSERT_EQ(got.size(), reference.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = tolerance * std::abs(static_cast<double>(reference[i]));
    if (!(std::abs(static_cast<double>(got[i]) - reference[i]) <= bound) && reported++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", reference " << reference[i]
                    << " (tolerance " << bound << ")";
    }
  }
}

void expect_identical(const std::vector<float>& got, const std::vector<float>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && reported++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: " << got[i] << " != " << want[i];
    }
  }
}

// Sets an environment variable for the rest of a scope and puts it back as it was (set to its
// old value, or unset), however the scope ends.
class ScopedEnvironmentVariable {
 public:
  explicit ScopedEnvironmentVariable(const char* name) : name_(name) {
    const char* saved = std::getenv(name);
    was_set_ = saved != nullptr;
    if (was_set_) saved_ = saved;
  }
  ~ScopedEnvironmentVariable() {
    if (was_set_) {
      setenv(name_, saved_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnvironmentVariable(const ScopedEnvironmentVariable&) = delete;
  ScopedEnvironmentVariable& operator=(const ScopedEnvironmentVariable&) = delete;

  int set(const char* value) const { return setenv(name_, value, 1); }
  int unset() const { return unsetenv(name_); }

 private:
  const char* name_;
  bool was_set_ = false;
  std::string saved_;
};

class CudaKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!freqkv::cuda_device_available()) {
      GTEST_SKIP() << "no CUDA device: the CUDA backend is tested on a machine with a GPU";
    }
    gpu_ = freqkv::make_cuda_kernels(0);
  }

  // The same values as a bf16 buffer on the GPU and as a float buffer on the CPU.
  Buffer<bf16> on_gpu(const std::vector<float>& values) {
    Buffer<bf16> buffer(*gpu_, static_cast<int64_t>(values.size()));
    gpu_->upload(buffer.data(), values.data(), buffer.size());
    return buffer;
  }
  Buffer<float> on_cpu(const std::vector<float>& values) {
    Buffer<float> buffer(*cpu_, static_cast<int64_t>(values.size()));
    cpu_->upload(buffer.data(), values.data(), buffer.size());
    return buffer;
  }
  // Raw fp32 arrays (statistics, optimiser state) on the GPU.
  Buffer<float> floats_on_gpu(const std::vector<float>& values) {
    return freqkv::upload_array(*gpu_, values);
  }
  template <typename U>
  Buffer<U> indices_on_gpu(const std::vector<U>& values) {
    return freqkv::upload_array(*gpu_, values);
  }
  template <typename U>
  Buffer<U> indices_on_cpu(const std::vector<U>& values) {
    return freqkv::upload_array(*cpu_, values);
  }

  std::vector<float> read(const Buffer<bf16>& buffer) {
    std::vector<float> host(static_cast<size_t>(buffer.size()));
    gpu_->download(host.data(), buffer.data(), buffer.size());
    return host;
  }
  std::vector<float> read_gpu_floats(const Buffer<float>& buffer) {
    std::vector<float> host(static_cast<size_t>(buffer.size()));
    gpu_->copy_to_host(host.data(), buffer.data(), host.size() * sizeof(float));
    return host;
  }
  static std::vector<float> read(const Buffer<float>& cpu_buffer) {
    return std::vector<float>(cpu_buffer.data(), cpu_buffer.data() + cpu_buffer.size());
  }

  std::unique_ptr<Kernels<bf16>> gpu_;
  std::unique_ptr<Kernels<float>> cpu_ = freqkv::make_cpu_kernels<float>();
};

// ---- memory and conversions -------------------------------------------------------------------

TEST_F(CudaKernelsTest, NameMemoryAndCopies) {
  EXPECT_EQ(gpu_->name(), "cuda-bf16");
  Buffer<bf16> a(*gpu_, 37);
  EXPECT_EQ(read(a), std::vector<float>(37, 0.0f)) << "allocations are zero-filled";

  // Zero bytes still give distinct live pointers.
  void* p0 = gpu_->allocate_bytes(0);
  void* p1 = gpu_->allocate_bytes(0);
  EXPECT_NE(p0, nullptr);
  EXPECT_NE(p0, p1);
  gpu_->free_bytes(p0);
  gpu_->free_bytes(p1);

  const std::vector<float> values = random_bf16_values(100, 1);
  Buffer<bf16> b = on_gpu(values);
  std::vector<bf16> raw(100);
  gpu_->copy_to_host(raw.data(), b.data(), 100 * sizeof(bf16));
  for (size_t i = 0; i < raw.size(); ++i) ASSERT_EQ(static_cast<float>(raw[i]), values[i]) << i;
  raw[5] = bf16(42.0f);
  gpu_->copy_to_device(b.data(), raw.data(), 100 * sizeof(bf16));
  EXPECT_EQ(read(b)[5], 42.0f);

  // copy_on_device has memmove semantics: overlapping ranges, both directions.
  std::vector<float> want = read(b);
  gpu_->copy_on_device(b.data() + 20, b.data(), 60 * sizeof(bf16));
  std::memmove(want.data() + 20, want.data(), 60 * sizeof(float));
  expect_identical(read(b), want, "copy_on_device forward overlap");
  gpu_->copy_on_device(b.data(), b.data() + 30, 50 * sizeof(bf16));
  std::memmove(want.data(), want.data() + 30, 50 * sizeof(float));
  expect_identical(read(b), want, "copy_on_device backward overlap");
  gpu_->copy_on_device(a.data(), b.data(), 37 * sizeof(bf16));
  expect_identical(read(a), std::vector<float>(want.begin(), want.begin() + 37),
                   "copy_on_device disjoint");

  gpu_->fill_zero(b.data() + 10, 5 * sizeof(bf16));
  std::fill(want.begin() + 10, want.begin() + 15, 0.0f);
  expect_identical(read(b), want, "fill_zero");
  gpu_->synchronize();
}

TEST_F(CudaKernelsTest, UploadAndDownloadRoundToNearestEven) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> host = {1.0f + 0x1p-8f,             // a tie: rounds to even, 1
                                   1.0f + 3 * 0x1p-8f,         // a tie: rounds to even, 1 + 2^-6
                                   1.0f + 0x1p-8f + 0x1p-20f,  // above the tie: 1 + 2^-7
                                   -2.5f,
                                   3.0e38f,
                                   -inf,
                                   inf,
                                   -0.0f,
                                   1e-40f};
  Buffer<bf16> b(*gpu_, static_cast<int64_t>(host.size()));
  gpu_->upload(b.data(), host.data(), b.size());
  std::vector<bf16> raw(host.size());
  gpu_->copy_to_host(raw.data(), b.data(), raw.size() * sizeof(bf16));
  for (size_t i = 0; i < host.size(); ++i) {
    EXPECT_EQ(raw[i].bits, bf16::from_float(host[i])) << "upload(float) of " << host[i];
  }
  EXPECT_EQ(static_cast<float>(raw[0]), 1.0f);
  EXPECT_EQ(static_cast<float>(raw[1]), 1.0f + 0x1p-6f);
  EXPECT_EQ(static_cast<float>(raw[2]), 1.0f + 0x1p-7f);

  // NaN stays NaN.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  gpu_->upload(b.data(), &nan, 1);
  std::vector<float> back(host.size());
  gpu_->download(back.data(), b.data(), b.size());
  EXPECT_TRUE(std::isnan(back[0]));

  // Doubles round once: 1 + 2^-8 + 2^-30 is just above a tie (through float it would be the tie
  // itself, and round down to 1).
  const std::vector<double> host_d = {1.0 + 0x1p-8 + 0x1p-30, 1.0 + 0x1p-8, -1.0 - 0x1p-8 - 0x1p-40,
                                      1e39, 0.1};
  Buffer<bf16> d(*gpu_, static_cast<int64_t>(host_d.size()));
  gpu_->upload(d.data(), host_d.data(), d.size());
  std::vector<double> back_d(host_d.size());
  gpu_->download(back_d.data(), d.data(), d.size());
  EXPECT_EQ(back_d[0], 1.0 + 0x1p-7);
  EXPECT_EQ(back_d[1], 1.0);
  EXPECT_EQ(back_d[2], -1.0 - 0x1p-7);
  EXPECT_TRUE(std::isinf(back_d[3]));
  EXPECT_EQ(back_d[4], static_cast<double>(round_bf16(0.1f)));

  // Longer than the staging buffer (4M values): chunked transfers keep every value in place.
  const size_t n = (size_t{1} << 22) + 1001;
  std::vector<float> big(n);
  for (size_t i = 0; i < n; ++i) big[i] = static_cast<float>(i % 251) - 125.0f;
  Buffer<bf16> large = on_gpu(big);
  expect_identical(read(large), big, "chunked upload/download");
}

// ---- dense algebra ------------------------------------------------------------------------------

TEST_F(CudaKernelsTest, GemmEveryTransposeWithWideStrides) {
  struct Size {
    int64_t M, N, K;
  };
  for (const Size size : {Size{37, 45, 70}, Size{128, 256, 512}, Size{1, 300, 17}}) {
    const double alpha = 0.7;
    const double beta = -1.3;
    for (bool trans_a : {false, true}) {
      for (bool trans_b : {false, true}) {
        const int64_t M = size.M, N = size.N, K = size.K;
        const int64_t a_rows = trans_a ? K : M, lda = (trans_a ? M : K) + 3;
        const int64_t b_rows = trans_b ? N : K, ldb = (trans_b ? K : N) + 5;
        const int64_t ldc = N + 2;
        const std::vector<float> A = random_bf16_values(a_rows * lda, 2);
        const std::vector<float> B = random_bf16_values(b_rows * ldb, 3);
        const std::vector<float> C0 = random_bf16_values(M * ldc, 4);
        Buffer<bf16> ga = on_gpu(A), gb = on_gpu(B), gc = on_gpu(C0);
        Buffer<float> ca = on_cpu(A), cb = on_cpu(B), cc = on_cpu(C0);
        gpu_->gemm(trans_a, trans_b, M, N, K, alpha, ga.data(), lda, gb.data(), ldb, beta,
                   gc.data(), ldc);
        cpu_->gemm(trans_a, trans_b, M, N, K, alpha, ca.data(), lda, cb.data(), ldb, beta,
                   cc.data(), ldc);
        // The padding columns of C must keep their values: they are compared too.
        expect_bf16_close(read(gc), read(cc),
                          "gemm " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                              std::to_string(K) + " trans_a=" + std::to_string(trans_a) +
                              " trans_b=" + std::to_string(trans_b));
      }
    }
  }
}

TEST_F(CudaKernelsTest, GemmWithEmptySizesAndBadStrides) {
  Buffer<bf16> c = on_gpu({1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f});
  Buffer<bf16> dummy(*gpu_, 4);
  // K = 0: C = beta C.
  gpu_->gemm(false, false, 2, 3, 0, 1.0, dummy.data(), 1, dummy.data(), 3, 0.5, c.data(), 3);
  EXPECT_EQ(read(c), (std::vector<float>{0.5f, 1.0f, 1.5f, 2.0f, 2.5f, 3.0f}));
  // beta = 0 overwrites, even NaN.
  Buffer<bf16> c_nan = on_gpu({1.0f, 2.0f, std::numeric_limits<float>::quiet_NaN(), 4.0f});
  gpu_->gemm(true, true, 2, 2, 0, 1.0, dummy.data(), 2, dummy.data(), 1, 0.0, c_nan.data(), 2);
  EXPECT_EQ(read(c_nan), std::vector<float>(4, 0.0f));
  // M = 0 or N = 0: C untouched.
  gpu_->gemm(false, false, 0, 3, 2, 1.0, dummy.data(), 2, dummy.data(), 3, 0.0, c.data(), 3);
  gpu_->gemm(false, false, 2, 0, 2, 1.0, dummy.data(), 2, dummy.data(), 1, 0.0, c.data(), 1);
  EXPECT_EQ(read(c), (std::vector<float>{0.5f, 1.0f, 1.5f, 2.0f, 2.5f, 3.0f}));
  EXPECT_THROW(
      gpu_->gemm(false, false, 2, 3, 2, 1.0, dummy.data(), 1, dummy.data(), 3, 0.0, c.data(), 3),
      std::invalid_argument);
  EXPECT_THROW(
      gpu_->gemm(false, false, -1, 3, 2, 1.0, dummy.data(), 2, dummy.data(), 3, 0.0, c.data(), 3),
      std::invalid_argument);
}

// cuBLASLt (the default) and cublasGemmEx against the CPU on every transpose combination, with odd
// sizes, tight and padded leading dimensions, beta = 0 over NaN and beta = 1, and pointers offset
// by one element (2-byte aligned: the algorithm cache must not reuse one chosen for aligned
// pointers). Aligned problems must run on cuBLASLt, not on the fallback.
TEST_F(CudaKernelsTest, GemmLtAndGemmExAgreeWithCpuOnEveryLayout) {
  struct Size {
    int64_t M, N, K;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  int64_t fallbacks = 0;
  int64_t cases = 0;
  for (const Size size :
       {Size{64, 128, 256}, Size{37, 45, 70}, Size{1, 300, 17}, Size{129, 7, 33}}) {
    const int64_t M = size.M, N = size.N, K = size.K;
    const bool aligned_size = M % 8 == 0 && N % 8 == 0 && K % 8 == 0;
    for (bool trans_a : {false, true}) {
      for (bool trans_b : {false, true}) {
        for (int64_t pad : {int64_t{0}, int64_t{3}, int64_t{8}}) {
          for (double beta : {0.0, 1.0}) {
            for (int64_t offset : {int64_t{0}, int64_t{1}}) {
              const int64_t a_rows = trans_a ? K : M, lda = (trans_a ? M : K) + pad;
              const int64_t b_rows = trans_b ? N : K, ldb = (trans_b ? K : N) + pad;
              const int64_t ldc = N + pad;
              const std::string what =
                  "gemm " + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
                  " trans_a=" + std::to_string(trans_a) + " trans_b=" + std::to_string(trans_b) +
                  " pad=" + std::to_string(pad) + " beta=" + std::to_string(beta) +
                  " offset=" + std::to_string(offset);
              // `offset` leading elements that the GEMM does not see.
              const std::vector<float> A = random_bf16_values(offset + a_rows * lda, 11);
              const std::vector<float> B = random_bf16_values(offset + b_rows * ldb, 12);
              std::vector<float> C0 = random_bf16_values(offset + M * ldc, 13);
              std::vector<float> C0_cpu = C0;
              if (beta == 0.0) {
                // NaN inside C (not in its padding columns): beta = 0 must overwrite it.
                for (int64_t r = 0; r < M; ++r) {
                  for (int64_t c = 0; c < N; ++c) {
                    C0[offset + r * ldc + c] = nan;
                    C0_cpu[offset + r * ldc + c] = 0.0f;
                  }
                }
              }
              Buffer<float> ca = on_cpu(A), cb = on_cpu(B), cc = on_cpu(C0_cpu);
              cpu_->gemm(trans_a, trans_b, M, N, K, 0.7, ca.data() + offset, lda,
                         cb.data() + offset, ldb, beta, cc.data() + offset, ldc);
              const std::vector<float> reference = read(cc);
              Buffer<bf16> ga = on_gpu(A), gb = on_gpu(B);
              for (const freqkv::CudaGemm impl : {freqkv::CudaGemm::Lt, freqkv::CudaGemm::GemmEx}) {
                const bool lt = impl == freqkv::CudaGemm::Lt;
                freqkv::set_cuda_gemm(*gpu_, impl);
                Buffer<bf16> gc = on_gpu(C0);
                const freqkv::CudaGemmCounts before = freqkv::cuda_gemm_counts(*gpu_);
                gpu_->gemm(trans_a, trans_b, M, N, K, 0.7, ga.data() + offset, lda,
                           gb.data() + offset, ldb, beta, gc.data() + offset, ldc);
                const freqkv::CudaGemmCounts after = freqkv::cuda_gemm_counts(*gpu_);
                expect_bf16_close(read(gc), reference, what + (lt ? " (lt)" : " (gemmex)"));
                EXPECT_EQ(after.lt_calls + after.gemmex_calls,
                          before.lt_calls + before.gemmex_calls + 1)
                    << what;
                if (!lt) {
                  EXPECT_EQ(after.gemmex_calls, before.gemmex_calls + 1) << what;
                  EXPECT_EQ(after.heuristic_calls, before.heuristic_calls) << what;
                  continue;
                }
                ++cases;
                if (after.lt_calls == before.lt_calls) ++fallbacks;
                if (aligned_size && offset == 0 && pad != 3) {
                  EXPECT_EQ(after.lt_calls, before.lt_calls + 1)
                      << what << ": an aligned problem fell back to cublasGemmEx";
                }
              }
            }
          }
        }
      }
    }
  }
  std::cout << "[ info     ] " << fallbacks << " of " << cases
            << " problems fell back from cuBLASLt to cublasGemmEx" << std::endl;
}

// The heuristic runs once per (transposes, sizes, leading dimensions, beta == 0, pointer
// alignment): repeated shapes, as every layer of every step makes, reuse the cached algorithm.
TEST_F(CudaKernelsTest, GemmLtCachesTheAlgorithmPerShapeAndAlignment) {
  freqkv::set_cuda_gemm(*gpu_, freqkv::CudaGemm::Lt);
  const int64_t M = 64, N = 96, K = 128;
  // Room for lda = K + 8 below, and for A offset by one element.
  Buffer<bf16> a = on_gpu(random_bf16_values(M * (K + 8) + 8, 21));
  Buffer<bf16> b = on_gpu(random_bf16_values(K * N + 8, 22));
  Buffer<bf16> c(*gpu_, M * N + 8), c2(*gpu_, M * N + 8);
  const auto heuristic_calls = [&] { return freqkv::cuda_gemm_heuristic_calls(*gpu_); };
  const int64_t start = heuristic_calls();
  const int64_t lt_start = freqkv::cuda_gemm_counts(*gpu_).lt_calls;

  gpu_->gemm(false, true, M, N, K, 1.0, a.data(), K, b.data(), K, 0.0, c.data(), N);
  EXPECT_EQ(heuristic_calls(), start + 1) << "a new shape runs the heuristic";
  gpu_->gemm(false, true, M, N, K, 1.0, a.data(), K, b.data(), K, 0.0, c2.data(), N);
  gpu_->gemm(false, true, M, N, K, 0.5, a.data(), K, b.data(), K, 0.0, c.data(), N);
  EXPECT_EQ(heuristic_calls(), start + 1)
      << "the same shape (another C of the same alignment, another alpha) reuses the algorithm";
  gpu_->gemm(false, true, M, N, K, 1.0, a.data(), K, b.data(), K, 1.0, c.data(), N);
  EXPECT_EQ(heuristic_calls(), start + 2) << "beta = 1 is another cache entry than beta = 0";
  gpu_->gemm(false, true, M, N, K, 1.0, a.data() + 1, K, b.data(), K, 1.0, c.data(), N);
  EXPECT_EQ(heuristic_calls(), start + 3) << "A offset by one element is another alignment";
  gpu_->gemm(false, true, M, N, K, 1.0, a.data() + 1, K, b.data(), K, 1.0, c.data(), N);
  EXPECT_EQ(heuristic_calls(), start + 3);
  gpu_->gemm(true, true, M, N, K, 1.0, a.data(), M, b.data(), K, 0.0, c.data(), N);
  gpu_->gemm(false, false, M, N, K, 1.0, a.data(), K, b.data(), N, 0.0, c.data(), N);
  gpu_->gemm(false, true, M, N, K, 1.0, a.data(), K + 8, b.data(), K, 0.0, c.data(), N);
  EXPECT_EQ(heuristic_calls(), start + 6) << "transposes and leading dimensions are in the key";

  // Ten "steps" over the shapes seen: no heuristic call at all.
  for (int step = 0; step < 10; ++step) {
    gpu_->gemm(false, true, M, N, K, 1.0, a.data(), K, b.data(), K, 0.0, c.data(), N);
    gpu_->gemm(false, true, M, N, K, 1.0, a.data(), K, b.data(), K, 1.0, c.data(), N);
    gpu_->gemm(true, true, M, N, K, 1.0, a.data(), M, b.data(), K, 0.0, c.data(), N);
    gpu_->gemm(false, false, M, N, K, 1.0, a.data(), K, b.data(), N, 0.0, c.data(), N);
  }
  EXPECT_EQ(heuristic_calls(), start + 6);
  EXPECT_GE(freqkv::cuda_gemm_counts(*gpu_).lt_calls, lt_start + 40)
      << "the aligned problems run on cuBLASLt";
  gpu_->synchronize();

  // K = 0 and empty GEMMs are not GEMMs for either library.
  const freqkv::CudaGemmCounts before = freqkv::cuda_gemm_counts(*gpu_);
  gpu_->gemm(false, false, M, N, 0, 1.0, a.data(), 1, b.data(), N, 0.0, c.data(), N);
  gpu_->gemm(false, false, 0, N, K, 1.0, a.data(), K, b.data(), N, 0.0, c.data(), N);
  const freqkv::CudaGemmCounts after = freqkv::cuda_gemm_counts(*gpu_);
  EXPECT_EQ(after.heuristic_calls, before.heuristic_calls);
  EXPECT_EQ(after.lt_calls, before.lt_calls);
  EXPECT_EQ(after.gemmex_calls, before.gemmex_calls);
}

TEST_F(CudaKernelsTest, GemmSelectionByEnvironment) {
  // make_cuda_kernels reads FREQKV_GEMM; a bad value is an error naming it.
  const ScopedEnvironmentVariable gemm_choice("FREQKV_GEMM");
  ASSERT_EQ(gemm_choice.set("cutlass"), 0);
  try {
    (void)freqkv::make_cuda_kernels(0);
    ADD_FAILURE() << "FREQKV_GEMM = cutlass was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("FREQKV_GEMM"), std::string::npos) << error.what();
  }
  const std::vector<float> a_values = random_bf16_values(32 * 64, 31);
  const std::vector<float> b_values = random_bf16_values(64 * 48, 32);
  const auto counts_with_environment = [&](const char* choice) {
    if (choice != nullptr) {
      EXPECT_EQ(gemm_choice.set(choice), 0);
    } else {
      EXPECT_EQ(gemm_choice.unset(), 0);
    }
    std::unique_ptr<Kernels<bf16>> kernels = freqkv::make_cuda_kernels(0);
    Buffer<bf16> a(*kernels, 32 * 64), b(*kernels, 64 * 48), c(*kernels, 32 * 48);
    kernels->upload(a.data(), a_values.data(), a.size());
    kernels->upload(b.data(), b_values.data(), b.size());
    kernels->gemm(false, false, 32, 48, 64, 1.0, a.data(), 64, b.data(), 48, 0.0, c.data(), 48);
    kernels->synchronize();
    return freqkv::cuda_gemm_counts(*kernels);
  };
  const freqkv::CudaGemmCounts gemmex = counts_with_environment("gemmex");
  EXPECT_EQ(gemmex.gemmex_calls, 1);
  EXPECT_EQ(gemmex.lt_calls, 0);
  EXPECT_EQ(gemmex.heuristic_calls, 0);
  for (const char* choice : {"lt", "", static_cast<const char*>(nullptr)}) {
    const freqkv::CudaGemmCounts lt = counts_with_environment(choice);
    const std::string name = choice == nullptr ? "unset" : "'" + std::string(choice) + "'";
    EXPECT_EQ(lt.lt_calls, 1) << "FREQKV_GEMM " << name;
    EXPECT_EQ(lt.gemmex_calls, 0) << "FREQKV_GEMM " << name;
    EXPECT_EQ(lt.heuristic_calls, 1) << "FREQKV_GEMM " << name;
  }
}

TEST_F(CudaKernelsTest, VectorOperationsAndSumOfSquares) {
  for (int64_t n : {int64_t{1001}, (int64_t{1} << 20) + 7}) {
    const std::vector<float> a = random_bf16_values(n, 5);
    const std::vector<float> b = random_bf16_values(n, 6);
    Buffer<bf16> ga = on_gpu(a), gb = on_gpu(b), gout(*gpu_, n);
    Buffer<float> ca = on_cpu(a), cb = on_cpu(b), cout(*cpu_, n);

    gpu_->add(gout.data(), ga.data(), gb.data(), n);
    cpu_->add(cout.data(), ca.data(), cb.data(), n);
    expect_bf16_close(read(gout), read(cout), "add");

    gpu_->axpy(ga.data(), -0.375, gb.data(), n);
    cpu_->axpy(ca.data(), -0.375, cb.data(), n);
    expect_bf16_close(read(ga), read(ca), "axpy");

    gpu_->scale(gb.data(), 2.5, n);
    cpu_->scale(cb.data(), 2.5, n);
    expect_bf16_close(read(gb), read(cb), "scale");

    // The sum of squares of the GPU's own bf16 values, in double: only the order differs.
    const std::vector<float> values = read(gb);
    double want = 0.0;
    for (float x : values) want += static_cast<double>(x) * x;
    EXPECT_NEAR(gpu_->sum_squares(gb.data(), n), want, 1e-12 * want) << "n = " << n;
  }
  Buffer<bf16> empty(*gpu_, 1);
  EXPECT_EQ(gpu_->sum_squares(empty.data(), 0), 0.0);
}

// ---- rows -------------------------------------------------------------------------------------

TEST_F(CudaKernelsTest, GatherAndScatterAddRows) {
  const int64_t src_rows = 50, width = 70, ld_src = 75, n_rows = 64, ld_dst = 73;
  // FreqKV's layout in miniature: sink rows 0..3 gathered by every chunk, some rows unused (-1).
  std::vector<int64_t> map(n_rows);
  for (int64_t r = 0; r < n_rows; ++r) map[r] = r % 16 < 4 ? r % 4 : (r * 7) % src_rows;
  map[9] = -1;
  map[40] = -1;
  const std::vector<float> src = random_bf16_values(src_rows * ld_src, 7);
  const std::vector<float> dst0 = random_bf16_values(n_rows * ld_dst, 8);
  Buffer<int64_t> gmap = indices_on_gpu(map), cmap = indices_on_cpu(map);

  Buffer<bf16> gsrc = on_gpu(src), gdst = on_gpu(dst0);
  Buffer<float> csrc = on_cpu(src), cdst = on_cpu(dst0);
  gpu_->gather_rows(gdst.data(), ld_dst, gsrc.data(), ld_src, gmap.data(), n_rows, width);
  cpu_->gather_rows(cdst.data(), ld_dst, csrc.data(), ld_src, cmap.data(), n_rows, width);
  expect_identical(read(gdst), read(cdst), "gather_rows");

  // The adjoint: many rows add into the sink rows.
  const std::vector<float> ddst = random_bf16_values(n_rows * ld_dst, 9);
  const std::vector<float> dsrc0 = random_bf16_values(src_rows * ld_src, 10);
  Buffer<bf16> gddst = on_gpu(ddst), gdsrc = on_gpu(dsrc0);
  Buffer<float> cddst = on_cpu(ddst), cdsrc = on_cpu(dsrc0);
  gpu_->scatter_add_rows(gdsrc.data(), ld_src, gddst.data(), ld_dst, gmap.data(), n_rows, width);
  cpu_->scatter_add_rows(cdsrc.data(), ld_src, cddst.data(), ld_dst, cmap.data(), n_rows, width);
  const std::vector<float> first = read(gdsrc);
  expect_bf16_close(first, read(cdsrc), "scatter_add_rows");

  // Deterministic: the same inputs give the same bits.
  Buffer<bf16> again = on_gpu(dsrc0);
  gpu_->scatter_add_rows(again.data(), ld_src, gddst.data(), ld_dst, gmap.data(), n_rows, width);
  expect_identical(read(again), first, "scatter_add_rows run twice");
}

TEST_F(CudaKernelsTest, EmbeddingForwardAndBackward) {
  const int64_t vocab = 97, dim = 40, n_tokens = 300;
  std::vector<int32_t> tokens(n_tokens);
  std::mt19937 rng(11);
  for (int64_t n = 0; n < n_tokens; ++n) {
    // Token 5 fills two thirds of the batch: its gradient row sums 200 rows.
    tokens[n] = n % 3 != 0 ? 5 : static_cast<int32_t>(rng() % vocab);
  }
  tokens[7] = static_cast<int32_t>(vocab - 1);
  const std::vector<float> table = random_bf16_values(vocab * dim, 12);
  Buffer<int32_t> gtokens = indices_on_gpu(tokens), ctokens = indices_on_cpu(tokens);
  Buffer<bf16> gtable = on_gpu(table), gout(*gpu_, n_tokens * dim);
  Buffer<float> ctable = on_cpu(table), cout(*cpu_, n_tokens * dim);
  gpu_->embedding_forward(gout.data(), gtable.data(), gtokens.data(), n_tokens, dim);
  cpu_->embedding_forward(cout.data(), ctable.data(), ctokens.data(), n_tokens, dim);
  expect_identical(read(gout), read(cout), "embedding_forward");

  const std::vector<float> dout = random_bf16_values(n_tokens * dim, 13);
  Buffer<bf16> gdout = on_gpu(dout);
  Buffer<float> cdout = on_cpu(dout);
  gpu_->embedding_backward(gtable.data(), gdout.data(), gtokens.data(), n_tokens, dim);
  cpu_->embedding_backward(ctable.data(), cdout.data(), ctokens.data(), n_tokens, dim);
  expect_bf16_close(read(gtable), read(ctable), "embedding_backward");
}

TEST_F(CudaKernelsTest, NegativeTokensAndTargetsAreReportedAtTheNextWait) {
  Buffer<bf16> table = on_gpu(random_bf16_values(8 * 4, 14)), out(*gpu_, 3 * 4);
  Buffer<int32_t> tokens = indices_on_gpu(std::vector<int32_t>{1, -3, 2});
  gpu_->embedding_forward(out.data(), table.data(), tokens.data(), 3, 4);
  try {
    gpu_->synchronize();
    ADD_FAILURE() << "a negative token was not reported";
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("embedding_forward: token 1 has negative id -3"),
              std::string::npos)
        << e.what();
  }
  gpu_->synchronize();  // reported once, then cleared

  Buffer<bf16> logits = on_gpu(random_bf16_values(2 * 10, 15));
  Buffer<int32_t> targets = indices_on_gpu(std::vector<int32_t>{3, 10});
  Buffer<float> losses(*gpu_, 2);
  gpu_->cross_entropy(losses.data(), logits.data(), 10, targets.data(), 2, 10, 1.0);
  try {
    gpu_->synchronize();
    ADD_FAILURE() << "a target outside the vocabulary was not reported";
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("cross_entropy: target of row 1 is 10"), std::string::npos)
        << e.what();
  }
  EXPECT_NO_THROW(gpu_->synchronize());
}

// ---- RMSNorm, RoPE, SwiGLU --------------------------------------------------------------------

TEST_F(CudaKernelsTest, RmsNormForwardAndBackward) {
  for (int64_t dim : {int64_t{64}, int64_t{1000}}) {
    const int64_t rows = 33;
    const double eps = 1e-5;
    const std::vector<float> x = random_bf16_values(rows * dim, 16, -2.0f, 2.0f);
    const std::vector<float> w = random_bf16_values(dim, 17, 0.5f, 1.5f);
    Buffer<bf16> gx = on_gpu(x), gw = on_gpu(w), gout(*gpu_, rows * dim);
    Buffer<float> cx = on_cpu(x), cw = on_cpu(w), cout(*cpu_, rows * dim), crstd(*cpu_, rows);
    Buffer<float> grstd(*gpu_, rows);
    gpu_->rmsnorm_forward(gout.data(), grstd.data(), gx.data(), gw.data(), rows, dim, eps);
    cpu_->rmsnorm_forward(cout.data(), crstd.data(), cx.data(), cw.data(), rows, dim, eps);
    const std::string what = "rmsnorm dim " + std::to_string(dim);
    expect_bf16_close(read(gout), read(cout), what + " out");
    expect_close(read_gpu_floats(grstd), read(crstd), 1e-5, what + " rstd");

    // Backward from the same statistics; both gradients accumulate into initial values.
    const std::vector<float> dout = random_bf16_values(rows * dim, 18);
    const std::vector<float> dx0 = random_bf16_values(rows * dim, 19);
    const std::vector<float> dw0 = random_bf16_values(dim, 20);
    Buffer<float> rstd_for_gpu = floats_on_gpu(read(crstd));
    Buffer<bf16> gdout = on_gpu(dout), gdx = on_gpu(dx0), gdw = on_gpu(dw0);
    Buffer<float> cdout = on_cpu(dout), cdx = on_cpu(dx0), cdw = on_cpu(dw0);
    gpu_->rmsnorm_backward(gdx.data(), gdw.data(), gdout.data(), gx.data(), gw.data(),
                           rstd_for_gpu.data(), rows, dim);
    cpu_->rmsnorm_backward(cdx.data(), cdw.data(), cdout.data(), cx.data(), cw.data(), crstd.data(),
                           rows, dim);
    expect_bf16_close(read(gdx), read(cdx), what + " dx");
    expect_bf16_close(read(gdw), read(cdw), what + " dweight");
  }
}

TEST_F(CudaKernelsTest, RopeForwardInverseAndInPlace) {
  const int64_t rows = 40;
  const int heads = 3, head_dim = 64;
  const int64_t ld_x = heads * head_dim + 8, ld_out = heads * head_dim + 2;
  const double theta = 500000.0;
  std::vector<int32_t> positions(rows);
  std::mt19937 rng(21);
  for (int32_t& p : positions) p = static_cast<int32_t>(rng() % 100000);
  positions[0] = 0;
  const std::vector<float> x = random_bf16_values(rows * ld_x, 22);
  const std::vector<float> out0 = random_bf16_values(rows * ld_out, 23);
  Buffer<int32_t> gpos = indices_on_gpu(positions), cpos = indices_on_cpu(positions);
  Buffer<bf16> gx = on_gpu(x), gout = on_gpu(out0);
  Buffer<float> cx = on_cpu(x), cout = on_cpu(out0);

  gpu_->rope(gout.data(), ld_out, gx.data(), ld_x, gpos.data(), rows, heads, head_dim, theta,
             false);
  cpu_->rope(cout.data(), ld_out, cx.data(), ld_x, cpos.data(), rows, heads, head_dim, theta,
             false);
  expect_bf16_close(read(gout), read(cout), "rope");

  // The inverse rotation, in place, on the same (bf16) input.
  gpu_->rope(gx.data(), ld_x, gx.data(), ld_x, gpos.data(), rows, heads, head_dim, theta, true);
  cpu_->rope(cx.data(), ld_x, cx.data(), ld_x, cpos.data(), rows, heads, head_dim, theta, true);
  expect_bf16_close(read(gx), read(cx), "rope inverse in place");

  EXPECT_THROW(
      gpu_->rope(gx.data(), ld_x, gx.data(), ld_x, gpos.data(), rows, heads, 63, theta, false),
      std::invalid_argument);
  EXPECT_THROW(gpu_->rope(gx.data(), ld_x, gx.data(), ld_out, gpos.data(), rows, heads, head_dim,
                          theta, false),
               std::invalid_argument);
}

TEST_F(CudaKernelsTest, SwiGluForwardAndBackward) {
  const int64_t n = 5000;
  const std::vector<float> gate = random_bf16_values(n, 24, -6.0f, 6.0f);
  const std::vector<float> up = random_bf16_values(n, 25, -2.0f, 2.0f);
  const std::vector<float> dout = random_bf16_values(n, 26);
  Buffer<bf16> ggate = on_gpu(gate), gup = on_gpu(up), gout(*gpu_, n);
  Buffer<float> cgate = on_cpu(gate), cup = on_cpu(up), cout(*cpu_, n);
  gpu_->swiglu_forward(gout.data(), ggate.data(), gup.data(), n);
  cpu_->swiglu_forward(cout.data(), cgate.data(), cup.data(), n);
  expect_bf16_close(read(gout), read(cout), "swiglu_forward");

  // dgate written over dout (the model reuses buffers): everything is read first.
  Buffer<bf16> gdout = on_gpu(dout), gdup(*gpu_, n);
  Buffer<float> cdout = on_cpu(dout), cdup(*cpu_, n);
  gpu_->swiglu_backward(gdout.data(), gdup.data(), gdout.data(), ggate.data(), gup.data(), n);
  cpu_->swiglu_backward(cdout.data(), cdup.data(), cdout.data(), cgate.data(), cup.data(), n);
  expect_bf16_close(read(gdout), read(cdout), "swiglu_backward dgate");
  expect_bf16_close(read(gdup), read(cdup), "swiglu_backward dup");
}

// ---- attention ----------------------------------------------------------------------------------

struct AttentionCase {
  int n_heads;
  int n_kv_heads;
  int head_dim;
};

// gtest prints parameters with this (instead of their bytes).
void PrintTo(const AttentionCase& c, std::ostream* os) {
  *os << "{n_heads " << c.n_heads << ", n_kv_heads " << c.n_kv_heads << ", head_dim " << c.head_dim
      << "}";
}

std::string attention_case_name(const ::testing::TestParamInfo<AttentionCase>& info) {
  return "Hq" + std::to_string(info.param.n_heads) + "_Hkv" +
         std::to_string(info.param.n_kv_heads) + "_D" + std::to_string(info.param.head_dim);
}

class CudaAttentionTest : public CudaKernelsTest,
                          public ::testing::WithParamInterface<AttentionCase> {
 protected:
  // Two sequences laid out as the FreqKV schedule does, kv rows per chunk [sink ; memory ; chunk]:
  // sequence 0's chunk 0 (plain causal) and chunk 1 (4 sink + 40 memory + 80 chunk keys), a
  // block whose keys have no queries (their gradient is zero), sequence 1's chunk (4 + 20 + 70),
  // and kv rows 394..399 outside every block (backward leaves them alone). Chunk 0 spans several
  // query tiles and key steps of every kernel variant.
  static std::vector<AttnBlock> freqkv_blocks() {
    return {{0, 150, 0, 150}, {150, 80, 150, 124}, {230, 0, 274, 26}, {230, 70, 300, 94}};
  }
  static constexpr int64_t kQueryRows = 300;
  static constexpr int64_t kKvRows = 400;

  AttnShape shape() const {
    const AttentionCase& c = GetParam();
    return {c.n_heads, c.n_kv_heads, c.head_dim, 1.0 / std::sqrt(static_cast<double>(c.head_dim))};
  }
  int64_t q_width() const { return static_cast<int64_t>(GetParam().n_heads) * GetParam().head_dim; }
  int64_t kv_width() const {
    return static_cast<int64_t>(GetParam().n_kv_heads) * GetParam().head_dim;
  }
};

TEST_P(CudaAttentionTest, ForwardMatchesCpu) {
  const AttnShape s = shape();
  const std::vector<AttnBlock> blocks = freqkv_blocks();
  // k and v side by side in one buffer, as the model keeps them; every stride has padding.
  const int64_t ld_q = q_width() + 4, ld_out = q_width() + 12, ld_kv = 2 * kv_width() + 8;
  const std::vector<float> q = random_bf16_values(kQueryRows * ld_q, 30, -2.0f, 2.0f);
  const std::vector<float> kv = random_bf16_values(kKvRows * ld_kv, 31, -2.0f, 2.0f);
  const std::vector<float> out0 = random_bf16_values(kQueryRows * ld_out, 32);
  Buffer<bf16> gq = on_gpu(q), gkv = on_gpu(kv), gout = on_gpu(out0);
  Buffer<float> cq = on_cpu(q), ckv = on_cpu(kv), cout = on_cpu(out0);
  Buffer<float> glse(*gpu_, kQueryRows * s.n_heads), clse(*cpu_, kQueryRows * s.n_heads);

  gpu_->attention_forward(gout.data(), ld_out, glse.data(), gq.data(), ld_q, gkv.data(),
                          gkv.data() + kv_width(), ld_kv, blocks, s);
  cpu_->attention_forward(cout.data(), ld_out, clse.data(), cq.data(), ld_q, ckv.data(),
                          ckv.data() + kv_width(), ld_kv, blocks, s);
  expect_bf16_close(read(gout), read(cout), "attention out");
  expect_close(read_gpu_floats(glse), read(clse), 2e-5, "attention lse");
}

TEST_P(CudaAttentionTest, BackwardMatchesCpuAndIsDeterministic) {
  const AttnShape s = shape();
  const std::vector<AttnBlock> blocks = freqkv_blocks();
  const int64_t ld_q = q_width() + 4, ld_dout = q_width() + 12, ld_kv = 2 * kv_width() + 8;
  const std::vector<float> q = random_bf16_values(kQueryRows * ld_q, 40, -2.0f, 2.0f);
  const std::vector<float> kv = random_bf16_values(kKvRows * ld_kv, 41, -2.0f, 2.0f);
  const std::vector<float> dout = random_bf16_values(kQueryRows * ld_dout, 42);
  Buffer<float> cq = on_cpu(q), ckv = on_cpu(kv), cdout = on_cpu(dout);

  // The forward's output (rounded to bf16, as the GPU would store it) and log-sum-exp, from the
  // CPU, feed both backwards: only the backward is under test.
  Buffer<float> cout(*cpu_, kQueryRows * ld_dout), clse(*cpu_, kQueryRows * s.n_heads);
  cpu_->attention_forward(cout.data(), ld_dout, clse.data(), cq.data(), ld_q, ckv.data(),
                          ckv.data() + kv_width(), ld_kv, blocks, s);
  const std::vector<float> out = round_all_bf16(read(cout));
  Buffer<float> cout_rounded = on_cpu(out);
  Buffer<bf16> gq = on_gpu(q), gkv = on_gpu(kv), gdout = on_gpu(dout), gout = on_gpu(out);
  Buffer<float> glse = floats_on_gpu(read(clse));

  // Gradients start from random values: rows outside every block must keep them.
  const std::vector<float> dq0 = random_bf16_values(kQueryRows * ld_q, 43);
  const std::vector<float> dkv0 = random_bf16_values(kKvRows * ld_kv, 44);
  Buffer<bf16> gdq = on_gpu(dq0), gdkv = on_gpu(dkv0);
  Buffer<float> cdq = on_cpu(dq0), cdkv = on_cpu(dkv0);
  gpu_->attention_backward(gdq.data(), gdkv.data(), gdkv.data() + kv_width(), gdout.data(), ld_dout,
                           gout.data(), glse.data(), gq.data(), ld_q, gkv.data(),
                           gkv.data() + kv_width(), ld_kv, blocks, s);
  cpu_->attention_backward(cdq.data(), cdkv.data(), cdkv.data() + kv_width(), cdout.data(), ld_dout,
                           cout_rounded.data(), clse.data(), cq.data(), ld_q, ckv.data(),
                           ckv.data() + kv_width(), ld_kv, blocks, s);
  const std::vector<float> dq = read(gdq);
  const std::vector<float> dkv = read(gdkv);
  expect_bf16_close(dq, read(cdq), "attention dq");
  // dk and dv separately: their magnitudes differ.
  const std::vector<float> cpu_dkv = read(cdkv);
  std::vector<float> gpu_dk, cpu_dk, gpu_dv, cpu_dv;
  for (int64_t r = 0; r < kKvRows; ++r) {
    for (int64_t c = 0; c < ld_kv; ++c) {
      const bool is_v = c >= kv_width() && c < 2 * kv_width();
      (is_v ? gpu_dv : gpu_dk).push_back(dkv[r * ld_kv + c]);
      (is_v ? cpu_dv : cpu_dk).push_back(cpu_dkv[r * ld_kv + c]);
    }
  }
  expect_bf16_close(gpu_dk, cpu_dk, "attention dk");
  expect_bf16_close(gpu_dv, cpu_dv, "attention dv");

  // No atomics: a second run gives the same bits.
  Buffer<bf16> gdq2 = on_gpu(dq0), gdkv2 = on_gpu(dkv0);
  gpu_->attention_backward(gdq2.data(), gdkv2.data(), gdkv2.data() + kv_width(), gdout.data(),
                           ld_dout, gout.data(), glse.data(), gq.data(), ld_q, gkv.data(),
                           gkv.data() + kv_width(), ld_kv, blocks, s);
  expect_identical(read(gdq2), dq, "attention dq, second run");
  expect_identical(read(gdkv2), dkv, "attention dk/dv, second run");
}

INSTANTIATE_TEST_SUITE_P(HeadShapes, CudaAttentionTest,
                         ::testing::Values(AttentionCase{4, 4, 16}, AttentionCase{8, 2, 64},
                                           AttentionCase{6, 2, 96}, AttentionCase{8, 2, 128},
                                           AttentionCase{4, 1, 256}),
                         attention_case_name);

TEST_F(CudaKernelsTest, AttentionRejectsWhatTheCpuBackendRejects) {
  const AttnShape s{4, 2, 32, 0.125};
  Buffer<bf16> q(*gpu_, 64 * 128), kv(*gpu_, 64 * 128), out(*gpu_, 64 * 128);
  Buffer<float> lse(*gpu_, 64 * 4);
  auto forward = [&](const std::vector<AttnBlock>& blocks, const AttnShape& shape) {
    gpu_->attention_forward(out.data(), 128, lse.data(), q.data(), 128, kv.data(), kv.data() + 64,
                            128, blocks, shape);
  };
  EXPECT_THROW(forward({{0, 10, 0, 10}, {5, 10, 20, 10}}, s), std::invalid_argument)
      << "overlapping query ranges";
  EXPECT_THROW(forward({{0, 10, 0, 9}}, s), std::invalid_argument) << "n_kv < n_q";
  EXPECT_THROW(forward({{0, 10, 0, 10}}, AttnShape{4, 3, 32, 0.125}), std::invalid_argument)
      << "n_kv_heads not dividing n_heads";
  EXPECT_THROW(forward({{0, 1, 0, 1}}, AttnShape{1, 1, 320, 0.05}), std::invalid_argument)
      << "head_dim beyond the kernels' 256";
  // Forward allows blocks that share keys; backward does not (it overwrites dk/dv per block).
  EXPECT_NO_THROW(forward({{0, 10, 0, 20}, {10, 10, 0, 20}}, s));
  EXPECT_THROW(gpu_->attention_backward(q.data(), kv.data(), kv.data() + 64, out.data(), 128,
                                        out.data(), lse.data(), q.data(), 128, kv.data(),
                                        kv.data() + 64, 128, {{0, 10, 0, 20}, {10, 10, 0, 20}}, s),
               std::invalid_argument);
  gpu_->synchronize();
}

// ---- flash attention (kernels/cuda/flash_attention.cu) ------------------------------------------
// The tensor-core kernels serve head_dim 64 and 128 by default (the CudaAttentionTest cases above
// with those sizes run them on unaligned strides, element-wise staging); here on 16-byte aligned
// strides (vectorised staging) and a larger FreqKV block set whose blocks span several 64-row
// tiles, partial last tiles, GQA groups of 1, 4 and 8, against the CPU and against the CUDA-core
// kernels. Tolerance, flash-attention's rule: the error against the fp32 CPU may be at most 3x
// that of a CPU computation with the kernel's bf16 roundings (P and dS rounded to bf16 before
// their products, outputs rounded to bf16), or 3x the rounding of the reference, whichever is
// larger.

// Sequence 0: chunk 0 (200 queries, plain causal) and a FreqKV chunk (4 sink + 60 memory + 130
// chunk keys); a block whose keys have no queries; sequence 1's chunk (4 + 60 + 97); kv rows
// 585..589 outside every block.
std::vector<AttnBlock> flash_blocks() {
  return {{0, 200, 0, 200}, {200, 130, 200, 194}, {330, 0, 394, 30}, {330, 97, 424, 161}};
}
constexpr int64_t kFlashQueryRows = 427;
constexpr int64_t kFlashKvRows = 590;

// Attention on the host in float with the flash kernels' bf16 roundings (P to bf16 before P V;
// P and dS to bf16 before dV, dQ and dK; every output to bf16): the baseline of the tolerance.
struct Bf16Attention {
  std::vector<float> out, dq, dk, dv;  // out/dq: rows x Hq*D; dk/dv: rows x Hkv*D (dense)
};
Bf16Attention bf16_rounded_attention(const std::vector<float>& q, int64_t ld_q,
                                     const std::vector<float>& kv, int64_t ld_kv,
                                     const std::vector<float>& dout, int64_t ld_dout,
                                     const std::vector<AttnBlock>& blocks, const AttnShape& s,
                                     int64_t q_rows, int64_t kv_rows) {
  const int D = s.head_dim, Hq = s.n_heads, Hkv = s.n_kv_heads, group = Hq / Hkv;
  const int64_t kv_width = static_cast<int64_t>(Hkv) * D;
  const float scale = static_cast<float>(s.scale);
  Bf16Attention r;
  r.out.assign(static_cast<size_t>(q_rows * Hq * D), 0.0f);
  r.dq.assign(r.out.size(), 0.0f);
  std::vector<float> dk(static_cast<size_t>(kv_rows * kv_width), 0.0f), dv(dk.size(), 0.0f);
  auto dot = [&](const float* a, const float* b) {
    float sum = 0.0f;
    for (int d = 0; d < D; ++d) sum += a[d] * b[d];
    return sum;
  };
  for (const AttnBlock& b : blocks) {
    for (int h = 0; h < Hq; ++h) {
      const int64_t kc = static_cast<int64_t>(h / group) * D;
      for (int64_t i = 0; i < b.n_q; ++i) {
        const int64_t row = b.q_start + i;
        const float* qi = q.data() + row * ld_q + int64_t{h} * D;
        const float* doi = dout.data() + row * ld_dout + int64_t{h} * D;
        const int64_t n_visible = i + b.n_kv - b.n_q + 1;
        std::vector<float> score(static_cast<size_t>(n_visible));
        float mx = -INFINITY;
        for (int64_t j = 0; j < n_visible; ++j) {
          score[static_cast<size_t>(j)] = scale * dot(qi, kv.data() + (b.kv_start + j) * ld_kv + kc);
          mx = std::max(mx, score[static_cast<size_t>(j)]);
        }
        float sum = 0.0f;
        for (float& x : score) sum += (x = std::exp(x - mx));
        std::vector<float> o(static_cast<size_t>(D), 0.0f);
        for (int64_t j = 0; j < n_visible; ++j) {
          const float p = round_bf16(score[static_cast<size_t>(j)]);
          const float* vj = kv.data() + (b.kv_start + j) * ld_kv + kv_width + kc;
          for (int d = 0; d < D; ++d) o[static_cast<size_t>(d)] += p * vj[d];
        }
        float delta = 0.0f;
        for (int d = 0; d < D; ++d) {
          const float od = round_bf16(o[static_cast<size_t>(d)] / sum);
          r.out[static_cast<size_t>(row * Hq * D + int64_t{h} * D + d)] = od;
          delta += doi[d] * od;
        }
        for (int64_t j = 0; j < n_visible; ++j) {
          const float* kj = kv.data() + (b.kv_start + j) * ld_kv + kc;
          const float* vj = kv.data() + (b.kv_start + j) * ld_kv + kv_width + kc;
          const float p = score[static_cast<size_t>(j)] / sum;
          const float ds = round_bf16(p * (dot(doi, vj) - delta));
          const float pb = round_bf16(p);
          float* dkj = dk.data() + (b.kv_start + j) * kv_width + kc;
          float* dvj = dv.data() + (b.kv_start + j) * kv_width + kc;
          for (int d = 0; d < D; ++d) {
            r.dq[static_cast<size_t>(row * Hq * D + int64_t{h} * D + d)] += scale * ds * kj[d];
            dkj[d] += scale * ds * qi[d];
            dvj[d] += pb * doi[d];
          }
        }
      }
    }
  }
  r.dq = round_all_bf16(r.dq);
  r.dk = round_all_bf16(dk);
  r.dv = round_all_bf16(dv);
  return r;
}

// max |got - reference| <= 3 max(max |bf16_emulated - reference|, max |bf16(reference) -
// reference|) + 1e-6 max |reference|.
void expect_flash_close(const std::vector<float>& got, const std::vector<float>& emulated,
                        const std::vector<float>& reference, const std::string& what) {
  ASSERT_EQ(got.size(), reference.size()) << what;
  ASSERT_EQ(emulated.size(), reference.size()) << what;
  double baseline = 0.0, largest = 0.0, worst = 0.0;
  size_t worst_index = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double ref = reference[i];
    baseline = std::max({baseline, std::abs(static_cast<double>(emulated[i]) - ref),
                         std::abs(static_cast<double>(round_bf16(reference[i])) - ref)});
    largest = std::max(largest, std::abs(ref));
    const double error = std::isnan(got[i]) ? std::numeric_limits<double>::infinity()
                                            : std::abs(static_cast<double>(got[i]) - ref);
    if (error > worst) {
      worst = error;
      worst_index = i;
    }
  }
  const double bound = kBf16ErrorFactor * baseline + 1e-6 * largest;
  EXPECT_LE(worst, bound) << what << ": largest error " << worst << " at index " << worst_index
                          << " (gpu " << got[worst_index] << ", fp32 reference "
                          << reference[worst_index] << "); a bf16-rounding CPU computation errs "
                          << "by up to " << baseline << ", allowed " << kBf16ErrorFactor << "x that";
}

// Columns [col0, col0 + width) of every row of a strided matrix, as a dense array.
std::vector<float> columns(const std::vector<float>& m, int64_t ld, int64_t rows, int64_t col0,
                           int64_t width) {
  std::vector<float> dense;
  dense.reserve(static_cast<size_t>(rows * width));
  for (int64_t r = 0; r < rows; ++r) {
    dense.insert(dense.end(), m.begin() + r * ld + col0, m.begin() + r * ld + col0 + width);
  }
  return dense;
}

class FlashAttentionTest : public CudaAttentionTest {
 protected:
  // out, lse, dq, dk, dv of one backend (gradients from random starting values) on the flash
  // block set; the backward takes the CPU forward's out (rounded to bf16) and lse.
  struct Results {
    std::vector<float> out, lse, dq, dkv;
  };
  void SetUp() override {
    CudaAttentionTest::SetUp();
    if (IsSkipped()) return;
    const AttnShape s = shape();
    ld_q_ = q_width() + 8;  // 16-byte aligned rows: the vectorised staging
    ld_out_ = q_width();
    ld_kv_ = 2 * kv_width() + 8;
    q_ = random_bf16_values(kFlashQueryRows * ld_q_, 60, -2.0f, 2.0f);
    kv_ = random_bf16_values(kFlashKvRows * ld_kv_, 61, -2.0f, 2.0f);
    dout_ = random_bf16_values(kFlashQueryRows * ld_out_, 62);
    Buffer<float> cq = on_cpu(q_), ckv = on_cpu(kv_), cdout = on_cpu(dout_);
    Buffer<float> cout(*cpu_, kFlashQueryRows * ld_out_), clse(*cpu_, kFlashQueryRows * s.n_heads);
    cpu_->attention_forward(cout.data(), ld_out_, clse.data(), cq.data(), ld_q_, ckv.data(),
                            ckv.data() + kv_width(), ld_kv_, flash_blocks(), s);
    reference_.out = read(cout);
    reference_.lse = read(clse);
    out_bf16_ = round_all_bf16(reference_.out);
    Buffer<float> cout_rounded = on_cpu(out_bf16_);
    Buffer<float> cdq = on_cpu(dq0()), cdkv = on_cpu(dkv0());
    cpu_->attention_backward(cdq.data(), cdkv.data(), cdkv.data() + kv_width(), cdout.data(),
                             ld_out_, cout_rounded.data(), clse.data(), cq.data(), ld_q_,
                             ckv.data(), ckv.data() + kv_width(), ld_kv_, flash_blocks(), s);
    reference_.dq = read(cdq);
    reference_.dkv = read(cdkv);
  }
  std::vector<float> dq0() const { return random_bf16_values(kFlashQueryRows * ld_q_, 63); }
  std::vector<float> dkv0() const { return random_bf16_values(kFlashKvRows * ld_kv_, 64); }

  Results run(Kernels<bf16>& gpu) {
    const AttnShape s = shape();
    // Buffers of `gpu` itself: its stream orders their uploads, the kernels and the downloads.
    auto upload = [&](const std::vector<float>& values) {
      Buffer<bf16> buffer(gpu, static_cast<int64_t>(values.size()));
      gpu.upload(buffer.data(), values.data(), buffer.size());
      return buffer;
    };
    auto download = [&](const Buffer<bf16>& buffer) {
      std::vector<float> host(static_cast<size_t>(buffer.size()));
      gpu.download(host.data(), buffer.data(), buffer.size());
      return host;
    };
    Results r;
    Buffer<bf16> gq = upload(q_), gkv = upload(kv_), gdout = upload(dout_);
    Buffer<bf16> gout = upload(std::vector<float>(static_cast<size_t>(kFlashQueryRows * ld_out_)));
    Buffer<float> glse(gpu, kFlashQueryRows * s.n_heads);
    gpu.attention_forward(gout.data(), ld_out_, glse.data(), gq.data(), ld_q_, gkv.data(),
                          gkv.data() + kv_width(), ld_kv_, flash_blocks(), s);
    r.out = download(gout);
    r.lse.resize(static_cast<size_t>(glse.size()));
    gpu.copy_to_host(r.lse.data(), glse.data(), r.lse.size() * sizeof(float));
    Buffer<bf16> gout_ref = upload(out_bf16_);
    Buffer<float> glse_ref = freqkv::upload_array(gpu, reference_.lse);
    Buffer<bf16> gdq = upload(dq0()), gdkv = upload(dkv0());
    gpu.attention_backward(gdq.data(), gdkv.data(), gdkv.data() + kv_width(), gdout.data(),
                           ld_out_, gout_ref.data(), glse_ref.data(), gq.data(), ld_q_, gkv.data(),
                           gkv.data() + kv_width(), ld_kv_, flash_blocks(), s);
    r.dq = download(gdq);
    r.dkv = download(gdkv);
    gpu.synchronize();
    return r;
  }

  // Every output of `got` within the flash tolerance of the CPU; rows outside every block keep
  // their starting values exactly.
  void expect_matches_cpu(const Results& got, const std::string& label) {
    const AttnShape s = shape();
    const Bf16Attention emulated =
        bf16_rounded_attention(q_, ld_q_, kv_, ld_kv_, dout_, ld_out_, flash_blocks(), s,
                               kFlashQueryRows, kFlashKvRows);
    const int64_t qw = q_width(), kw = kv_width();
    expect_flash_close(columns(got.out, ld_out_, kFlashQueryRows, 0, qw), emulated.out,
                       columns(reference_.out, ld_out_, kFlashQueryRows, 0, qw), label + " out");
    expect_close(got.lse, reference_.lse, 2e-5, label + " lse");
    expect_flash_close(columns(got.dq, ld_q_, kFlashQueryRows, 0, qw), emulated.dq,
                       columns(reference_.dq, ld_q_, kFlashQueryRows, 0, qw), label + " dq");
    // dk and dv separately (their magnitudes differ), on the rows inside blocks.
    const int64_t block_kv_rows = 585;
    expect_flash_close(columns(got.dkv, ld_kv_, block_kv_rows, 0, kw),
                       std::vector<float>(emulated.dk.begin(), emulated.dk.begin() + block_kv_rows * kw),
                       columns(reference_.dkv, ld_kv_, block_kv_rows, 0, kw), label + " dk");
    expect_flash_close(columns(got.dkv, ld_kv_, block_kv_rows, kw, kw),
                       std::vector<float>(emulated.dv.begin(), emulated.dv.begin() + block_kv_rows * kw),
                       columns(reference_.dkv, ld_kv_, block_kv_rows, kw, kw), label + " dv");
    // Padding columns and the rows outside every block: untouched.
    const std::vector<float> dkv_start = dkv0();
    for (int64_t r = 0; r < kFlashKvRows; ++r) {
      for (int64_t c = 0; c < ld_kv_; ++c) {
        if (r < block_kv_rows && c < 2 * kw) continue;
        ASSERT_EQ(got.dkv[static_cast<size_t>(r * ld_kv_ + c)],
                  dkv_start[static_cast<size_t>(r * ld_kv_ + c)])
            << label << " dk/dv row " << r << " column " << c << " was written";
      }
    }
    const std::vector<float> dq_start = dq0();
    for (int64_t r = 0; r < kFlashQueryRows; ++r) {
      for (int64_t c = qw; c < ld_q_; ++c) {
        ASSERT_EQ(got.dq[static_cast<size_t>(r * ld_q_ + c)],
                  dq_start[static_cast<size_t>(r * ld_q_ + c)])
            << label << " dq padding row " << r << " column " << c << " was written";
      }
    }
  }

  int64_t ld_q_ = 0, ld_out_ = 0, ld_kv_ = 0;
  std::vector<float> q_, kv_, dout_, out_bf16_;
  Results reference_;
};

TEST_P(FlashAttentionTest, ForwardAndBackwardMatchCpuAndAreDeterministic) {
  const Results first = run(*gpu_);
  expect_matches_cpu(first, "flash");
  const Results second = run(*gpu_);
  expect_identical(second.out, first.out, "flash out, second run");
  expect_identical(second.lse, first.lse, "flash lse, second run");
  expect_identical(second.dq, first.dq, "flash dq, second run");
  expect_identical(second.dkv, first.dkv, "flash dk/dv, second run");
}

TEST_P(FlashAttentionTest, AgreesWithTheCudaCoreKernels) {
  const Results flash = run(*gpu_);
  auto simple_backend = freqkv::make_cuda_kernels(0);
  freqkv::set_cuda_flash_attention(*simple_backend, false);
  const Results simple = run(*simple_backend);
  expect_matches_cpu(simple, "simple");
  // Both within the tolerance of the CPU: within twice of each other; here directly, with the
  // CPU's bf16 rounding as the unit.
  const int64_t qw = q_width();
  const std::vector<float> ref_out = columns(reference_.out, ld_out_, kFlashQueryRows, 0, qw);
  const std::vector<float> flash_out = columns(flash.out, ld_out_, kFlashQueryRows, 0, qw);
  const std::vector<float> simple_out = columns(simple.out, ld_out_, kFlashQueryRows, 0, qw);
  double unit = 0.0, worst = 0.0;
  for (size_t i = 0; i < ref_out.size(); ++i) {
    unit = std::max(unit, std::abs(static_cast<double>(round_bf16(ref_out[i])) - ref_out[i]));
    worst = std::max(worst, std::abs(static_cast<double>(flash_out[i]) - simple_out[i]));
  }
  EXPECT_LE(worst, 2 * kBf16ErrorFactor * unit) << "flash vs simple out";
}

INSTANTIATE_TEST_SUITE_P(FlashHeadShapes, FlashAttentionTest,
                         ::testing::Values(AttentionCase{8, 2, 64}, AttentionCase{4, 4, 64},
                                           AttentionCase{8, 1, 128}, AttentionCase{4, 2, 128}),
                         attention_case_name);

TEST_F(CudaKernelsTest, FlashAttentionSelectionByEnvironment) {
  const ScopedEnvironmentVariable attention_choice("FREQKV_ATTENTION");
  ASSERT_EQ(attention_choice.set("fastest"), 0);
  EXPECT_THROW(freqkv::make_cuda_kernels(0), std::invalid_argument);
  ASSERT_EQ(attention_choice.set("simple"), 0);
  EXPECT_NO_THROW(freqkv::make_cuda_kernels(0));
}

// ---- cross-entropy ------------------------------------------------------------------------------

TEST_F(CudaKernelsTest, CrossEntropyLossesAndFusedGradient) {
  struct Size {
    int64_t rows, vocab, ld;
  };
  for (const Size size : {Size{12, 5003, 5010}, Size{3, 128256, 128256}}) {
    std::vector<int32_t> targets(size.rows);
    std::mt19937 rng(50);
    for (int32_t& t : targets) t = static_cast<int32_t>(rng() % size.vocab);
    targets[1] = -1;  // ignored rows
    if (size.rows > 5) targets[5] = -100;
    targets[0] = static_cast<int32_t>(size.vocab - 1);
    const std::vector<float> logits = random_bf16_values(size.rows * size.ld, 51, -8.0f, 8.0f);
    Buffer<int32_t> gtargets = indices_on_gpu(targets), ctargets = indices_on_cpu(targets);
    const std::string what = "cross_entropy vocab " + std::to_string(size.vocab);

    // grad_scale = 0: losses only, logits untouched.
    Buffer<bf16> glogits = on_gpu(logits);
    Buffer<float> clogits = on_cpu(logits);
    Buffer<float> glosses(*gpu_, size.rows), closses(*cpu_, size.rows);
    gpu_->cross_entropy(glosses.data(), glogits.data(), size.ld, gtargets.data(), size.rows,
                        size.vocab, 0.0);
    cpu_->cross_entropy(closses.data(), clogits.data(), size.ld, ctargets.data(), size.rows,
                        size.vocab, 0.0);
    expect_close(read_gpu_floats(glosses), read(closses), 1e-5, what + " losses");
    expect_identical(read(glogits), logits, what + " logits with grad_scale 0");

    // The fused gradient over the logits (padding columns untouched).
    const double grad_scale = 1.0 / 9.0;
    gpu_->cross_entropy(glosses.data(), glogits.data(), size.ld, gtargets.data(), size.rows,
                        size.vocab, grad_scale);
    cpu_->cross_entropy(closses.data(), clogits.data(), size.ld, ctargets.data(), size.rows,
                        size.vocab, grad_scale);
    expect_close(read_gpu_floats(glosses), read(closses), 1e-5, what + " losses with gradient");
    expect_bf16_close(read(glogits), read(clogits), what + " gradient");
  }
  Buffer<bf16> logits(*gpu_, 4);
  Buffer<int32_t> targets = indices_on_gpu(std::vector<int32_t>{0});
  Buffer<float> losses(*gpu_, 1);
  EXPECT_THROW(gpu_->cross_entropy(losses.data(), logits.data(), 3, targets.data(), 1, 4, 1.0),
               std::invalid_argument);
}

TEST_F(CudaKernelsTest, VocabularyParallelCrossEntropyMatchesCpu) {
  const int64_t rows = 7, vocab = 5003;
  const std::vector<int64_t> bounds = {0, 1700, 3301, 5003};  // three uneven shards
  const std::vector<int32_t> targets = {3, 1700, -1, 5002, 3300, 3301, 42};
  const std::vector<float> logits = random_bf16_values(rows * vocab, 80, -8.0f, 8.0f);
  Buffer<int32_t> gtargets = indices_on_gpu(targets), ctargets = indices_on_cpu(targets);

  // Each shard in its own buffer [rows, width] (padded rows), as a rank holds it.
  struct Shard {
    int64_t begin, width, ld;
    Buffer<bf16> gpu;
    Buffer<float> cpu;
  };
  std::vector<Shard> shards;
  std::vector<double> exp_sum(rows, 0.0);
  for (size_t p = 0; p + 1 < bounds.size(); ++p) {
    const int64_t begin = bounds[p], width = bounds[p + 1] - begin, ld = width + 3;
    std::vector<float> part(rows * ld, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c) part[r * ld + c] = logits[r * vocab + begin + c];
    }
    shards.push_back({begin, width, ld, on_gpu(part), on_cpu(part)});
    const Shard& shard = shards.back();
    Buffer<float> glse(*gpu_, rows), gtarget(*gpu_, rows), clse(*cpu_, rows), ctarget(*cpu_, rows);
    gpu_->cross_entropy_stats(glse.data(), gtarget.data(), shard.gpu.data(), ld, gtargets.data(),
                              rows, width, begin);
    cpu_->cross_entropy_stats(clse.data(), ctarget.data(), shard.cpu.data(), ld, ctargets.data(),
                              rows, width, begin);
    const std::string what = "cross_entropy_stats shard " + std::to_string(p);
    expect_close(read_gpu_floats(glse), read(clse), 1e-5, what + " lse");
    expect_identical(read_gpu_floats(gtarget), read(ctarget), what + " target logit");
    for (int64_t r = 0; r < rows; ++r) exp_sum[r] += std::exp(static_cast<double>(clse.data()[r]));
  }

  // The global log-sum-exp (what the ranks would all-reduce), then every shard's gradient.
  std::vector<float> global_lse(rows);
  for (int64_t r = 0; r < rows; ++r) global_lse[r] = static_cast<float>(std::log(exp_sum[r]));
  Buffer<float> glse = floats_on_gpu(global_lse), clse = on_cpu(global_lse);
  for (Shard& shard : shards) {
    gpu_->cross_entropy_grad(shard.gpu.data(), shard.ld, glse.data(), gtargets.data(), rows,
                             shard.width, shard.begin, 0.25);
    cpu_->cross_entropy_grad(shard.cpu.data(), shard.ld, clse.data(), ctargets.data(), rows,
                             shard.width, shard.begin, 0.25);
    expect_bf16_close(read(shard.gpu), read(shard.cpu),
                      "cross_entropy_grad shard at " + std::to_string(shard.begin));
  }
}

// ---- FreqKV compression -------------------------------------------------------------------------

TEST_F(CudaKernelsTest, FreqKVCompressAndItsAdjoint) {
  struct Size {
    int64_t n_in, n_out, channels;
  };
  for (const Size size : {Size{60, 30, 96}, Size{20, 20, 33}, Size{1023, 511, 256}}) {
    const int64_t ld_in = size.channels + 4, ld_out = size.channels + 6;
    const std::string what =
        "freqkv_compress " + std::to_string(size.n_in) + "->" + std::to_string(size.n_out);
    const std::vector<float> in = random_bf16_values(size.n_in * ld_in, 60);
    const std::vector<float> out0 = random_bf16_values(size.n_out * ld_out, 61);
    Buffer<bf16> gin = on_gpu(in), gout = on_gpu(out0);
    Buffer<float> cin = on_cpu(in), cout = on_cpu(out0);
    gpu_->freqkv_compress(gout.data(), ld_out, gin.data(), ld_in, size.n_in, size.n_out,
                          size.channels);
    cpu_->freqkv_compress(cout.data(), ld_out, cin.data(), ld_in, size.n_in, size.n_out,
                          size.channels);
    expect_bf16_close(read(gout), read(cout), what);

    // din += P^T dout.
    const std::vector<float> dout = random_bf16_values(size.n_out * ld_out, 62);
    Buffer<bf16> gdout = on_gpu(dout);
    Buffer<float> cdout = on_cpu(dout);
    gpu_->freqkv_compress_backward(gin.data(), ld_in, gdout.data(), ld_out, size.n_in, size.n_out,
                                   size.channels);
    cpu_->freqkv_compress_backward(cin.data(), ld_in, cdout.data(), ld_out, size.n_in, size.n_out,
                                   size.channels);
    expect_bf16_close(read(gin), read(cin), what + " backward");
  }
  Buffer<bf16> buffer(*gpu_, 64);
  EXPECT_THROW(gpu_->freqkv_compress(buffer.data(), 4, buffer.data(), 4, 4, 8, 4),
               std::invalid_argument);
}

// The cuFFT path (kernels/cuda/freqkv_fft.cu) against the CPU's matrix P in fp32 and against the
// GEMM path, forward and backward, with the implementation forced each way
// (set_cuda_compression_impl).

struct CompressionCase {
  int64_t n_in, n_out, channels;
  int64_t ld_padding;  // ld_in = channels + ld_padding, ld_out = channels + 2 ld_padding
};

void PrintTo(const CompressionCase& c, std::ostream* os) {
  *os << "{N " << c.n_in << ", L " << c.n_out << ", channels " << c.channels << ", ld padding "
      << c.ld_padding << "}";
}

std::string compression_case_name(const ::testing::TestParamInfo<CompressionCase>& info) {
  return "N" + std::to_string(info.param.n_in) + "_L" + std::to_string(info.param.n_out) + "_C" +
         std::to_string(info.param.channels) + "_pad" + std::to_string(info.param.ld_padding);
}

// The largest error bf16 rounding makes on `reference` (what a perfect bf16 kernel errs by).
double bf16_rounding_error(const std::vector<float>& reference) {
  double baseline = 0.0;
  for (float r : reference) {
    baseline = std::max(baseline, std::abs(static_cast<double>(round_bf16(r)) - r));
  }
  return baseline;
}

// Two bf16 results of the same fp32 computation (the FFT and GEMM paths): each may err by
// kBf16ErrorFactor times the reference's rounding error, so they differ by at most twice that.
void expect_paths_agree(const std::vector<float>& fft, const std::vector<float>& gemm,
                        const std::vector<float>& reference, const std::string& what) {
  ASSERT_EQ(fft.size(), gemm.size()) << what;
  const double bound = 2.0 * kBf16ErrorFactor * bf16_rounding_error(reference);
  double worst = 0.0;
  size_t worst_index = 0;
  for (size_t i = 0; i < fft.size(); ++i) {
    const double difference = std::abs(static_cast<double>(fft[i]) - gemm[i]);
    if (!(difference <= worst)) {
      worst = difference;
      worst_index = i;
    }
  }
  EXPECT_LE(worst, bound) << what << ": fft " << fft[worst_index] << " and gemm "
                          << gemm[worst_index] << " at index " << worst_index << " differ by "
                          << worst;
}

class CudaFftCompressionTest : public CudaKernelsTest,
                               public ::testing::WithParamInterface<CompressionCase> {};

TEST_P(CudaFftCompressionTest, ForwardAndBackwardMatchCpuAndGemm) {
  const CompressionCase& c = GetParam();
  const int64_t ld_in = c.channels + c.ld_padding, ld_out = c.channels + 2 * c.ld_padding;
  const std::string what =
      "freqkv_compress " + std::to_string(c.n_in) + "->" + std::to_string(c.n_out);
  const std::vector<float> in = random_bf16_values(c.n_in * ld_in, 80);
  const std::vector<float> out0 = random_bf16_values(c.n_out * ld_out, 81);
  const std::vector<float> dout = random_bf16_values(c.n_out * ld_out, 82);
  const std::vector<float> din0 = random_bf16_values(c.n_in * ld_in, 83);

  // The fp32 reference (padding columns keep their values: out0 and din0 there).
  Buffer<float> cin = on_cpu(in), cout = on_cpu(out0), cdout = on_cpu(dout), cdin = on_cpu(din0);
  cpu_->freqkv_compress(cout.data(), ld_out, cin.data(), ld_in, c.n_in, c.n_out, c.channels);
  cpu_->freqkv_compress_backward(cdin.data(), ld_in, cdout.data(), ld_out, c.n_in, c.n_out,
                                 c.channels);
  const std::vector<float> out_reference = read(cout), din_reference = read(cdin);

  struct PathResult {
    std::vector<float> out, din;
  };
  const auto run = [&](freqkv::CompressionImpl impl) {
    freqkv::set_cuda_compression_impl(*gpu_, impl);
    Buffer<bf16> gin = on_gpu(in), gout = on_gpu(out0), gdout = on_gpu(dout), gdin = on_gpu(din0);
    gpu_->freqkv_compress(gout.data(), ld_out, gin.data(), ld_in, c.n_in, c.n_out, c.channels);
    gpu_->freqkv_compress_backward(gdin.data(), ld_in, gdout.data(), ld_out, c.n_in, c.n_out,
                                   c.channels);
    return PathResult{read(gout), read(gdin)};
  };
  const PathResult fft = run(freqkv::CompressionImpl::Fft);
  const PathResult gemm = run(freqkv::CompressionImpl::Gemm);

  expect_bf16_close(fft.out, out_reference, what + " (fft)");
  expect_bf16_close(fft.din, din_reference, what + " backward (fft, accumulated into din)");
  expect_bf16_close(gemm.out, out_reference, what + " (gemm)");
  expect_paths_agree(fft.out, gemm.out, out_reference, what + ": fft against gemm");
  expect_paths_agree(fft.din, gemm.din, din_reference, what + " backward: fft against gemm");
}

// L = N (identity), L = 1, odd and even N and L, wide and narrow channel counts, padded and dense
// rows; then FreqKV's own sizes: N = C - S = 4092 -> L = 2046 (cache 4096, sink 4, ratio 0.5) over
// a 1.1B-size K|V width (2 x 4 heads x 64) and a 7B-size one (2 x 32 x 128 would be 8192: 2048
// keeps the CPU reference quick), and the 2048 -> 1024 of a 2K cache.
INSTANTIATE_TEST_SUITE_P(
    Sizes, CudaFftCompressionTest,
    ::testing::Values(CompressionCase{1, 1, 7, 0}, CompressionCase{2, 1, 33, 3},
                      CompressionCase{20, 20, 33, 4}, CompressionCase{9, 1, 64, 0},
                      CompressionCase{60, 30, 96, 4}, CompressionCase{127, 64, 300, 5},
                      CompressionCase{1023, 511, 256, 4}, CompressionCase{1000, 999, 40, 8},
                      CompressionCase{2048, 1024, 1024, 0}, CompressionCase{4092, 2046, 512, 0},
                      CompressionCase{4092, 2046, 2048, 16}),
    compression_case_name);

TEST_F(CudaKernelsTest, FreqKVCompressAutoPicksFftFromTheCrossover) {
  // Bitwise: each path is deterministic, and the two differ in the last bits.
  const int64_t n_in = 100, n_out = 50, channels = 64;
  const std::vector<float> in = random_bf16_values(n_in * channels, 90);
  const auto compress = [&](freqkv::CompressionImpl impl, int64_t crossover) {
    freqkv::set_cuda_compression_impl(*gpu_, impl);
    freqkv::set_cuda_compression_crossover(*gpu_, crossover);
    Buffer<bf16> gin = on_gpu(in), gout(*gpu_, n_out * channels);
    gpu_->freqkv_compress(gout.data(), channels, gin.data(), channels, n_in, n_out, channels);
    return read(gout);
  };
  const std::vector<float> fft = compress(freqkv::CompressionImpl::Fft, 1);
  const std::vector<float> gemm = compress(freqkv::CompressionImpl::Gemm, 1);
  ASSERT_NE(fft, gemm) << "the paths agree to the last bit here: the checks below prove nothing";
  expect_identical(compress(freqkv::CompressionImpl::Auto, n_in), fft, "auto at N = crossover");
  expect_identical(compress(freqkv::CompressionImpl::Auto, n_in + 1), gemm,
                   "auto below the crossover");
  EXPECT_THROW(freqkv::set_cuda_compression_crossover(*gpu_, 0), std::invalid_argument);

  // The FFT path checks what the GEMM path checks; no channels is no work.
  freqkv::set_cuda_compression_impl(*gpu_, freqkv::CompressionImpl::Fft);
  Buffer<bf16> buffer(*gpu_, 64);
  EXPECT_THROW(gpu_->freqkv_compress(buffer.data(), 4, buffer.data(), 4, 4, 8, 4),
               std::invalid_argument);
  EXPECT_THROW(gpu_->freqkv_compress_backward(buffer.data(), 3, buffer.data(), 4, 8, 4, 4),
               std::invalid_argument);
  gpu_->freqkv_compress(buffer.data(), 1, buffer.data() + 32, 1, 8, 4, 0);
  EXPECT_EQ(read(buffer), std::vector<float>(64, 0.0f));
}

TEST_F(CudaKernelsTest, FreqKVCompressCrossoverFromTheEnvironment) {
  // make_cuda_kernels reads FREQKV_COMPRESS_CROSSOVER; a bad value is an error naming it.
  const ScopedEnvironmentVariable crossover_choice("FREQKV_COMPRESS_CROSSOVER");
  ASSERT_EQ(crossover_choice.set("12x"), 0);
  try {
    (void)freqkv::make_cuda_kernels(0);
    ADD_FAILURE() << "FREQKV_COMPRESS_CROSSOVER = 12x was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("FREQKV_COMPRESS_CROSSOVER"), std::string::npos)
        << error.what();
  }
  // 100 -> 50 runs on the FFT with crossover 100, on the GEMM with crossover 101.
  const int64_t n_in = 100, n_out = 50, channels = 16;
  const std::vector<float> in = random_bf16_values(n_in * channels, 91);
  const auto compress_with_environment = [&](const char* crossover) {
    EXPECT_EQ(crossover_choice.set(crossover), 0);
    std::unique_ptr<Kernels<bf16>> kernels = freqkv::make_cuda_kernels(0);
    Buffer<bf16> gin(*kernels, n_in * channels), gout(*kernels, n_out * channels);
    kernels->upload(gin.data(), in.data(), gin.size());
    kernels->freqkv_compress(gout.data(), channels, gin.data(), channels, n_in, n_out, channels);
    std::vector<float> out(static_cast<size_t>(gout.size()));
    kernels->download(out.data(), gout.data(), gout.size());
    return out;
  };
  const std::vector<float> at = compress_with_environment("100");
  const std::vector<float> above = compress_with_environment("101");
  ASSERT_NE(at, above) << "the paths agree to the last bit here: the checks below prove nothing";
  freqkv::set_cuda_compression_impl(*gpu_, freqkv::CompressionImpl::Fft);
  Buffer<bf16> gin = on_gpu(in), gout(*gpu_, n_out * channels);
  gpu_->freqkv_compress(gout.data(), channels, gin.data(), channels, n_in, n_out, channels);
  expect_identical(at, read(gout), "crossover 100 from the environment runs the fft");
  freqkv::set_cuda_compression_impl(*gpu_, freqkv::CompressionImpl::Gemm);
  gpu_->freqkv_compress(gout.data(), channels, gin.data(), channels, n_in, n_out, channels);
  expect_identical(above, read(gout), "crossover 101 from the environment runs the gemm");
}

// ---- AdamW ------------------------------------------------------------------------------------

TEST_F(CudaKernelsTest, AdamWMatchesCpuStepByStep) {
  const int64_t n = 10007;
  const double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  const std::vector<float> master0 = random_bf16_values(n, 70);
  Buffer<float> gmaster = floats_on_gpu(master0), gm = floats_on_gpu(std::vector<float>(n, 0.0f)),
                gv = floats_on_gpu(std::vector<float>(n, 0.0f));
  Buffer<float> cmaster = on_cpu(master0), cm = on_cpu(std::vector<float>(n, 0.0f)),
                cv = on_cpu(std::vector<float>(n, 0.0f)), cparam(*cpu_, n);
  Buffer<bf16> gparam(*gpu_, n);
  for (int64_t step = 1; step <= 3; ++step) {
    const std::vector<float> grad = random_bf16_values(n, 70 + step, -0.01f, 0.01f);
    Buffer<bf16> ggrad = on_gpu(grad);
    Buffer<float> cgrad = on_cpu(grad);
    const double grad_scale = step == 2 ? 0.5 : 1.0;
    gpu_->adamw_update(gmaster.data(), gm.data(), gv.data(), gparam.data(), ggrad.data(), n, lr,
                       beta1, beta2, eps, weight_decay, step, grad_scale);
    cpu_->adamw_update(cmaster.data(), cm.data(), cv.data(), cparam.data(), cgrad.data(), n, lr,
                       beta1, beta2, eps, weight_decay, step, grad_scale);
    const std::string what = "adamw step " + std::to_string(step);
    // The same fp32 operations in the same order: equal up to the last bit or so (exactly,
    // unless the CPU build contracts into FMAs).
    expect_relative_close(read_gpu_floats(gmaster), read(cmaster), 1e-6, what + " master");
    expect_relative_close(read_gpu_floats(gm), read(cm), 1e-6, what + " m");
    expect_relative_close(read_gpu_floats(gv), read(cv), 1e-6, what + " v");
    expect_bf16_close(read(gparam), read(cmaster), what + " bf16 param");
  }
  EXPECT_THROW(gpu_->adamw_update(gmaster.data(), gm.data(), gv.data(), gparam.data(),
                                  gparam.data(), n, lr, beta1, beta2, eps, weight_decay, 0, 1.0),
               std::invalid_argument);
}

}  // namespace
