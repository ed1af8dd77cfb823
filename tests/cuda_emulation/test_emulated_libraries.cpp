// The emulated cuBLAS, cuBLASLt, cuFFT and cub radix sort (emulated_libraries.cpp and the headers
// in include/) against references written here from the libraries' documented definitions:
// a naive column-major triple loop, a naive DFT and its Hermitian inverse, std::stable_sort. The
// emulations are the yardstick the CUDA backend is checked with in CI, so they are checked first,
// including the errors they must return for calls a GPU would not survive.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cufft.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cub/device/device_radix_sort.cuh>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

// ---- bf16 and memory helpers, independent of the emulation's ------------------------------------

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float from_bf16(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// The bf16 nearest to x (ties to the even mantissa), chosen between the two bf16 neighbours of x
// by comparing distances in double.
uint16_t to_bf16(float x) {
  if (std::isnan(x)) return 0x7fc0;
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint16_t down = static_cast<uint16_t>(bits >> 16);  // toward zero
  if ((bits & 0xffffu) == 0) return down;
  const uint16_t up = static_cast<uint16_t>(down + 1);  // away from zero (the next magnitude)
  const double d_down = std::fabs(static_cast<double>(x) - from_bf16(down));
  const double d_up = std::fabs(static_cast<double>(x) - from_bf16(up));
  if (d_down < d_up) return down;
  if (d_up < d_down) return up;
  return (down & 1) == 0 ? down : up;
}

uint16_t bf16_nan() { return 0x7fc0; }

std::vector<uint16_t> random_bf16(size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> v(count);
  for (auto& x : v) x = to_bf16(dist(rng));
  return v;
}

// 256-byte aligned storage, as cudaMalloc returns; `offset_bytes` shifts the usable pointer.
class Aligned {
 public:
  explicit Aligned(size_t bytes) : bytes_((bytes + 256 + 255) / 256 * 256) {
    data_ = static_cast<unsigned char*>(std::aligned_alloc(256, bytes_));
    std::memset(data_, 0, bytes_);
  }
  ~Aligned() { std::free(data_); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  template <typename T>
  T* as(size_t offset_bytes = 0) {
    return reinterpret_cast<T*>(data_ + offset_bytes);
  }

 private:
  size_t bytes_;
  unsigned char* data_;
};

// ---- the reference GEMM: column-major, straight from the definition ----------------------------

// C[i + j ldc] = alpha sum_l op(A)(i, l) op(B)(l, j) + beta C (beta = 0: C is not read), in
// double, then rounded to float and to bf16.
std::vector<uint16_t> reference_gemm(bool ta, bool tb, int m, int n, int k, float alpha,
                                     const std::vector<uint16_t>& A, int lda,
                                     const std::vector<uint16_t>& B, int ldb, float beta,
                                     std::vector<uint16_t> C, int ldc) {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      double sum = 0.0;
      for (int l = 0; l < k; ++l) {
        const double a = from_bf16(ta ? A[l + static_cast<size_t>(i) * lda]
                                      : A[i + static_cast<size_t>(l) * lda]);
        const double b = from_bf16(tb ? B[j + static_cast<size_t>(l) * ldb]
                                      : B[l + static_cast<size_t>(j) * ldb]);
        sum += a * b;
      }
      double value = static_cast<double>(alpha) * sum;
      if (beta != 0.0f)
        value += static_cast<double>(beta) * from_bf16(C[i + static_cast<size_t>(j) * ldc]);
      C[i + static_cast<size_t>(j) * ldc] = to_bf16(static_cast<float>(value));
    }
  }
  return C;
}

// Within one bf16 rounding step of the reference (the order of summation is the library's).
void expect_bf16_near(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float g = from_bf16(got[i]), w = from_bf16(want[i]);
    const bool ok = (std::isnan(g) && std::isnan(w)) ||
                    std::fabs(g - w) <= std::ldexp(std::fabs(w), -8) + 1e-30f;
    if (!ok && reported++ < 5) {
      ADD_FAILURE() << what << ": element " << i << " is " << g << ", expected " << w;
    }
  }
}

const char* op_text(bool t) { return t ? "T" : "N"; }

// ==== cuBLAS =====================================================================================

// These tests check the libraries' semantics, reading results right after each call: library work
// runs when it is called (stream order is tested in test_simt.cpp and by the backend's tests).
class ImmediateStreams : public ::testing::Environment {
 public:
  void SetUp() override { emu::set_deferred_streams(false); }
};
const ::testing::Environment* const immediate_streams =
    ::testing::AddGlobalTestEnvironment(new ImmediateStreams);

class CublasTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(cublasCreate(&handle_), CUBLAS_STATUS_SUCCESS); }
  void TearDown() override { EXPECT_EQ(cublasDestroy(handle_), CUBLAS_STATUS_SUCCESS); }

  cublasStatus_t gemm(bool ta, bool tb, int m, int n, int k, float alpha, const uint16_t* A,
                      int lda, const uint16_t* B, int ldb, float beta, uint16_t* C, int ldc) {
    return cublasGemmEx(handle_, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, m,
                        n, k, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &beta, C,
                        CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }

  cublasHandle_t handle_ = nullptr;
};

TEST_F(CublasTest, GemmExMatchesTheTripleLoopOnEveryTransposeWithPaddedLeadingDimensions) {
  const int m = 13, n = 9, k = 17, pad = 5;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (const float beta : {0.0f, 1.0f, -0.5f}) {
        const int a_rows = ta ? k : m, a_cols = ta ? m : k;
        const int b_rows = tb ? n : k, b_cols = tb ? k : n;
        const int lda = a_rows + pad, ldb = b_rows + pad + 2, ldc = m + pad + 1;
        const std::vector<uint16_t> A = random_bf16(static_cast<size_t>(lda) * a_cols, 1);
        const std::vector<uint16_t> B = random_bf16(static_cast<size_t>(ldb) * b_cols, 2);
        std::vector<uint16_t> C = random_bf16(static_cast<size_t>(ldc) * n, 3);
        if (beta == 0.0f) {
          // NaN inside C: beta = 0 must not read it. The padding keeps a marker.
          for (int j = 0; j < n; ++j) {
            for (int i = 0; i < m; ++i) C[i + static_cast<size_t>(j) * ldc] = bf16_nan();
          }
        }
        const std::string what = std::string("transa ") + op_text(ta) + ", transb " + op_text(tb) +
                                 ", beta " + std::to_string(beta);
        const std::vector<uint16_t> want =
            reference_gemm(ta, tb, m, n, k, 0.75f, A, lda, B, ldb, beta, C, ldc);
        std::vector<uint16_t> got = C;
        ASSERT_EQ(gemm(ta, tb, m, n, k, 0.75f, A.data(), lda, B.data(), ldb, beta, got.data(), ldc),
                  CUBLAS_STATUS_SUCCESS)
            << what;
        expect_bf16_near(got, want, what);
        for (int j = 0; j < n; ++j) {
          for (int i = m; i < ldc; ++i) {
            ASSERT_EQ(got[i + static_cast<size_t>(j) * ldc], C[i + static_cast<size_t>(j) * ldc])
                << what << ": padding row " << i << " of column " << j << " was written";
          }
        }
      }
    }
  }
}

