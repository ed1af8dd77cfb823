// The CUDA backend's GEMMs through cuBLASLt: bf16 A, B and C, fp32 accumulation and fp32 alpha and
// beta (CUBLAS_COMPUTE_32F, scale type CUDA_R_32F), the algorithm picked by cuBLASLt's heuristic
// once per problem and then reused. CudaKernels::gemm validates the arguments, handles K = 0, and
// dispatches here or to cublasGemmEx (the fallback: when the heuristic has no algorithm, and with
// the environment FREQKV_GEMM=gemmex).
//
// Row-major to column-major: row-major C = alpha op(A) op(B) + beta C is column-major
// C^T = alpha op(B)^T op(A)^T + beta C^T, and a row-major matrix is its transpose in column-major
// with the same leading dimension; so cuBLASLt's "A" is our B and its "B" our A, with the
// transposes as given and the sizes N x M (x K).
//
// The cache: one entry per (trans_a, trans_b, M, N, K, lda, ldb, ldc, beta == 0, alignment of
// A, B and C), holding the matmul and layout descriptors and the chosen algorithm (or the fact
// that there is none). The alignment is the largest power of two dividing the address, capped at
// 256 bytes (cuBLASLt's default requirement); it goes into the heuristic's preferences
// (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES), so an algorithm chosen for 16-byte aligned
// pointers is never run on a pointer offset by one bf16. A training step repeats the same few
// shapes in every layer and step: after the first step every GEMM is one cublasLtMatmul call.
// Included by .cu files only.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "kernels/cuda/cuda_backend.h"

namespace freqkv::cuda {

// Environment FREQKV_GEMM: unset, empty or "lt" = CudaGemm::Lt, "gemmex" = CudaGemm::GemmEx;
// anything else throws std::invalid_argument naming the variable and its value.
CudaGemm gemm_impl_from_environment();

// "trans_a = 0, trans_b = 1, M = ..., N = ..., K = ..., lda = ..., ldb = ..., ldc = ...": the
// shapes named by every GEMM error message.
std::string describe_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda,
                          int64_t ldb, int64_t ldc);

class LtGemm {
 public:
  LtGemm() = default;
  ~LtGemm() { release(); }
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Creates the cuBLASLt handle on the current device. `workspace` (device memory of
  // `workspace_bytes`, 256-byte aligned) stays the caller's; it may be shared with work that is
  // ordered against every call here (CudaKernels shares it with its cuBLAS handle: both run on
  // its one stream). Throws std::runtime_error when cublasLtCreate fails.
  void init(void* workspace, size_t workspace_bytes);

  // Row-major C[M, N] = alpha op(A) op(B) + beta C on `stream`, as Kernels::gemm (beta = 0 does
  // not read C). Sizes are validated by the caller: M, N, K >= 1 and the leading dimensions at
  // least the stored row widths. Returns false, having enqueued nothing, when cuBLASLt has no
  // algorithm for the problem; throws std::runtime_error (naming the call, the cuBLAS status and
  // the shapes) when a cuBLASLt call fails.
  bool run(cudaStream_t stream, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
           const __nv_bfloat16* A, int lda, const __nv_bfloat16* B, int ldb, float beta,
           __nv_bfloat16* C, int ldc);

  // How many times the heuristic ran (once per new cache entry) and how many GEMMs cuBLASLt ran.
  int64_t heuristic_calls() const { return heuristic_calls_.load(); }
  int64_t matmul_calls() const { return matmul_calls_.load(); }

  // Destroys the cached descriptors and the handle. The caller makes sure no enqueued work still
  // uses them (CudaKernels calls it after synchronising its stream); errors are ignored.
  void release() noexcept;

 private:
  // The cache is emptied when it would grow past this (shapes that vary without end, such as
  // evaluation at many lengths, then cost a heuristic call each, as without a cache).
  static constexpr size_t kMaxEntries = 512;

  // (trans_a, trans_b, M, N, K, lda, ldb, ldc, beta == 0, alignment of A, B, C in bytes)
  using Key = std::tuple<bool, bool, int, int, int, int, int, int, bool, int, int, int>;

  // One problem's descriptors and algorithm; destroys the descriptors it holds.
  struct Entry {
    Entry() = default;
    ~Entry();
    Entry(const Entry&) = delete;
    Entry& operator=(const Entry&) = delete;

    cublasLtMatmulDesc_t operation = nullptr;
    cublasLtMatrixLayout_t layout_a = nullptr;  // cuBLASLt's A: our B
    cublasLtMatrixLayout_t layout_b = nullptr;  // cuBLASLt's B: our A
    cublasLtMatrixLayout_t layout_c = nullptr;  // C and D (in place)
    bool has_algorithm = false;
    cublasLtMatmulAlgo_t algorithm{};  // needs at most the workspace's size
  };

  // Builds the descriptors and runs the heuristic for `key`.
  std::unique_ptr<Entry> make_entry(const Key& key);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::mutex mutex_;  // guards cache_ (entries are never destroyed while a call uses them)
  std::map<Key, std::unique_ptr<Entry>> cache_;
  std::atomic<int64_t> heuristic_calls_{0};
  std::atomic<int64_t> matmul_calls_{0};
};

}  // namespace freqkv::cuda
