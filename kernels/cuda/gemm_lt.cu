// The CUDA backend's GEMMs through cuBLASLt (see gemm_lt.cuh).
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels/cuda/gemm_lt.cuh"

namespace freqkv::cuda {

namespace {

[[noreturn]] void throw_lt_error(const char* call, cublasStatus_t status,
                                 const std::string& shapes) {
  throw std::runtime_error(std::string("cuda-bf16 gemm: ") + call + " failed with " +
                           cublasLtGetStatusString(status) + " for " + shapes);
}

// The largest power of two dividing the address, at most 256 (what cuBLASLt asks by default).
int alignment_bytes(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  int alignment = 1;
  while (alignment < 256 && (address & static_cast<uintptr_t>(alignment)) == 0) alignment *= 2;
  return alignment;
}

}  // namespace

CudaGemm gemm_impl_from_environment() {
  const char* choice = std::getenv("FREQKV_GEMM");
  if (choice == nullptr || *choice == 0) return CudaGemm::Lt;
  const std::string value = choice;
  if (value == "lt") return CudaGemm::Lt;
  if (value == "gemmex") return CudaGemm::GemmEx;
  throw std::invalid_argument("cuda-bf16: environment FREQKV_GEMM = '" + value +
                              "': expected 'lt' (cuBLASLt, the default) or 'gemmex' "
                              "(cublasGemmEx)");
}

std::string describe_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda,
                          int64_t ldb, int64_t ldc) {
  return "trans_a = " + std::to_string(trans_a) + ", trans_b = " + std::to_string(trans_b) +
         ", M = " + std::to_string(M) + ", N = " + std::to_string(N) +
         ", K = " + std::to_string(K) + ", lda = " + std::to_string(lda) +
         ", ldb = " + std::to_string(ldb) + ", ldc = " + std::to_string(ldc);
}

LtGemm::Entry::~Entry() {
  if (layout_c != nullptr) (void)cublasLtMatrixLayoutDestroy(layout_c);
  if (layout_b != nullptr) (void)cublasLtMatrixLayoutDestroy(layout_b);
  if (layout_a != nullptr) (void)cublasLtMatrixLayoutDestroy(layout_a);
  if (operation != nullptr) (void)cublasLtMatmulDescDestroy(operation);
}

void LtGemm::init(void* workspace, size_t workspace_bytes) {
  release();
  const cublasStatus_t status = cublasLtCreate(&handle_);
  if (status != CUBLAS_STATUS_SUCCESS) {
    handle_ = nullptr;
    throw std::runtime_error(std::string("cuda-bf16: cublasLtCreate: ") +
                             cublasLtGetStatusString(status));
  }
  workspace_ = workspace;
  workspace_bytes_ = workspace_bytes;
}

void LtGemm::release() noexcept {
  cache_.clear();
  if (handle_ != nullptr) (void)cublasLtDestroy(handle_);
  handle_ = nullptr;
  workspace_ = nullptr;
  workspace_bytes_ = 0;
}