TEST_F(CublasTest, GemmExRoundsToNearestEvenAndTreatsOpCAsTranspose) {
  // k = 2, one output: 1 + 2^-8 lies halfway between the bf16 values 1 and 1 + 2^-7 (ties to 1,
  // the even mantissa); 1 + 2^-7 + 2^-8 halfway between 1 + 2^-7 and 1 + 2^-6 (ties to 1 + 2^-6).
  const std::vector<uint16_t> ones = {to_bf16(1.0f), to_bf16(1.0f)};
  const std::vector<uint16_t> low = {to_bf16(1.0f), to_bf16(std::ldexp(1.0f, -8))};
  const std::vector<uint16_t> high = {to_bf16(1.0f + std::ldexp(1.0f, -7)),
                                      to_bf16(std::ldexp(1.0f, -8))};
  uint16_t c = 0;
  ASSERT_EQ(gemm(true, false, 1, 1, 2, 1.0f, low.data(), 2, ones.data(), 2, 0.0f, &c, 1),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(from_bf16(c), 1.0f);
  ASSERT_EQ(gemm(true, false, 1, 1, 2, 1.0f, high.data(), 2, ones.data(), 2, 0.0f, &c, 1),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(from_bf16(c), 1.0f + std::ldexp(1.0f, -6));
  // For real data CUBLAS_OP_C is CUBLAS_OP_T.
  const float alpha = 1.0f, beta = 0.0f;
  ASSERT_EQ(cublasGemmEx(handle_, CUBLAS_OP_C, CUBLAS_OP_N, 1, 1, 2, &alpha, high.data(),
                         CUDA_R_16BF, 2, ones.data(), CUDA_R_16BF, 2, &beta, &c, CUDA_R_16BF, 1,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(from_bf16(c), 1.0f + std::ldexp(1.0f, -6));
}

TEST_F(CublasTest, GemmExWithKZeroScalesCAndWithMOrNZeroDoesNothing) {
  const uint16_t nan = bf16_nan();
  std::vector<uint16_t> C = {to_bf16(1.0f), nan, to_bf16(-2.0f), to_bf16(4.0f)};
  const uint16_t dummy = 0;
  // k = 0: C = beta C; A and B are not read (lda for transa = T only needs max(1, k) = 1).
  ASSERT_EQ(gemm(true, false, 2, 2, 0, 1.0f, &dummy, 1, &dummy, 1, 0.5f, C.data(), 2),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(from_bf16(C[0]), 0.5f);
  EXPECT_TRUE(std::isnan(from_bf16(C[1])));
  EXPECT_EQ(from_bf16(C[2]), -1.0f);
  EXPECT_EQ(from_bf16(C[3]), 2.0f);
  // beta = 0 overwrites, NaN included.
  ASSERT_EQ(gemm(true, false, 2, 2, 0, 1.0f, &dummy, 1, &dummy, 1, 0.0f, C.data(), 2),
            CUBLAS_STATUS_SUCCESS);
  for (uint16_t v : C) EXPECT_EQ(from_bf16(v), 0.0f);
  // m = 0 or n = 0: nothing to compute, nothing touched.
  std::vector<uint16_t> untouched = {nan, nan};
  EXPECT_EQ(gemm(false, false, 0, 2, 3, 1.0f, nullptr, 1, nullptr, 3, 0.0f, untouched.data(), 1),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(gemm(false, false, 2, 0, 3, 1.0f, nullptr, 2, nullptr, 3, 0.0f, untouched.data(), 2),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_TRUE(std::isnan(from_bf16(untouched[0])) && std::isnan(from_bf16(untouched[1])));
}

TEST_F(CublasTest, GemmExRejectsInvalidArgumentsWithoutTouchingC) {
  const int m = 4, n = 3, k = 5;
  const std::vector<uint16_t> A = random_bf16(64, 4), B = random_bf16(64, 5);
  std::vector<uint16_t> C(64, to_bf16(7.0f));
  const std::vector<uint16_t> C0 = C;
  // lda: at least m for transa = N, at least k for transa = T; ldb: k for N, n for T; ldc: m.
  EXPECT_EQ(gemm(false, false, m, n, k, 1.0f, A.data(), m - 1, B.data(), k, 0.0f, C.data(), m),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(gemm(true, false, m, n, k, 1.0f, A.data(), k - 1, B.data(), k, 0.0f, C.data(), m),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(gemm(false, false, m, n, k, 1.0f, A.data(), m, B.data(), k - 1, 0.0f, C.data(), m),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(gemm(false, true, m, n, k, 1.0f, A.data(), m, B.data(), n - 1, 0.0f, C.data(), m),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(gemm(false, false, m, n, k, 1.0f, A.data(), m, B.data(), k, 0.0f, C.data(), m - 1),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(gemm(false, false, 0, n, k, 1.0f, A.data(), 0, B.data(), k, 0.0f, C.data(), 1),
            CUBLAS_STATUS_INVALID_VALUE)
      << "lda must be at least 1 even when m = 0";
  EXPECT_EQ(gemm(false, false, -1, n, k, 1.0f, A.data(), m, B.data(), k, 0.0f, C.data(), m),
            CUBLAS_STATUS_INVALID_VALUE);
  const float one = 1.0f;
  EXPECT_EQ(cublasGemmEx(handle_, static_cast<cublasOperation_t>(7), CUBLAS_OP_N, m, n, k, &one,
                         A.data(), CUDA_R_16BF, k, B.data(), CUDA_R_16BF, k, &one, C.data(),
                         CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, nullptr, A.data(), CUDA_R_16BF,
                         m, B.data(), CUDA_R_16BF, k, &one, C.data(), CUDA_R_16BF, m,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);
  // Type combinations and compute types outside bf16 / fp32 with CUBLAS_COMPUTE_32F.
  EXPECT_EQ(cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, A.data(), CUDA_R_16F, m,
                         B.data(), CUDA_R_16F, k, &one, C.data(), CUDA_R_16F, m, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, A.data(), CUDA_R_16BF, m,
                         B.data(), CUDA_R_32F, k, &one, C.data(), CUDA_R_16BF, m,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, A.data(), CUDA_R_16BF, m,
                         B.data(), CUDA_R_16BF, k, &one, C.data(), CUDA_R_16BF, m,
                         CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_NOT_SUPPORTED);
  // An output that aliases an input would be garbage on a GPU.
  std::vector<uint16_t> shared = random_bf16(64, 6);
  EXPECT_EQ(
      gemm(false, false, m, n, k, 1.0f, shared.data(), m, B.data(), k, 0.0f, shared.data() + 8, m),
      CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(C, C0);
  cublasHandle_t dead = nullptr;
  ASSERT_EQ(cublasCreate(&dead), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasDestroy(dead), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasDestroy(dead), CUBLAS_STATUS_NOT_INITIALIZED);
  float alpha = 1.0f, beta = 0.0f;
  EXPECT_EQ(cublasGemmEx(dead, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, A.data(), CUDA_R_16BF, m,
                         B.data(), CUDA_R_16BF, k, &beta, C.data(), CUDA_R_16BF, m,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_NOT_INITIALIZED);
}

TEST_F(CublasTest, GemmExAcceptsInterleavedButDisjointInputAndOutput) {
  // One column-major buffer of 2m rows per column (a row-major buffer with k and v side by side):
  // C is rows [0, m) of each column, A rows [m, 2m). Their address ranges interleave, their
  // elements do not meet.
  const int m = 4, n = 3, k = 3, ld = 2 * m;
  std::vector<uint16_t> buffer = random_bf16(static_cast<size_t>(ld) * n, 30);
  const std::vector<uint16_t> B = random_bf16(static_cast<size_t>(k) * n, 31);
  const std::vector<uint16_t> A(buffer.begin() + m, buffer.end());  // rows [m, 2m), ld 2m
  std::vector<uint16_t> want =
      reference_gemm(false, false, m, n, k, 1.0f, A, ld, B, k, 0.0f, buffer, ld);
  ASSERT_EQ(gemm(false, false, m, n, k, 1.0f, buffer.data() + m, ld, B.data(), k, 0.0f,
                 buffer.data(), ld),
            CUBLAS_STATUS_SUCCESS);
  // The reference wrote into its copy of the whole buffer; A's rows are unchanged in both.
  expect_bf16_near(buffer, want, "interleaved C and A");
}

TEST_F(CublasTest, GemmExWithFloatOutputKeepsFloatPrecision) {
  // bf16 inputs whose product needs more than bf16's 8 significant bits.
  const uint16_t a = to_bf16(1.0f + std::ldexp(1.0f, -7)), b = a;
  float c = 0.0f;
  const float alpha = 1.0f, beta = 0.0f;
  ASSERT_EQ(cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, &a, CUDA_R_16BF, 1, &b,
                         CUDA_R_16BF, 1, &beta, &c, CUDA_R_32F, 1, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(c, 1.0f + std::ldexp(1.0f, -6) + std::ldexp(1.0f, -14));
}

TEST_F(CublasTest, WorkspaceMustBeAlignedAndSetStreamPutsTheHandleBackOnItsOwn) {
  Aligned workspace(4096);
  EXPECT_EQ(cublasSetWorkspace(handle_, workspace.as<void>(8), 1024), CUBLAS_STATUS_INVALID_VALUE);
  ASSERT_EQ(cublasSetWorkspace(handle_, workspace.as<void>(), 4096), CUBLAS_STATUS_SUCCESS);
  const std::vector<uint16_t> A = random_bf16(16, 7), B = random_bf16(16, 8);
  std::vector<uint16_t> C(16);
  ASSERT_EQ(gemm(false, false, 4, 4, 4, 1.0f, A.data(), 4, B.data(), 4, 0.0f, C.data(), 4),
            CUBLAS_STATUS_SUCCESS);
  // A GEMM may use (overwrite) the workspace it was given ...
  EXPECT_NE(workspace.as<unsigned char>()[0], 0);
  // ... and cublasSetStream resets the handle to the library's own workspace (documented), so
  // the user's buffer is not touched until cublasSetWorkspace is called again.
  std::memset(workspace.as<void>(), 0, 4096);
  ASSERT_EQ(cublasSetStream(handle_, reinterpret_cast<cudaStream_t>(0x1234)),
            CUBLAS_STATUS_SUCCESS);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cublasGetStream(handle_, &stream), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(stream, reinterpret_cast<cudaStream_t>(0x1234));
  ASSERT_EQ(gemm(false, false, 4, 4, 4, 1.0f, A.data(), 4, B.data(), 4, 0.0f, C.data(), 4),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(workspace.as<unsigned char>()[0], 0);
  // A workspace overlapping the operands is refused.
  ASSERT_EQ(cublasSetWorkspace(handle_, workspace.as<void>(), 4096), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(gemm(false, false, 4, 4, 4, 1.0f, workspace.as<uint16_t>(), 4, B.data(), 4, 0.0f,
                 C.data(), 4),
            CUBLAS_STATUS_INVALID_VALUE);
}

TEST(CublasStatus, NamesAndStringsAreTheLibrarys) {
  EXPECT_STREQ(cublasGetStatusName(CUBLAS_STATUS_NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED");
  EXPECT_STREQ(cublasGetStatusName(CUBLAS_STATUS_INVALID_VALUE), "CUBLAS_STATUS_INVALID_VALUE");
  EXPECT_STREQ(cublasGetStatusString(CUBLAS_STATUS_SUCCESS), "success");
  EXPECT_STRNE(cublasGetStatusString(CUBLAS_STATUS_NOT_SUPPORTED),
               cublasGetStatusString(CUBLAS_STATUS_INVALID_VALUE));
  EXPECT_STREQ(cublasLtGetStatusString(CUBLAS_STATUS_NOT_SUPPORTED),
               cublasGetStatusString(CUBLAS_STATUS_NOT_SUPPORTED));
  EXPECT_STREQ(cublasLtGetStatusName(CUBLAS_STATUS_EXECUTION_FAILED),
               "CUBLAS_STATUS_EXECUTION_FAILED");
  EXPECT_EQ(static_cast<int>(CUBLAS_STATUS_NOT_SUPPORTED), 15);
  EXPECT_EQ(static_cast<int>(CUBLAS_COMPUTE_32F), 68);
  EXPECT_EQ(static_cast<int>(CUDA_R_16BF), 14);
}

// ==== cuBLASLt ===================================================================================

class CublasLtTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(cublasLtCreate(&handle_), CUBLAS_STATUS_SUCCESS); }
  void TearDown() override {
    for (auto layout : layouts_)
      EXPECT_EQ(cublasLtMatrixLayoutDestroy(layout), CUBLAS_STATUS_SUCCESS);
    for (auto desc : descs_) EXPECT_EQ(cublasLtMatmulDescDestroy(desc), CUBLAS_STATUS_SUCCESS);
    for (auto pref : prefs_) {
      EXPECT_EQ(cublasLtMatmulPreferenceDestroy(pref), CUBLAS_STATUS_SUCCESS);
    }
    EXPECT_EQ(cublasLtDestroy(handle_), CUBLAS_STATUS_SUCCESS);
  }

  cublasLtMatmulDesc_t desc(bool ta, bool tb) {
    cublasLtMatmulDesc_t d = nullptr;
    EXPECT_EQ(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
    const int32_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    EXPECT_EQ(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a),
              CUBLAS_STATUS_SUCCESS);
    EXPECT_EQ(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b),
              CUBLAS_STATUS_SUCCESS);
    descs_.push_back(d);
    return d;
  }
  cublasLtMatrixLayout_t layout(int rows, int cols, int ld, cudaDataType type = CUDA_R_16BF) {
    cublasLtMatrixLayout_t l = nullptr;
    EXPECT_EQ(cublasLtMatrixLayoutCreate(&l, type, rows, cols, ld), CUBLAS_STATUS_SUCCESS);
    layouts_.push_back(l);
    return l;
  }
  cublasLtMatmulPreference_t preference(uint64_t max_workspace, uint32_t alignment) {
    cublasLtMatmulPreference_t p = nullptr;
    EXPECT_EQ(cublasLtMatmulPreferenceCreate(&p), CUBLAS_STATUS_SUCCESS);
    EXPECT_EQ(cublasLtMatmulPreferenceSetAttribute(p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                   &max_workspace, sizeof max_workspace),
              CUBLAS_STATUS_SUCCESS);
    for (auto attr :
         {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
      EXPECT_EQ(cublasLtMatmulPreferenceSetAttribute(p, attr, &alignment, sizeof alignment),
                CUBLAS_STATUS_SUCCESS);
    }
    prefs_.push_back(p);
    return p;
  }

  // A consistent column-major problem: op(A) m x k, op(B) k x n, C = D m x n.
  struct Problem {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
  };
  Problem problem(bool ta, bool tb, int m, int n, int k, int lda, int ldb, int ldc) {
    return {desc(ta, tb), layout(ta ? k : m, ta ? m : k, lda), layout(tb ? n : k, tb ? k : n, ldb),
            layout(m, n, ldc)};
  }

  cublasLtHandle_t handle_ = nullptr;
  std::vector<cublasLtMatrixLayout_t> layouts_;
  std::vector<cublasLtMatmulDesc_t> descs_;
  std::vector<cublasLtMatmulPreference_t> prefs_;
};

TEST_F(CublasLtTest, MatmulMatchesTheTripleLoopOnEveryTransposeInPlaceAndOutOfPlace) {
  const int m = 11, n = 6, k = 19, pad = 3;
  const uint64_t max_workspace = 32 << 20;
  Aligned workspace(max_workspace);
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (const float beta : {0.0f, 1.0f, 0.25f}) {
        const int lda = (ta ? k : m) + pad, ldb = (tb ? n : k) + pad + 1, ldc = m + pad;
        const Problem p = problem(ta, tb, m, n, k, lda, ldb, ldc);
        cublasLtMatmulHeuristicResult_t result{};
        int found = 0;
        ASSERT_EQ(
            cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c,
                                           preference(max_workspace, 256), 1, &result, &found),
            CUBLAS_STATUS_SUCCESS);
        ASSERT_EQ(found, 1);
        EXPECT_EQ(result.state, CUBLAS_STATUS_SUCCESS);
        EXPECT_LE(result.workspaceSize, max_workspace);

        const size_t a_size = static_cast<size_t>(lda) * (ta ? m : k);
        const size_t b_size = static_cast<size_t>(ldb) * (tb ? k : n);
        const size_t c_size = static_cast<size_t>(ldc) * n;
        Aligned a(a_size * 2), b(b_size * 2), c(c_size * 2), d(c_size * 2);
        const std::vector<uint16_t> A = random_bf16(a_size, 10), B = random_bf16(b_size, 11);
        std::vector<uint16_t> C = random_bf16(c_size, 12);
        if (beta == 0.0f) std::fill(C.begin(), C.end(), bf16_nan());
        std::memcpy(a.as<void>(), A.data(), a_size * 2);
        std::memcpy(b.as<void>(), B.data(), b_size * 2);
        const std::string what = std::string("TRANSA ") + op_text(ta) + ", TRANSB " + op_text(tb) +
                                 ", beta " + std::to_string(beta);
        const float alpha = -1.25f;
        std::vector<uint16_t> want =
            reference_gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
        // Out of place: C stays as it was, D gets the result (D's padding is not written).
        std::memcpy(c.as<void>(), C.data(), c_size * 2);
        std::fill(d.as<uint16_t>(), d.as<uint16_t>() + c_size, to_bf16(3.0f));
        ASSERT_EQ(cublasLtMatmul(handle_, p.op, &alpha, a.as<void>(), p.a, b.as<void>(), p.b, &beta,
                                 c.as<void>(), p.c, d.as<void>(), p.c, &result.algo,
                                 workspace.as<void>(), max_workspace, nullptr),
                  CUBLAS_STATUS_SUCCESS)
            << what;
        std::vector<uint16_t> got(d.as<uint16_t>(), d.as<uint16_t>() + c_size);
        std::vector<uint16_t> want_d = want;
        for (int j = 0; j < n; ++j) {
          for (int i = m; i < ldc; ++i) want_d[i + static_cast<size_t>(j) * ldc] = to_bf16(3.0f);
        }
        expect_bf16_near(got, want_d, what + " (out of place)");
        EXPECT_EQ(std::memcmp(c.as<void>(), C.data(), c_size * 2), 0) << what << ": C was written";
        // In place, C == D.
        ASSERT_EQ(cublasLtMatmul(handle_, p.op, &alpha, a.as<void>(), p.a, b.as<void>(), p.b, &beta,
                                 c.as<void>(), p.c, c.as<void>(), p.c, &result.algo,
                                 workspace.as<void>(), max_workspace, nullptr),
                  CUBLAS_STATUS_SUCCESS)
            << what;
        got.assign(c.as<uint16_t>(), c.as<uint16_t>() + c_size);
        expect_bf16_near(got, want, what + " (in place)");
      }
    }
  }
}

TEST_F(CublasLtTest, MatmulRejectsPointersLessAlignedThanTheAlgorithmWasPromised) {
  const int m = 8, n = 8, k = 8;
  const Problem p = problem(false, false, m, n, k, m, k, m);
  Aligned a(512), b(512), c(512), workspace(1 << 20);
  const std::vector<uint16_t> A = random_bf16(m * k, 20), B = random_bf16(k * n, 21);
  const float alpha = 1.0f, beta = 0.0f;
  for (const uint32_t promised : {16u, 2u}) {
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    ASSERT_EQ(cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c,
                                             preference(1 << 20, promised), 1, &result, &found),
              CUBLAS_STATUS_SUCCESS);
    ASSERT_EQ(found, 1);
    // A one bf16 past a 256-byte boundary: 2-byte aligned.
    std::memcpy(a.as<uint16_t>(2), A.data(), A.size() * 2);
    std::memcpy(b.as<void>(), B.data(), B.size() * 2);
    std::fill(c.as<uint16_t>(), c.as<uint16_t>() + m * n, to_bf16(5.0f));
    const cublasStatus_t status = cublasLtMatmul(
        handle_, p.op, &alpha, a.as<void>(2), p.a, b.as<void>(), p.b, &beta, c.as<void>(), p.c,
        c.as<void>(), p.c, &result.algo, workspace.as<void>(), 1 << 20, nullptr);
    if (promised == 16) {
      EXPECT_EQ(status, CUBLAS_STATUS_INVALID_VALUE);
      EXPECT_EQ(from_bf16(c.as<uint16_t>()[0]), 5.0f) << "a rejected matmul wrote D";
    } else {
      ASSERT_EQ(status, CUBLAS_STATUS_SUCCESS);
      std::vector<uint16_t> got(c.as<uint16_t>(), c.as<uint16_t>() + m * n);
      expect_bf16_near(got,
                       reference_gemm(false, false, m, n, k, alpha, A, m, B, k, beta,
                                      std::vector<uint16_t>(m * n), m),
                       "2-byte aligned A");
    }
  }
  // Without an algorithm cuBLASLt picks one for the pointers it is given.
  EXPECT_EQ(cublasLtMatmul(handle_, p.op, &alpha, a.as<void>(2), p.a, b.as<void>(), p.b, &beta,
                           c.as<void>(), p.c, c.as<void>(), p.c, nullptr, workspace.as<void>(),
                           1 << 20, nullptr),
            CUBLAS_STATUS_SUCCESS);
}

TEST_F(CublasLtTest, MatmulNeedsTheWorkspaceTheAlgorithmAskedFor) {
  const int m = 16, n = 16, k = 16;
  const Problem p = problem(true, false, m, n, k, k, k, m);
  Aligned a(1024), b(1024), c(1024), workspace(8 << 20);
  const float alpha = 1.0f, beta = 0.0f;
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  ASSERT_EQ(cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c,
                                           preference(8 << 20, 256), 1, &result, &found),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(found, 1);
  ASSERT_GT(result.workspaceSize, 0u) << "the emulated algorithm should need a workspace";
  EXPECT_EQ(cublasLtMatmul(handle_, p.op, &alpha, a.as<void>(), p.a, b.as<void>(), p.b, &beta,
                           c.as<void>(), p.c, c.as<void>(), p.c, &result.algo, workspace.as<void>(),
                           result.workspaceSize - 1, nullptr),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(cublasLtMatmul(handle_, p.op, &alpha, a.as<void>(), p.a, b.as<void>(), p.b, &beta,
                           c.as<void>(), p.c, c.as<void>(), p.c, &result.algo,
                           workspace.as<void>(16), result.workspaceSize, nullptr),
            CUBLAS_STATUS_INVALID_VALUE)
      << "the workspace must be 256-byte aligned";
  EXPECT_EQ(cublasLtMatmul(handle_, p.op, &alpha, a.as<void>(), p.a, b.as<void>(), p.b, &beta,
                           c.as<void>(), p.c, c.as<void>(), p.c, &result.algo, workspace.as<void>(),
                           result.workspaceSize, nullptr),
            CUBLAS_STATUS_SUCCESS);
  // No workspace allowed (the preference's default): the algorithm needs none.
  cublasLtMatmulPreference_t none = nullptr;
  ASSERT_EQ(cublasLtMatmulPreferenceCreate(&none), CUBLAS_STATUS_SUCCESS);
  prefs_.push_back(none);
  ASSERT_EQ(
      cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, none, 1, &result, &found),
      CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(result.workspaceSize, 0u);
  EXPECT_EQ(cublasLtMatmul(handle_, p.op, &alpha, a.as<void>(), p.a, b.as<void>(), p.b, &beta,
                           c.as<void>(), p.c, c.as<void>(), p.c, &result.algo, nullptr, 0, nullptr),
            CUBLAS_STATUS_SUCCESS);
}

TEST_F(CublasLtTest, InconsistentOrUnsupportedProblemsHaveNoAlgorithm) {
  const cublasLtMatmulPreference_t pref = preference(1 << 20, 256);
  cublasLtMatmulHeuristicResult_t result{};
  int found = -1;
  // TRANSA = T but A laid out as for N (m x k with m != k).
  const cublasLtMatmulDesc_t op_t = desc(true, false);
  const auto a_as_n = layout(8, 4, 8), b = layout(4, 6, 4), c = layout(8, 6, 8);
  EXPECT_EQ(
      cublasLtMatmulAlgoGetHeuristic(handle_, op_t, a_as_n, b, c, c, pref, 1, &result, &found),
      CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(found, 0);
  // The same mismatch straight to cublasLtMatmul is an invalid configuration.
  Aligned mem(4096);
  const float alpha = 1.0f, beta = 0.0f;
  EXPECT_EQ(
      cublasLtMatmul(handle_, op_t, &alpha, mem.as<void>(0), a_as_n, mem.as<void>(1024), b, &beta,
                     mem.as<void>(2048), c, mem.as<void>(2048), c, nullptr, nullptr, 0, nullptr),
      CUBLAS_STATUS_INVALID_VALUE);
  const cublasLtMatmulDesc_t op_n = desc(false, false);
  // ld less than the rows.
  const auto a_short_ld = layout(8, 4, 7);
  EXPECT_EQ(
      cublasLtMatmulAlgoGetHeuristic(handle_, op_n, a_short_ld, b, c, c, pref, 1, &result, &found),
      CUBLAS_STATUS_NOT_SUPPORTED);
  // k of A and B disagree; D not m x n.
  const auto b_wrong_k = layout(5, 6, 5), d_wrong = layout(8, 5, 8);
  EXPECT_EQ(cublasLtMatmulAlgoGetHeuristic(handle_, op_n, a_as_n, b_wrong_k, c, c, pref, 1, &result,
                                           &found),
            CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(cublasLtMatmulAlgoGetHeuristic(handle_, op_n, a_as_n, b, c, d_wrong, pref, 1, &result,
                                           &found),
            CUBLAS_STATUS_NOT_SUPPORTED);
  // fp16 data, and a 64F compute type.
  const auto a_half = layout(8, 4, 8, CUDA_R_16F), b_half = layout(4, 6, 4, CUDA_R_16F),
             c_half = layout(8, 6, 8, CUDA_R_16F);
  EXPECT_EQ(cublasLtMatmulAlgoGetHeuristic(handle_, op_n, a_half, b_half, c_half, c_half, pref, 1,
                                           &result, &found),
            CUBLAS_STATUS_NOT_SUPPORTED);
  cublasLtMatmulDesc_t op_64 = nullptr;
  ASSERT_EQ(cublasLtMatmulDescCreate(&op_64, CUBLAS_COMPUTE_64F, CUDA_R_64F),
            CUBLAS_STATUS_SUCCESS);
  descs_.push_back(op_64);
  EXPECT_EQ(
      cublasLtMatmulAlgoGetHeuristic(handle_, op_64, a_as_n, b, c, c, pref, 1, &result, &found),
      CUBLAS_STATUS_NOT_SUPPORTED);
  // The consistent problem has one, and requestedAlgoCount must be positive.
  EXPECT_EQ(
      cublasLtMatmulAlgoGetHeuristic(handle_, op_n, a_as_n, b, c, c, pref, 0, &result, &found),
      CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(
      cublasLtMatmulAlgoGetHeuristic(handle_, op_n, a_as_n, b, c, c, pref, 4, &result, &found),
      CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(found, 1);
  // An algorithm chosen for one problem is not run on another.
  const Problem other = problem(false, false, 8, 6, 4, 16, 4, 8);
  EXPECT_EQ(cublasLtMatmul(handle_, other.op, &alpha, mem.as<void>(0), other.a, mem.as<void>(1024),
                           other.b, &beta, mem.as<void>(2048), other.c, mem.as<void>(2048), other.c,
                           &result.algo, nullptr, 0, nullptr),
            CUBLAS_STATUS_INVALID_VALUE);
  // Nor is something that never came from the heuristic.
  cublasLtMatmulAlgo_t made_up{};
  EXPECT_EQ(
      cublasLtMatmul(handle_, op_n, &alpha, mem.as<void>(0), a_as_n, mem.as<void>(1024), b, &beta,
                     mem.as<void>(2048), c, mem.as<void>(2048), c, &made_up, nullptr, 0, nullptr),
      CUBLAS_STATUS_INVALID_VALUE);
}

TEST_F(CublasLtTest, SetAttributeChecksTheSizeOfEachAttribute) {
  const cublasLtMatmulDesc_t d = desc(false, false);
  const int64_t wide = CUBLAS_OP_T;
  EXPECT_EQ(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &wide, sizeof wide),
            CUBLAS_STATUS_INVALID_VALUE);
  const int32_t bad_op = 9;
  EXPECT_EQ(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &bad_op, sizeof bad_op),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, nullptr, 4),
            CUBLAS_STATUS_INVALID_VALUE);
  int32_t trans = -1;
  size_t written = 0;
  EXPECT_EQ(cublasLtMatmulDescGetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, nullptr, 0, &written),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(written, sizeof(int32_t));
  EXPECT_EQ(cublasLtMatmulDescGetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof trans,
                                           &written),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(trans, CUBLAS_OP_N);

  cublasLtMatmulPreference_t p = nullptr;
  ASSERT_EQ(cublasLtMatmulPreferenceCreate(&p), CUBLAS_STATUS_SUCCESS);
  prefs_.push_back(p);
  const uint32_t narrow_workspace = 1024;
  EXPECT_EQ(cublasLtMatmulPreferenceSetAttribute(p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &narrow_workspace, sizeof narrow_workspace),
            CUBLAS_STATUS_INVALID_VALUE);
  const uint64_t wide_alignment = 16;
  EXPECT_EQ(cublasLtMatmulPreferenceSetAttribute(p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                 &wide_alignment, sizeof wide_alignment),
            CUBLAS_STATUS_INVALID_VALUE);
  uint32_t alignment = 0;
  EXPECT_EQ(cublasLtMatmulPreferenceGetAttribute(p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                 &alignment, sizeof alignment, &written),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(alignment, 256u) << "the documented default";
  uint64_t max_workspace = 1;
  EXPECT_EQ(cublasLtMatmulPreferenceGetAttribute(p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &max_workspace, sizeof max_workspace, &written),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(max_workspace, 0u) << "the documented default";

  const cublasLtMatrixLayout_t l = layout(3, 4, 5);
  const int32_t rows32 = 3;
  EXPECT_EQ(
      cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_ROWS, &rows32, sizeof rows32),
      CUBLAS_STATUS_INVALID_VALUE);
  int64_t ld = 0;
  EXPECT_EQ(
      cublasLtMatrixLayoutGetAttribute(l, CUBLASLT_MATRIX_LAYOUT_LD, &ld, sizeof ld, &written),
      CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(ld, 5);
  int32_t order = -1;
  EXPECT_EQ(cublasLtMatrixLayoutGetAttribute(l, CUBLASLT_MATRIX_LAYOUT_ORDER, &order, sizeof order,
                                             &written),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(order, CUBLASLT_ORDER_COL);
}

// ==== cuFFT ======================================================================================

constexpr double kPi = 3.14159265358979323846;

// exp(2 pi i r / n) for r in [0, n): the root of each term j k of a length-n DFT, indexed by the
// exact product j k mod n.
std::vector<std::complex<double>> roots_of_unity(int64_t n) {
  std::vector<std::complex<double>> roots(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    roots[r] = std::polar(1.0, 2.0 * kPi * static_cast<double>(r) / static_cast<double>(n));
  }
  return roots;
}

// The definitions as direct O(n^2) sums, independent of the emulation's FFT: the angle of each
// term from the exact product j k.
std::vector<std::complex<double>> reference_r2c(const std::vector<double>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  const auto roots = roots_of_unity(n);
  std::vector<std::complex<double>> bins(static_cast<size_t>(n / 2 + 1));
  for (int64_t k = 0; k <= n / 2; ++k) {
    std::complex<double> sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += x[j] * std::conj(roots[(j * k) % n]);
    bins[k] = sum;
  }
  return bins;
}

// The unnormalised inverse of the Hermitian spectrum the n/2 + 1 bins stand for: X_{n-k} =
// conj(X_k), and bins 0 and n/2 (even n) of a real signal's spectrum are real.
std::vector<double> reference_c2r(std::vector<std::complex<double>> bins, int64_t n) {
  bins[0] = bins[0].real();
  if (n % 2 == 0) bins[n / 2] = bins[n / 2].real();
  const auto roots = roots_of_unity(n);
  std::vector<std::complex<double>> X(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) X[k] = k <= n / 2 ? bins[k] : std::conj(bins[n - k]);
  std::vector<double> y(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    std::complex<double> sum = 0.0;
    for (int64_t k = 0; k < n; ++k) sum += X[k] * roots[(j * k) % n];
    y[j] = sum.real();
  }
  return y;
}

class CufftTest : public ::testing::Test {
 protected:
  void TearDown() override {
    for (cufftHandle plan : plans_) EXPECT_EQ(cufftDestroy(plan), CUFFT_SUCCESS);
  }

  // As kernels/cuda/freqkv_fft.cu lays out its transforms: `channels` transforms of length n
  // over the rows of a dense [rows, channels] array (stride channels, distance 1), no
  // auto-allocated work area.
  cufftHandle strided_plan(cufftType type, int64_t n, int64_t channels, size_t* work_bytes) {
    cufftHandle plan = -1;
    EXPECT_EQ(cufftCreate(&plan), CUFFT_SUCCESS);
    plans_.push_back(plan);
    EXPECT_EQ(cufftSetAutoAllocation(plan, 0), CUFFT_SUCCESS);
    long long length[1] = {n};
    long long real_embed[1] = {n};
    long long complex_embed[1] = {n / 2 + 1};
    const bool to_complex = type == CUFFT_R2C;
    EXPECT_EQ(cufftMakePlanMany64(plan, 1, length, to_complex ? real_embed : complex_embed,
                                  channels, 1, to_complex ? complex_embed : real_embed, channels, 1,
                                  type, channels, work_bytes),
              CUFFT_SUCCESS);
    return plan;
  }

  std::vector<cufftHandle> plans_;
};

TEST_F(CufftTest, StridedBatchedR2CAndC2RMatchTheDefinitionsForOddAndEvenLengths) {
  for (const int64_t n : {int64_t{2}, int64_t{7}, int64_t{8}, int64_t{33}, int64_t{250}}) {
    const int64_t channels = 19, bins = n / 2 + 1;  // more than one block of transforms
    size_t r2c_work = 0, c2r_work = 0;
    const cufftHandle r2c = strided_plan(CUFFT_R2C, n, channels, &r2c_work);
    const cufftHandle c2r = strided_plan(CUFFT_C2R, n, channels, &c2r_work);
    EXPECT_GT(r2c_work, 0u) << "n = " << n;
    EXPECT_GT(c2r_work, 0u) << "n = " << n;
    Aligned work(std::max(r2c_work, c2r_work));
    ASSERT_EQ(cufftSetWorkArea(r2c, work.as<void>()), CUFFT_SUCCESS);
    ASSERT_EQ(cufftSetWorkArea(c2r, work.as<void>()), CUFFT_SUCCESS);

    std::mt19937 rng(static_cast<uint32_t>(n));
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    std::vector<float> real(static_cast<size_t>(n * channels));
    for (float& v : real) v = dist(rng);
    std::vector<cufftComplex> spectrum(static_cast<size_t>(bins * channels));
    ASSERT_EQ(cufftExecR2C(r2c, real.data(), spectrum.data()), CUFFT_SUCCESS);

    // A spectrum with imaginary parts in bin 0 and (even n) bin n/2, which C2R must ignore.
    std::vector<cufftComplex> input(static_cast<size_t>(bins * channels));
    for (auto& v : input) v = make_cuComplex(dist(rng), dist(rng));
    const std::vector<cufftComplex> input_copy = input;
    std::vector<float> inverse(static_cast<size_t>(n * channels));
    ASSERT_EQ(cufftExecC2R(c2r, input.data(), inverse.data()), CUFFT_SUCCESS);

    for (int64_t ch = 0; ch < channels; ++ch) {
      std::vector<double> x(static_cast<size_t>(n));
      double scale = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        x[j] = real[j * channels + ch];
        scale += std::fabs(x[j]);
      }
      const auto want = reference_r2c(x);
      for (int64_t k = 0; k < bins; ++k) {
        const cufftComplex got = spectrum[k * channels + ch];
        EXPECT_NEAR(got.x, want[k].real(), 1e-5 * scale) << "R2C n " << n << " bin " << k;
        EXPECT_NEAR(got.y, want[k].imag(), 1e-5 * scale) << "R2C n " << n << " bin " << k;
      }
      std::vector<std::complex<double>> X(static_cast<size_t>(bins));
      double bin_scale = 0.0;
      for (int64_t k = 0; k < bins; ++k) {
        const cufftComplex v = input_copy[k * channels + ch];
        X[k] = {v.x, v.y};
        bin_scale += std::abs(X[k]);
      }
      const auto want_y = reference_c2r(X, n);
      for (int64_t j = 0; j < n; ++j) {
        EXPECT_NEAR(inverse[j * channels + ch], want_y[j], 1e-5 * 2 * bin_scale)
            << "C2R n " << n << " sample " << j;
      }
    }
  }
}

// The FFT (radix-2 for powers of two, Bluestein otherwise) is as accurate as the direct sums in
// double: each result is the definition rounded to float, up to a double-level error. An FFT in
// float would miss by about 1e-7 of the signal's norm on every bin, small ones included.
TEST_F(CufftTest, FftMatchesTheDirectDftUpToTheFinalRoundingToFloat) {
  for (const int64_t n : {1, 2, 3, 5, 7, 8, 16, 33, 250, 1000, 1023, 4092}) {
    const int64_t channels = 3, bins = n / 2 + 1;  // a partial block of transforms
    size_t r2c_work = 0, c2r_work = 0;
    const cufftHandle r2c = strided_plan(CUFFT_R2C, n, channels, &r2c_work);
    const cufftHandle c2r = strided_plan(CUFFT_C2R, n, channels, &c2r_work);
    Aligned work(std::max<size_t>({r2c_work, c2r_work, 1}));
    ASSERT_EQ(cufftSetWorkArea(r2c, work.as<void>()), CUFFT_SUCCESS);
    ASSERT_EQ(cufftSetWorkArea(c2r, work.as<void>()), CUFFT_SUCCESS);

    std::mt19937 rng(static_cast<uint32_t>(n) + 100);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    std::vector<float> real(static_cast<size_t>(n * channels));
    for (float& v : real) v = dist(rng);
    std::vector<cufftComplex> spectrum(static_cast<size_t>(bins * channels));
    ASSERT_EQ(cufftExecR2C(r2c, real.data(), spectrum.data()), CUFFT_SUCCESS);
    // Imaginary parts in bin 0 and (even n) bin n/2 too, which C2R ignores.
    std::vector<cufftComplex> input(static_cast<size_t>(bins * channels));
    for (auto& v : input) v = make_cuComplex(dist(rng), dist(rng));
    const std::vector<cufftComplex> input_copy = input;
    std::vector<float> inverse(static_cast<size_t>(n * channels));
    ASSERT_EQ(cufftExecC2R(c2r, input.data(), inverse.data()), CUFFT_SUCCESS);

    // |float(v) - v| <= 2^-24 |v|, plus 1e-13 of a bound on every result for the double sums.
    const auto tolerance = [](double want, double scale) {
      return std::ldexp(std::fabs(want), -24) + 1e-13 * scale;
    };
    for (int64_t ch = 0; ch < channels; ++ch) {
      std::vector<double> x(static_cast<size_t>(n));
      double scale = 0.0;  // sum |x_j| bounds every |X_k|
      for (int64_t j = 0; j < n; ++j) {
        x[j] = real[j * channels + ch];
        scale += std::fabs(x[j]);
      }
      const auto want = reference_r2c(x);
      for (int64_t k = 0; k < bins; ++k) {
        const cufftComplex got = spectrum[k * channels + ch];
        ASSERT_NEAR(got.x, want[k].real(), tolerance(want[k].real(), scale))
            << "R2C n " << n << " channel " << ch << " bin " << k;
        ASSERT_NEAR(got.y, want[k].imag(), tolerance(want[k].imag(), scale))
            << "R2C n " << n << " channel " << ch << " bin " << k;
      }
      std::vector<std::complex<double>> X(static_cast<size_t>(bins));
      double bin_scale = 0.0;  // bounds every |x_j|
      for (int64_t k = 0; k < bins; ++k) {
        const cufftComplex v = input_copy[k * channels + ch];
        X[k] = {v.x, v.y};
        bin_scale += 2.0 * std::abs(X[k]);
      }
      const auto want_y = reference_c2r(X, n);
      for (int64_t j = 0; j < n; ++j) {
        ASSERT_NEAR(inverse[j * channels + ch], want_y[j], tolerance(want_y[j], bin_scale))
            << "C2R n " << n << " channel " << ch << " sample " << j;
      }
    }
  }
}

TEST_F(CufftTest, RoundTripIsNTimesTheSignal) {
  for (const int64_t n : {int64_t{5}, int64_t{16}, int64_t{1023}}) {
    const int64_t channels = 2;
    size_t work_r = 0, work_c = 0;
    const cufftHandle r2c = strided_plan(CUFFT_R2C, n, channels, &work_r);
    const cufftHandle c2r = strided_plan(CUFFT_C2R, n, channels, &work_c);
    Aligned work(std::max(work_r, work_c));
    ASSERT_EQ(cufftSetWorkArea(r2c, work.as<void>()), CUFFT_SUCCESS);
    ASSERT_EQ(cufftSetWorkArea(c2r, work.as<void>()), CUFFT_SUCCESS);
    std::vector<float> x(static_cast<size_t>(n * channels));
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (float& v : x) v = dist(rng);
    std::vector<cufftComplex> bins(static_cast<size_t>((n / 2 + 1) * channels));
    std::vector<float> y(x.size());
    ASSERT_EQ(cufftExecR2C(r2c, x.data(), bins.data()), CUFFT_SUCCESS);
    ASSERT_EQ(cufftExecC2R(c2r, bins.data(), y.data()), CUFFT_SUCCESS);
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_NEAR(y[i], static_cast<double>(n) * x[i], 1e-4 * static_cast<double>(n))
          << "n " << n << " element " << i;
    }
    // The documentation allows C2R to overwrite its input; the emulation does.
    EXPECT_TRUE(std::isnan(bins[0].x)) << "C2R left its input intact: n " << n;
  }
}

TEST_F(CufftTest, BasicLayoutAndAutoAllocatedWorkArea) {
  cufftHandle plan = -1;
  ASSERT_EQ(cufftCreate(&plan), CUFFT_SUCCESS);
  plans_.push_back(plan);
  long long n[1] = {6};
  size_t work = 0;
  ASSERT_EQ(cufftMakePlanMany64(plan, 1, n, nullptr, 0, 0, nullptr, 0, 0, CUFFT_R2C, 2, &work),
            CUFFT_SUCCESS);
  EXPECT_GT(work, 0u);
  size_t reported = 0;
  ASSERT_EQ(cufftGetSize(plan, &reported), CUFFT_SUCCESS);
  EXPECT_EQ(reported, work);
  // Contiguous transforms: input distance n, output distance n/2 + 1.
  std::vector<float> x = {1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1};
  std::vector<cufftComplex> X(8, make_cuComplex(9, 9));
  ASSERT_EQ(cufftExecR2C(plan, x.data(), X.data()), CUFFT_SUCCESS);
  for (int k = 0; k < 4; ++k) {
    EXPECT_NEAR(X[k].x, 1.0, 1e-6);  // an impulse: flat spectrum
    EXPECT_NEAR(X[k].y, 0.0, 1e-6);
    EXPECT_NEAR(X[4 + k].x, k == 0 ? 6.0 : 0.0, 1e-5);  // a constant: all in bin 0
    EXPECT_NEAR(X[4 + k].y, 0.0, 1e-5);
  }
}

TEST_F(CufftTest, ExecWithoutTheWorkAreaWrongTypeOrDeadPlanFails) {
  size_t work = 0;
  const cufftHandle r2c = strided_plan(CUFFT_R2C, 12, 2, &work);
  ASSERT_GT(work, 0u);
  std::vector<float> x(24, 1.0f);
  std::vector<cufftComplex> X(14, make_cuComplex(3, 3));
  EXPECT_EQ(cufftExecR2C(r2c, x.data(), X.data()), CUFFT_NO_WORKSPACE);
  EXPECT_EQ(X[0].x, 3.0f) << "a failed exec wrote its output";
  // Wrong transform type for the plan.
  Aligned area(work);
  ASSERT_EQ(cufftSetWorkArea(r2c, area.as<void>()), CUFFT_SUCCESS);
  EXPECT_NE(cufftExecC2R(r2c, X.data(), x.data()), CUFFT_SUCCESS);
  EXPECT_NE(cufftExecC2C(r2c, X.data(), X.data(), CUFFT_FORWARD), CUFFT_SUCCESS);
  // A work area that overlaps the data.
  EXPECT_EQ(cufftSetWorkArea(r2c, x.data()), CUFFT_SUCCESS);
  EXPECT_EQ(cufftExecR2C(r2c, x.data(), X.data()), CUFFT_INVALID_VALUE);
  ASSERT_EQ(cufftSetWorkArea(r2c, area.as<void>()), CUFFT_SUCCESS);
  EXPECT_EQ(cufftExecR2C(r2c, x.data(), X.data()), CUFFT_SUCCESS);
  // A plan that was created but never made, and one that was destroyed.
  cufftHandle unmade = -1;
  ASSERT_EQ(cufftCreate(&unmade), CUFFT_SUCCESS);
  EXPECT_EQ(cufftExecR2C(unmade, x.data(), X.data()), CUFFT_INVALID_PLAN);
  ASSERT_EQ(cufftDestroy(unmade), CUFFT_SUCCESS);
  EXPECT_EQ(cufftExecR2C(unmade, x.data(), X.data()), CUFFT_INVALID_PLAN);
  EXPECT_EQ(cufftDestroy(unmade), CUFFT_INVALID_PLAN);
}

TEST_F(CufftTest, PlansOutsideTheEmulationAreRefusedNotApproximated) {
  cufftHandle plan = -1;
  ASSERT_EQ(cufftCreate(&plan), CUFFT_SUCCESS);
  plans_.push_back(plan);
  long long n2[2] = {8, 8};
  long long n1[1] = {8};
  long long zero[1] = {0};
  size_t work = 0;
  EXPECT_EQ(cufftMakePlanMany64(plan, 2, n2, nullptr, 1, 64, nullptr, 1, 40, CUFFT_R2C, 1, &work),
            CUFFT_NOT_SUPPORTED);
  EXPECT_EQ(cufftMakePlanMany64(plan, 1, n1, nullptr, 1, 8, nullptr, 1, 8, CUFFT_C2C, 1, &work),
            CUFFT_NOT_SUPPORTED);
  EXPECT_EQ(cufftMakePlanMany64(plan, 1, zero, nullptr, 1, 8, nullptr, 1, 8, CUFFT_R2C, 1, &work),
            CUFFT_INVALID_SIZE);
  EXPECT_EQ(cufftMakePlanMany64(plan, 0, n1, nullptr, 1, 8, nullptr, 1, 8, CUFFT_R2C, 1, &work),
            CUFFT_INVALID_SIZE);
  // Outputs of different transforms on the same elements.
  long long embed[1] = {8};
  EXPECT_NE(cufftMakePlanMany64(plan, 1, n1, embed, 1, 8, embed, 1, 1, CUFFT_R2C, 4, &work),
            CUFFT_SUCCESS);
  // The plan is still unmade and can be made properly.
  EXPECT_EQ(cufftMakePlanMany64(plan, 1, n1, nullptr, 1, 8, nullptr, 1, 5, CUFFT_R2C, 1, &work),
            CUFFT_SUCCESS);
  EXPECT_EQ(cufftMakePlanMany64(plan, 1, n1, nullptr, 1, 8, nullptr, 1, 5, CUFFT_R2C, 1, &work),
            CUFFT_INVALID_PLAN)
      << "a plan is made once";
}

// ==== cub::DeviceRadixSort::SortPairs ============================================================

template <typename Key>
void sort_pairs(const std::vector<Key>& keys, int begin_bit, int end_bit,
                std::vector<Key>* keys_out, std::vector<int32_t>* values_out) {
  const int n = static_cast<int>(keys.size());
  std::vector<int32_t> values(keys.size());
  std::iota(values.begin(), values.end(), 0);
  keys_out->assign(keys.size(), Key{0});
  values_out->assign(keys.size(), -1);
  size_t bytes = 0;
  ASSERT_EQ(
      cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys.data(), keys_out->data(), values.data(),
                                      values_out->data(), n, begin_bit, end_bit),
      cudaSuccess);
  ASSERT_GT(bytes, 0u);
  Aligned storage(bytes);
  ASSERT_EQ(
      cub::DeviceRadixSort::SortPairs(storage.as<void>(), bytes, keys.data(), keys_out->data(),
                                      values.data(), values_out->data(), n, begin_bit, end_bit),
      cudaSuccess);
}

// The order cub defines: stable, by bits [begin, end) of the key after flipping the sign bit of
// signed keys.
template <typename Key>
void expect_sorted_as_cub_defines(const std::vector<Key>& keys, int begin_bit, int end_bit) {
  using Bits = typename std::make_unsigned<Key>::type;
  const int key_bits = static_cast<int>(sizeof(Key) * 8);
  auto digit = [&](Key key) {
    uint64_t bits = static_cast<Bits>(key);
    if (std::is_signed<Key>::value) bits ^= uint64_t{1} << (key_bits - 1);
    const int width = end_bit - begin_bit;
    const uint64_t mask = width >= 64 ? ~uint64_t{0} : (uint64_t{1} << width) - 1;
    return (bits >> begin_bit) & mask;
  };
  std::vector<int32_t> order(keys.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return digit(keys[a]) < digit(keys[b]); });
  std::vector<Key> sorted;
  std::vector<int32_t> values;
  sort_pairs(keys, begin_bit, end_bit, &sorted, &values);
  ASSERT_EQ(values, order) << "bits [" << begin_bit << ", " << end_bit << ")";
  for (size_t i = 0; i < keys.size(); ++i) ASSERT_EQ(sorted[i], keys[order[i]]);
}

TEST(CubRadixSort, SortsStablyByTheFullKey) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<uint32_t> few(0, 9);
  std::vector<uint32_t> keys(500);
  for (auto& k : keys) k = few(rng);
  std::vector<uint32_t> sorted;
  std::vector<int32_t> values;
  sort_pairs(keys, 0, 32, &sorted, &values);
  for (size_t i = 1; i < keys.size(); ++i) {
    ASSERT_LE(sorted[i - 1], sorted[i]);
    if (sorted[i - 1] == sorted[i]) {
      ASSERT_LT(values[i - 1], values[i]) << "not stable at " << i;
    }
  }
  expect_sorted_as_cub_defines(keys, 0, 32);
}

TEST(CubRadixSort, SignedKeysPutNegativesFirst) {
  const std::vector<int64_t> keys = {5,    -1, INT64_MAX, 0,  INT64_MIN, -1,        7,
                                     -300, 0,  5,         -2, 1,         INT64_MIN, 3};
  std::vector<int64_t> sorted;
  std::vector<int32_t> values;
  sort_pairs(keys, 0, 64, &sorted, &values);
  std::vector<int64_t> want = keys;
  std::stable_sort(want.begin(), want.end());
  EXPECT_EQ(sorted, want);
  expect_sorted_as_cub_defines(keys, 0, 64);
  const std::vector<int32_t> keys32 = {3, -7, 0, -7, 12, INT32_MIN, INT32_MAX, -1};
  std::vector<int32_t> sorted32;
  sort_pairs(keys32, 0, 32, &sorted32, &values);
  std::vector<int32_t> want32 = keys32;
  std::stable_sort(want32.begin(), want32.end());
  EXPECT_EQ(sorted32, want32);
}

TEST(CubRadixSort, SortsByTheBitRangeOnly) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<uint32_t> any;
  std::vector<uint32_t> keys(300);
  for (auto& k : keys) k = any(rng);
  expect_sorted_as_cub_defines(keys, 4, 8);
  expect_sorted_as_cub_defines(keys, 0, 1);
  expect_sorted_as_cub_defines(keys, 31, 32);
  expect_sorted_as_cub_defines(keys, 7, 7);  // no bits: the input order
  // Signed keys: the sign-bit flip precedes the truncation.
  std::vector<int32_t> signed_keys(300);
  for (auto& k : signed_keys) k = static_cast<int32_t>(any(rng));
  expect_sorted_as_cub_defines(signed_keys, 28, 32);
  expect_sorted_as_cub_defines(signed_keys, 0, 12);
}

TEST(CubRadixSort, RejectsTooLittleStorageAndOverlappingRanges) {
  std::vector<uint32_t> keys = {3, 1, 2}, keys_out(3);
  std::vector<int32_t> values = {0, 1, 2}, values_out(3, -1);
  size_t bytes = 0;
  ASSERT_EQ(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys.data(), keys_out.data(),
                                            values.data(), values_out.data(), 3),
            cudaSuccess);
  EXPECT_EQ(values_out, std::vector<int32_t>(3, -1)) << "the sizing call did work";
  Aligned storage(bytes);
  size_t too_few = bytes - 1;
  EXPECT_EQ(cub::DeviceRadixSort::SortPairs(storage.as<void>(), too_few, keys.data(),
                                            keys_out.data(), values.data(), values_out.data(), 3),
            cudaErrorInvalidValue);
  EXPECT_EQ(cub::DeviceRadixSort::SortPairs(storage.as<void>(), bytes, keys.data(), keys.data(),
                                            values.data(), values_out.data(), 3),
            cudaErrorInvalidValue)
      << "in place is not supported";
  EXPECT_EQ(cub::DeviceRadixSort::SortPairs(storage.as<void>(), bytes, keys.data(), keys_out.data(),
                                            values.data(), values_out.data(), 3, 0, 33),
            cudaErrorInvalidValue);
  EXPECT_EQ(values_out, std::vector<int32_t>(3, -1));
  // Zero items: a positive size, and success.
  size_t zero_bytes = 0;
  ASSERT_EQ(cub::DeviceRadixSort::SortPairs(nullptr, zero_bytes, keys.data(), keys_out.data(),
                                            values.data(), values_out.data(), 0),
            cudaSuccess);
  EXPECT_GT(zero_bytes, 0u);
  Aligned zero_storage(zero_bytes);
  EXPECT_EQ(cub::DeviceRadixSort::SortPairs(zero_storage.as<void>(), zero_bytes, keys.data(),
                                            keys_out.data(), values.data(), values_out.data(), 0),
            cudaSuccess);
}

}  // namespace
