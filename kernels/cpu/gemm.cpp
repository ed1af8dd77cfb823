// C = alpha op(A) op(B) + beta C through OpenBLAS (row-major CBLAS).
#include <cblas.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "kernels/cpu/cpu_kernels.h"

namespace freqkv::cpu {

namespace {

// CBLAS takes int sizes (OpenBLAS without INTERFACE64).
int blas_int(int64_t value, const char* what) {
  if (value < 0 || value > INT_MAX) {
    throw std::invalid_argument(std::string("cpu gemm: ") + what + " = " + std::to_string(value) +
                                " is negative or exceeds the BLAS integer range");
  }
  return static_cast<int>(value);
}

// A row-major matrix stored with `cols` columns needs ld >= cols.
void check_leading_dimension(int64_t ld, int64_t cols, const char* what) {
  if (ld < cols || ld < 1) {
    throw std::invalid_argument(std::string("cpu gemm: ") + what + " = " + std::to_string(ld) +
                                " is smaller than the stored row width " + std::to_string(cols));
  }
}

void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, double alpha,
               const float* A, int lda, const float* B, int ldb, double beta, float* C, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, static_cast<float>(alpha), A, lda, B, ldb,
              static_cast<float>(beta), C, ldc);
}

void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, double alpha,
               const double* A, int lda, const double* B, int ldb, double beta, double* C,
               int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, double beta, T* C, int64_t ldc) {
  const int m = blas_int(M, "M");
  const int n = blas_int(N, "N");
  const int k = blas_int(K, "K");
  if (m == 0 || n == 0) return;  // C is empty
  check_leading_dimension(ldc, N, "ldc");
  if (k == 0) {
    // op(A) op(B) is an empty sum: C = beta C. beta = 0 overwrites (NaN in C does not survive),
    // as BLAS does.
    for (int64_t i = 0; i < M; ++i) {
      T* row = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) {
        row[j] = beta == 0.0 ? T(0) : static_cast<T>(beta * row[j]);
      }
    }
    return;
  }
  check_leading_dimension(lda, trans_a ? M : K, "lda");
  check_leading_dimension(ldb, trans_b ? K : N, "ldb");
  blas_gemm(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k,
            alpha, A, blas_int(lda, "lda"), B, blas_int(ldb, "ldb"), beta, C, blas_int(ldc, "ldc"));
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, double, const float*, int64_t,
                          const float*, int64_t, double, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

}  // namespace freqkv::cpu