std::unique_ptr<LtGemm::Entry> LtGemm::make_entry(const Key& key) {
  const auto [trans_a, trans_b, M, N, K, lda, ldb, ldc, beta_zero, align_a, align_b, align_c] = key;
  (void)beta_zero;  // part of the key only
  const std::string shapes = describe_gemm(trans_a, trans_b, M, N, K, lda, ldb, ldc);
  const auto check = [&shapes](cublasStatus_t status, const char* call) {
    if (status != CUBLAS_STATUS_SUCCESS) throw_lt_error(call, status, shapes);
  };

  auto entry = std::make_unique<Entry>();
  check(cublasLtMatmulDescCreate(&entry->operation, CUBLAS_COMPUTE_32F, CUDA_R_32F),
        "cublasLtMatmulDescCreate");
  // Column-major C^T[N, M] = op(B)^T[N, K] op(A)^T[K, M]: cuBLASLt's A is our B, its B our A.
  const int32_t op_lt_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t op_lt_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(entry->operation, CUBLASLT_MATMUL_DESC_TRANSA, &op_lt_a,
                                       sizeof op_lt_a),
        "cublasLtMatmulDescSetAttribute(TRANSA)");
  check(cublasLtMatmulDescSetAttribute(entry->operation, CUBLASLT_MATMUL_DESC_TRANSB, &op_lt_b,
                                       sizeof op_lt_b),
        "cublasLtMatmulDescSetAttribute(TRANSB)");
  // Stored (column-major) shapes: our B is N x K as op(B)^T, stored K x N when trans_b; our A is
  // K x M as op(A)^T, stored M x K when trans_a.
  check(cublasLtMatrixLayoutCreate(&entry->layout_a, CUDA_R_16BF, trans_b ? K : N, trans_b ? N : K,
                                   ldb),
        "cublasLtMatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&entry->layout_b, CUDA_R_16BF, trans_a ? M : K, trans_a ? K : M,
                                   lda),
        "cublasLtMatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&entry->layout_c, CUDA_R_16BF, N, M, ldc),
        "cublasLtMatrixLayoutCreate(C)");

  // The preference lives only for the heuristic call.
  cublasLtMatmulPreference_t preference = nullptr;
  check(cublasLtMatmulPreferenceCreate(&preference), "cublasLtMatmulPreferenceCreate");
  struct PreferenceGuard {
    cublasLtMatmulPreference_t p;
    ~PreferenceGuard() { (void)cublasLtMatmulPreferenceDestroy(p); }
  } preference_guard{preference};
  const uint64_t max_workspace = workspace_bytes_;
  check(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &max_workspace, sizeof max_workspace),
        "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
  const uint32_t min_alignment[4] = {static_cast<uint32_t>(align_b),   // cuBLASLt's A: our B
                                     static_cast<uint32_t>(align_a),   // cuBLASLt's B: our A
                                     static_cast<uint32_t>(align_c),   // C
                                     static_cast<uint32_t>(align_c)};  // D = C
  const cublasLtMatmulPreferenceAttributes_t alignment_attributes[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i) {
    check(cublasLtMatmulPreferenceSetAttribute(preference, alignment_attributes[i],
                                               &min_alignment[i], sizeof min_alignment[i]),
          "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)");
  }

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  ++heuristic_calls_;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle_, entry->operation, entry->layout_a, entry->layout_b, entry->layout_c, entry->layout_c,
      preference, 1, &result, &found);
  // NOT_SUPPORTED: no algorithm for this configuration, which the fallback serves.
  if (status != CUBLAS_STATUS_SUCCESS && status != CUBLAS_STATUS_NOT_SUPPORTED) {
    throw_lt_error("cublasLtMatmulAlgoGetHeuristic", status, shapes);
  }
  if (status == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS &&
      result.workspaceSize <= workspace_bytes_) {
    entry->has_algorithm = true;
    entry->algorithm = result.algo;
  }
  return entry;
}

bool LtGemm::run(cudaStream_t stream, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                 const __nv_bfloat16* A, int lda, const __nv_bfloat16* B, int ldb, float beta,
                 __nv_bfloat16* C, int ldc) {
  if (handle_ == nullptr) {
    throw std::logic_error("cuda-bf16 gemm: the cuBLASLt handle is not initialised");
  }
  const Key key = std::make_tuple(trans_a, trans_b, M, N, K, lda, ldb, ldc, beta == 0.0f,
                                  alignment_bytes(A), alignment_bytes(B), alignment_bytes(C));
  // Held through the call: the entry's descriptors must outlive cublasLtMatmul's use of them,
  // and a full cache is emptied under this lock.
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = cache_.find(key);
  if (it == cache_.end()) {
    std::unique_ptr<Entry> entry = make_entry(key);
    if (cache_.size() >= kMaxEntries) cache_.clear();
    it = cache_.emplace(key, std::move(entry)).first;
  }
  const Entry& entry = *it->second;
  if (!entry.has_algorithm) return false;
  const cublasStatus_t status = cublasLtMatmul(
      handle_, entry.operation, &alpha, B, entry.layout_a, A, entry.layout_b, &beta, C,
      entry.layout_c, C, entry.layout_c, &entry.algorithm, workspace_, workspace_bytes_, stream);
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw_lt_error("cublasLtMatmul", status,
                   describe_gemm(trans_a, trans_b, M, N, K, lda, ldb, ldc));
  }
  ++matmul_calls_;
  return true;
}

}  // namespace freqkv::cuda
