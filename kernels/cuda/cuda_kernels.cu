// CudaKernels: Kernels<bf16> on one CUDA device (see kernels/cuda/cuda_backend.h).
//
// This file holds the object and everything that is not a kernel: the stream, the cuBLAS handle,
// memory and host transfers, argument checks (the same as the CPU backend's, with the same
// exception types), the caches of small host-built tables (FreqKV compression matrices, RoPE
// frequencies, attention tile lists), the GEMMs' dispatch (cuBLASLt in gemm_lt.cu, cublasGemmEx)
// and the FreqKV compression. The kernels live in one .cu file per family (cuda_launchers.cuh lists
// them).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <unordered_map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/attention_checks.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_launchers.cuh"
#include "kernels/cuda/freqkv_fft.cuh"
#include "kernels/cuda/gemm_lt.cuh"
#include "kernels/freqkv_matrix.h"
#include "kernels/kernel_math.h"

namespace freqkv {

namespace {

using cuda::as_nv;
using cuda::throw_cuda_error;

// cuBLAS's recommended workspace on Hopper, shared by the cuBLAS and cuBLASLt handles (both run
// on the backend's one stream, so their uses of it are ordered).
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
// Host <-> device conversions go through a pinned buffer of this many bf16 values (8 MiB).
constexpr size_t kStagingElements = size_t{1} << 22;
// Attention tile lists kept on the device (a training step uses one block list, its forward and
// backward share it; a few more cover evaluation at other lengths).
constexpr size_t kMaxAttentionPlans = 8;

// The message is built only on failure: these checks sit on every call's path.
void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw_cuda_error(status, what);
}
void check_cuda(cudaError_t status, const char* what, size_t bytes) {
  if (status != cudaSuccess) {
    throw_cuda_error(status, std::string(what) + " (" + std::to_string(bytes) + " bytes)");
  }
}

// Rounds a double to the nearest bf16, ties to even, in one rounding: going through float would
// round twice (a double just above a bf16 tie becomes the tie as a float, then rounds to even).
// The float is made round-to-odd (truncated, last bit set when inexact), which keeps enough
// information for the final rounding to be the correct one.
uint16_t bf16_bits_from_double(double x) {
  float f = static_cast<float>(x);
  if (std::isfinite(x) && static_cast<double>(f) != x) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    bits |= 1u;
    std::memcpy(&f, &bits, sizeof f);
  }
  return bf16::from_float(f);
}

// The CPU backend's checks (kernels/attention_checks.h), plus the kernels' head size limit.
void check_cuda_attention_arguments(const std::vector<AttnBlock>& blocks, const AttnShape& shape,
                                    int64_t ld_q, int64_t ld_out, int64_t ld_kv, bool kv_disjoint,
                                    const char* where) {
  if (shape.head_dim > cuda::kMaxAttentionHeadDim) {
    throw std::invalid_argument(
        std::string(where) + ": head_dim = " + std::to_string(shape.head_dim) +
        " exceeds the CUDA kernels' " + std::to_string(cuda::kMaxAttentionHeadDim));
  }
  check_attention_arguments(blocks, shape, ld_q, ld_out, ld_kv, kv_disjoint, where);
}

bool same_blocks(const std::vector<AttnBlock>& a, const std::vector<AttnBlock>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].q_start != b[i].q_start || a[i].n_q != b[i].n_q || a[i].kv_start != b[i].kv_start ||
        a[i].n_kv != b[i].n_kv) {
      return false;
    }
  }
  return true;
}

// Sizes that go to cuBLAS as int.
int blas_int(int64_t value, const char* what) {
  if (value < 0 || value > INT_MAX) {
    throw std::invalid_argument(std::string("cuda-bf16 gemm: ") + what + " = " +
                                std::to_string(value) +
                                " is negative or exceeds the cuBLAS integer range");
  }
  return static_cast<int>(value);
}

void check_leading_dimension(int64_t ld, int64_t cols, const char* what) {
  if (ld < cols || ld < 1) {
    throw std::invalid_argument(std::string("cuda-bf16 gemm: ") + what + " = " +
                                std::to_string(ld) + " is smaller than the stored row width " +
                                std::to_string(cols));
  }
}

// ---- the backend --------------------------------------------------------------------------------

// The tiles of one block list for one tile size, on the device: query tiles, then key tiles.
struct AttentionPlan {
  std::vector<AttnBlock> blocks;
  int tile_rows = 0;
  void* device_tiles = nullptr;
  int64_t n_query_tiles = 0;
  int64_t n_key_tiles = 0;
  int64_t n_query_rows = 0;  // one past the last query row of any block

  const cuda::AttentionTile* query_tiles() const {
    return static_cast<const cuda::AttentionTile*>(device_tiles);
  }
  const cuda::AttentionTile* key_tiles() const { return query_tiles() + n_query_tiles; }
};

class CudaKernels final : public Kernels<bf16> {
 public:
  explicit CudaKernels(int device);
  ~CudaKernels() override { release(); }
  CudaKernels(const CudaKernels&) = delete;
  CudaKernels& operator=(const CudaKernels&) = delete;

  std::string name() const override { return "cuda-bf16"; }

  void* allocate_bytes(size_t bytes) override;
  void free_bytes(void* p) override;
  void copy_to_device(void* dst, const void* host_src, size_t bytes) override;
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override;
  void copy_on_device(void* dst, const void* src, size_t bytes) override;
  void fill_zero(void* dst, size_t bytes) override;
  void synchronize() override;
  void upload(bf16* dst, const float* host_src, int64_t n) override;
  void upload(bf16* dst, const double* host_src, int64_t n) override;
  void download(float* host_dst, const bf16* src, int64_t n) override;
  void download(double* host_dst, const bf16* src, int64_t n) override;

  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
            const bf16* A, int64_t lda, const bf16* B, int64_t ldb, double beta, bf16* C,
            int64_t ldc) override;
  void add(bf16* out, const bf16* a, const bf16* b, int64_t n) override {
    activate();
    cuda::add(context(), as_nv(out), as_nv(a), as_nv(b), n);
  }
  void axpy(bf16* y, double alpha, const bf16* x, int64_t n) override {
    activate();
    cuda::axpy(context(), as_nv(y), static_cast<float>(alpha), as_nv(x), n);
  }
  double sum_squares(const bf16* x, int64_t n) override;
  void scale(bf16* x, double alpha, int64_t n) override {
    activate();
    cuda::scale(context(), as_nv(x), static_cast<float>(alpha), n);
  }

  void gather_rows(bf16* dst, int64_t ld_dst, const bf16* src, int64_t ld_src, const int64_t* map,
                   int64_t n_rows, int64_t width) override {
    activate();
    cuda::gather_rows(context(), as_nv(dst), ld_dst, as_nv(src), ld_src, map, n_rows, width);
  }
  void scatter_add_rows(bf16* dsrc, int64_t ld_src, const bf16* ddst, int64_t ld_dst,
                        const int64_t* map, int64_t n_rows, int64_t width) override {
    activate();
    cuda::scatter_add_rows(context(), as_nv(dsrc), ld_src, as_nv(ddst), ld_dst, map, n_rows, width);
  }

  void embedding_forward(bf16* out, const bf16* table, const int32_t* tokens, int64_t n_tokens,
                         int64_t dim) override {
    activate();
    cuda::embedding_forward(context(), as_nv(out), as_nv(table), tokens, n_tokens, dim);
  }
  void embedding_backward(bf16* dtable, const bf16* dout, const int32_t* tokens, int64_t n_tokens,
                          int64_t dim) override {
    activate();
    cuda::embedding_backward(context(), as_nv(dtable), as_nv(dout), tokens, n_tokens, dim);
  }

  void rmsnorm_forward(bf16* out, acc_t* rstd, const bf16* x, const bf16* weight, int64_t n_rows,
                       int64_t dim, double eps) override {
    activate();
    cuda::rmsnorm_forward(context(), as_nv(out), rstd, as_nv(x), as_nv(weight), n_rows, dim,
                          static_cast<float>(eps));
  }
  void rmsnorm_backward(bf16* dx, bf16* dweight, const bf16* dout, const bf16* x,
                        const bf16* weight, const acc_t* rstd, int64_t n_rows,
                        int64_t dim) override {
    activate();
    cuda::rmsnorm_backward(context(), as_nv(dx), as_nv(dweight), as_nv(dout), as_nv(x),
                           as_nv(weight), rstd, n_rows, dim);
  }

  void rope(bf16* out, int64_t ld_out, const bf16* x, int64_t ld_x, const int32_t* positions,
            int64_t n_rows, int n_heads, int head_dim, double theta, bool inverse) override;

  void attention_forward(bf16* out, int64_t ld_out, acc_t* lse, const bf16* q, int64_t ld_q,
                         const bf16* k, const bf16* v, int64_t ld_kv,
                         const std::vector<AttnBlock>& blocks, const AttnShape& shape) override;
  void attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, int64_t ld_dout,
                          const bf16* out, const acc_t* lse, const bf16* q, int64_t ld_q,
                          const bf16* k, const bf16* v, int64_t ld_kv,
                          const std::vector<AttnBlock>& blocks, const AttnShape& shape) override;

  void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, int64_t n) override {
    activate();
    cuda::swiglu_forward(context(), as_nv(out), as_nv(gate), as_nv(up), n);
  }
  void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                       int64_t n) override {
    activate();
    cuda::swiglu_backward(context(), as_nv(dgate), as_nv(dup), as_nv(dout), as_nv(gate), as_nv(up),
                          n);
  }

  void cross_entropy(acc_t* losses, bf16* logits, int64_t ld_logits, const int32_t* targets,
                     int64_t n_rows, int64_t vocab, double grad_scale) override;
  void cross_entropy_stats(acc_t* lse, acc_t* target_logit, const bf16* logits, int64_t ld_logits,
                           const int32_t* targets, int64_t n_rows, int64_t vocab,
                           int64_t vocab_begin) override;
  void cross_entropy_grad(bf16* logits, int64_t ld_logits, const acc_t* lse, const int32_t* targets,
                          int64_t n_rows, int64_t vocab, int64_t vocab_begin,
                          double grad_scale) override;

  void freqkv_compress(bf16* out, int64_t ld_out, const bf16* in, int64_t ld_in, int64_t n_in,
                       int64_t n_out, int64_t channels) override;
  void freqkv_compress_backward(bf16* din, int64_t ld_in, const bf16* dout, int64_t ld_out,
                                int64_t n_in, int64_t n_out, int64_t channels) override;

  void adamw_update(float* master, float* m, float* v, bf16* param, const bf16* grad, int64_t n,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    int64_t step, double grad_scale) override;

  // For cuda_backend.h's functions beside the Kernels interface.
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  void set_flash_attention(bool enabled) { flash_attention_ = enabled; }
  void set_gemm(CudaGemm gemm) { gemm_ = gemm; }
  CudaGemmCounts gemm_counts() const {
    return {lt_gemm_.heuristic_calls(), lt_gemm_.matmul_calls(), gemmex_calls_.load()};
  }
  CudaMemoryStats memory_stats();
  void set_compression_impl(CompressionImpl impl) { compression_impl_ = impl; }
  void set_compression_crossover(int64_t n_in);
  void reset_peak_memory();

 private:
  // Makes this object's device current for the calling host thread (cheap when it already is).
  void activate() const {
    const cudaError_t status = cudaSetDevice(device_);
    if (status != cudaSuccess)
      throw_cuda_error(status, "selecting device " + std::to_string(device_));
  }
  cuda::LaunchContext context() const {
    return {stream_, multiprocessor_count_, stream_ordered_allocation_, error_report_};
  }
  void* device_alloc(size_t bytes, const char* what);
  cudaError_t device_free(void* p);
  // Waits for the stream, then reports a deferred error or an invalid input found on the device.
  void sync_and_check(const char* where);
  void copy_host_to_device(void* dst, const void* host_src, size_t bytes, const char* where);
  void release() noexcept;

  const bf16* compression_matrix(int64_t n_in, int64_t n_out);
  // C = alpha op(A) op(B) + beta C by cublasGemmEx (arguments validated by gemm).
  void gemm_ex(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const bf16* A,
               int lda, const bf16* B, int ldb, float beta, bf16* C, int ldc);
  // Validates freqkv_compress's arguments and says whether the cuFFT path runs them.
  bool compress_with_fft(int64_t n_in, int64_t n_out, int64_t channels, int64_t ld_in,
                         int64_t ld_out, const char* where) const;
  const double* rope_inverse_frequencies(int head_dim, double theta);
  const AttentionPlan& attention_plan(const std::vector<AttnBlock>& blocks, int tile_rows);
  // The tensor-core flash kernels serve this head size (and FREQKV_ATTENTION does not say simple).
  bool use_flash_attention(int head_dim) const {
    return flash_attention_ && cuda::flash_attention_supported(head_dim);
  }

  int device_ = 0;
  int multiprocessor_count_ = 0;
  bool stream_ordered_allocation_ = false;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_workspace_ = nullptr;  // also cuBLASLt's
  // Environment FREQKV_GEMM, read once here: unset or "lt" = cuBLASLt with its algorithm cache
  // (kernels/cuda/gemm_lt.cuh), "gemmex" = cublasGemmEx; Lt falls back to GemmEx for a problem
  // its heuristic has no algorithm for.
  CudaGemm gemm_ = cuda::gemm_impl_from_environment();
  cuda::LtGemm lt_gemm_;
  std::atomic<int64_t> gemmex_calls_{0};
  cuda::DeviceErrorReport* error_report_ = nullptr;       // device
  cuda::DeviceErrorReport* error_report_host_ = nullptr;  // pinned host copy
  uint16_t* staging_ = nullptr;                           // pinned, kStagingElements bf16
  double* scalar_host_ = nullptr;                         // pinned, sum_squares' result
  std::string deferred_error_;  // a failure in free_bytes, which must not throw

  // What device_alloc handed out and device_free has not taken back, by pointer (for
  // memory_stats; a separate mutex because device_alloc runs under cache_mutex_).
  std::mutex allocation_mutex_;
  std::unordered_map<void*, size_t> allocation_sizes_;
  size_t allocated_bytes_ = 0;
  size_t peak_allocated_bytes_ = 0;

  std::mutex cache_mutex_;
  std::map<std::pair<int64_t, int64_t>, bf16*> compression_matrices_;
  std::map<std::pair<int, double>, double*> rope_tables_;
  std::list<AttentionPlan> attention_plans_;  // most recently used first
  // FreqKV compression: GEMM with P or cuFFT DCTs (kernels/compression_impl.h).
  CompressionImpl compression_impl_ = CompressionImpl::Auto;
  int64_t compression_crossover_ = cuda::compression_crossover_from_environment();
  cuda::FftCompression fft_compression_;  // its cuFFT plans
  // Environment FREQKV_ATTENTION, read once here: unset or "flash" = the flash kernels where they
  // serve the head size (kernels/cuda/flash_attention.cu), "simple" = always the CUDA-core kernels
  // (kernels/cuda/attention.cu).
  bool flash_attention_ = true;
};

CudaKernels::CudaKernels(int device) : device_(device) {
  if (const char* choice = std::getenv("FREQKV_ATTENTION"); choice != nullptr && *choice != 0) {
    const std::string value = choice;
    if (value != "flash" && value != "simple") {
      throw std::invalid_argument("cuda-bf16: environment FREQKV_ATTENTION = '" + value +
                                  "': expected 'flash' (the default) or 'simple'");
    }
    flash_attention_ = value == "flash";
  }
  try {
    activate();
    check_cuda(
        cudaDeviceGetAttribute(&multiprocessor_count_, cudaDevAttrMultiProcessorCount, device),
        "querying the multiprocessor count");
    int pools_supported = 0;
    check_cuda(cudaDeviceGetAttribute(&pools_supported, cudaDevAttrMemoryPoolsSupported, device),
               "querying memory pool support");
    stream_ordered_allocation_ = pools_supported != 0;
    if (stream_ordered_allocation_) {
      // By default the pool returns freed memory to the driver at every synchronisation; keeping
      // it makes the per-call scratch allocations (and Buffer churn) cheap.
      cudaMemPool_t pool = nullptr;
      check_cuda(cudaDeviceGetDefaultMemPool(&pool, device), "getting the default memory pool");
      uint64_t keep_everything = UINT64_MAX;
      check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_everything),
                 "setting the memory pool's release threshold");
    }
    // Non-blocking: the legacy default stream (used by other libraries) does not serialise it.
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "creating the stream");

    const cublasStatus_t created = cublasCreate(&cublas_);
    if (created != CUBLAS_STATUS_SUCCESS) {
      cublas_ = nullptr;
      throw std::runtime_error(std::string("cuda-bf16: cublasCreate: ") +
                               cublasGetStatusString(created));
    }
    check_cuda(cudaMalloc(&cublas_workspace_, kCublasWorkspaceBytes),
               "allocating the cuBLAS workspace");
    if (cublasSetStream(cublas_, stream_) != CUBLAS_STATUS_SUCCESS ||
        cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspaceBytes) !=
            CUBLAS_STATUS_SUCCESS) {
      throw std::runtime_error("cuda-bf16: cannot attach the stream and workspace to cuBLAS");
    }
    lt_gemm_.init(cublas_workspace_, kCublasWorkspaceBytes);

    check_cuda(cudaMalloc(&error_report_, sizeof(cuda::DeviceErrorReport)),
               "allocating the error report");
    check_cuda(cudaMemset(error_report_, 0, sizeof(cuda::DeviceErrorReport)),
               "clearing the error report");
    check_cuda(cudaMallocHost(&error_report_host_, sizeof(cuda::DeviceErrorReport)),
               "allocating pinned host memory");
    std::memset(error_report_host_, 0, sizeof(cuda::DeviceErrorReport));
    check_cuda(cudaMallocHost(&staging_, kStagingElements * sizeof(uint16_t)),
               "allocating the pinned staging buffer");
    check_cuda(cudaMallocHost(&scalar_host_, sizeof(double)), "allocating pinned host memory");
  } catch (...) {
    release();
    throw;
  }
}

// Frees everything; errors are ignored (it runs in the destructor and on a failed construction).
void CudaKernels::release() noexcept {
  if (cudaSetDevice(device_) != cudaSuccess) return;
  if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
  for (auto& entry : compression_matrices_) (void)device_free(entry.second);
  compression_matrices_.clear();
  for (auto& entry : rope_tables_) (void)device_free(entry.second);
  rope_tables_.clear();
  for (auto& plan : attention_plans_) (void)device_free(plan.device_tiles);
  attention_plans_.clear();
  fft_compression_.release();
  if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
  lt_gemm_.release();
  if (cublas_ != nullptr) (void)cublasDestroy(cublas_);
  cublas_ = nullptr;
  if (cublas_workspace_ != nullptr) (void)cudaFree(cublas_workspace_);
  cublas_workspace_ = nullptr;
  if (error_report_ != nullptr) (void)cudaFree(error_report_);
  error_report_ = nullptr;
  if (error_report_host_ != nullptr) (void)cudaFreeHost(error_report_host_);
  error_report_host_ = nullptr;
  if (staging_ != nullptr) (void)cudaFreeHost(staging_);
  staging_ = nullptr;
  if (scalar_host_ != nullptr) (void)cudaFreeHost(scalar_host_);
  scalar_host_ = nullptr;
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  stream_ = nullptr;
}

void* CudaKernels::device_alloc(size_t bytes, const char* what) {
  void* p = nullptr;
  const cudaError_t status =
      stream_ordered_allocation_ ? cudaMallocAsync(&p, bytes, stream_) : cudaMalloc(&p, bytes);
  if (status != cudaSuccess) {
    size_t free_bytes = 0;
    size_t total_bytes = 0;
    (void)cudaGetLastError();
    (void)cudaMemGetInfo(&free_bytes, &total_bytes);
    throw_cuda_error(status, std::string(what) + ": allocating " + std::to_string(bytes) +
                                 " bytes on device " + std::to_string(device_) + " (" +
                                 std::to_string(free_bytes) + " of " + std::to_string(total_bytes) +
                                 " bytes free)");
  }
  std::lock_guard<std::mutex> lock(allocation_mutex_);
  allocation_sizes_[p] = bytes;
  allocated_bytes_ += bytes;
  peak_allocated_bytes_ = std::max(peak_allocated_bytes_, allocated_bytes_);
  return p;
}

cudaError_t CudaKernels::device_free(void* p) {
  if (p == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(allocation_mutex_);
    const auto it = allocation_sizes_.find(p);
    if (it != allocation_sizes_.end()) {
      allocated_bytes_ -= it->second;
      allocation_sizes_.erase(it);
    }
  }
  if (stream_ordered_allocation_) return cudaFreeAsync(p, stream_);
  // cudaFree of memory that queued kernels still use: wait for them first.
  const cudaError_t status = cudaStreamSynchronize(stream_);
  return status != cudaSuccess ? status : cudaFree(p);
}

void CudaKernels::sync_and_check(const char* where) {
  if (!deferred_error_.empty()) {
    const std::string message = std::move(deferred_error_);
    deferred_error_.clear();
    throw std::runtime_error(message);
  }
  cudaError_t status =
      cudaMemcpyAsync(error_report_host_, error_report_, sizeof(cuda::DeviceErrorReport),
                      cudaMemcpyDeviceToHost, stream_);
  if (status == cudaSuccess) status = cudaStreamSynchronize(stream_);
  if (status != cudaSuccess) {
    throw_cuda_error(status, std::string(where) +
                                 ": waiting for the device (the fault may come from any kernel "
                                 "enqueued since the previous wait)");
  }
  const cuda::DeviceErrorReport report = *error_report_host_;
  if (report.code == cuda::kNoInvalidInput) return;
  std::memset(error_report_host_, 0, sizeof(cuda::DeviceErrorReport));
  check_cuda(cudaMemsetAsync(error_report_, 0, sizeof(cuda::DeviceErrorReport), stream_),
             "clearing the error report");
  const std::string seen = " (found on the device, reported by " + std::string(where) + ")";
  switch (report.code) {
    case cuda::kNegativeTokenInEmbeddingForward:
    case cuda::kNegativeTokenInEmbeddingBackward:
      throw std::out_of_range(std::string("cuda-bf16 ") +
                              (report.code == cuda::kNegativeTokenInEmbeddingForward
                                   ? "embedding_forward"
                                   : "embedding_backward") +
                              ": token " + std::to_string(report.row) + " has negative id " +
                              std::to_string(report.value) + seen);
    case cuda::kTargetOutsideVocabulary:
      throw std::out_of_range("cuda-bf16 cross_entropy: target of row " +
                              std::to_string(report.row) + " is " + std::to_string(report.value) +
                              ", outside the vocabulary of " + std::to_string(report.bound) + seen);
    default:
      throw std::logic_error("cuda-bf16: unknown device error report code " +
                             std::to_string(report.code) + seen);
  }
}

void CudaKernels::copy_host_to_device(void* dst, const void* host_src, size_t bytes,
                                      const char* where) {
  if (bytes == 0) return;
  const cudaError_t status = cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_);
  if (status != cudaSuccess) {
    throw_cuda_error(
        status, std::string(where) + ": copying " + std::to_string(bytes) + " bytes to the device");
  }
  // The host array may be reused as soon as we return.
  sync_and_check(where);
}

// ---- memory -------------------------------------------------------------------------------------

CudaMemoryStats CudaKernels::memory_stats() {
  activate();
  CudaMemoryStats stats;
  {
    std::lock_guard<std::mutex> lock(allocation_mutex_);
    stats.allocated_bytes = allocated_bytes_;
    stats.peak_allocated_bytes = peak_allocated_bytes_;
  }
  if (stream_ordered_allocation_) {
    cudaMemPool_t pool = nullptr;
    check_cuda(cudaDeviceGetDefaultMemPool(&pool, device_), "memory_stats: getting the memory pool");
    uint64_t high = 0;
    check_cuda(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high),
               "memory_stats: reading the pool's high-water mark");
    stats.pool_peak_bytes = static_cast<size_t>(high);
  }
  size_t free_bytes = 0;
  check_cuda(cudaMemGetInfo(&free_bytes, &stats.device_total_bytes), "memory_stats: cudaMemGetInfo");
  stats.device_used_bytes = stats.device_total_bytes - free_bytes;
  return stats;
}

void CudaKernels::reset_peak_memory() {
  activate();
  // Frees enqueued before the reset must have happened, or the new peak would count them.
  sync_and_check("reset_peak_memory");
  {
    std::lock_guard<std::mutex> lock(allocation_mutex_);
    peak_allocated_bytes_ = allocated_bytes_;
  }
  if (stream_ordered_allocation_) {
    cudaMemPool_t pool = nullptr;
    check_cuda(cudaDeviceGetDefaultMemPool(&pool, device_),
               "reset_peak_memory: getting the memory pool");
    // The only value the runtime accepts for a high-water mark: restart it at the current use.
    uint64_t zero = 0;
    check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero),
               "reset_peak_memory: resetting the pool's high-water mark");
  }
}

void* CudaKernels::allocate_bytes(size_t bytes) {
  activate();
  // Zero bytes still get a distinct live pointer, as from the CPU backend.
  const size_t size = std::max<size_t>(bytes, 1);
  void* p = device_alloc(size, "allocate_bytes");
  const cudaError_t status = cudaMemsetAsync(p, 0, size, stream_);
  if (status != cudaSuccess) {
    (void)device_free(p);
    throw_cuda_error(status, "allocate_bytes: zero-filling " + std::to_string(size) + " bytes");
  }
  return p;
}

void CudaKernels::free_bytes(void* p) {
  if (p == nullptr) return;
  // Called from Buffer's deleter, which must not throw: a failure is kept for the next wait.
  if (cudaSetDevice(device_) != cudaSuccess) return;
  const cudaError_t status = device_free(p);
  if (status != cudaSuccess && deferred_error_.empty()) {
    deferred_error_ = std::string("cuda-bf16: free_bytes: ") + cudaGetErrorName(status) + " (" +
                      cudaGetErrorString(status) + ")";
  }
}

void CudaKernels::copy_to_device(void* dst, const void* host_src, size_t bytes) {
  activate();
  copy_host_to_device(dst, host_src, bytes, "copy_to_device");
}

void CudaKernels::copy_to_host(void* host_dst, const void* src, size_t bytes) {
  activate();
  if (bytes > 0) {
    check_cuda(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_),
               "copy_to_host", bytes);
  }
  sync_and_check("copy_to_host");
}

void CudaKernels::copy_on_device(void* dst, const void* src, size_t bytes) {
  activate();
  if (bytes == 0 || dst == src) return;
  const auto* d = static_cast<const char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const bool overlap = d < s + bytes && s < d + bytes;
  if (!overlap) {
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_),
               "copy_on_device", bytes);
    return;
  }
  // memmove semantics: cudaMemcpy's result is undefined for overlapping ranges.
  cuda::ScratchBuffer temporary(context(), bytes, "copy_on_device of overlapping ranges");
  check_cuda(cudaMemcpyAsync(temporary.as<void>(), src, bytes, cudaMemcpyDeviceToDevice, stream_),
             "copy_on_device: copying overlapping ranges to a temporary", bytes);
  check_cuda(cudaMemcpyAsync(dst, temporary.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream_),
             "copy_on_device: copying overlapping ranges from a temporary", bytes);
}

void CudaKernels::fill_zero(void* dst, size_t bytes) {
  activate();
  if (bytes == 0) return;
  check_cuda(cudaMemsetAsync(dst, 0, bytes, stream_), "fill_zero", bytes);
}

void CudaKernels::synchronize() {
  activate();
  sync_and_check("synchronize");
}

// Host arrays are converted to and from bf16 on the host (round to nearest even, as bf16 does),
// chunk by chunk through the pinned staging buffer: half the bytes cross the bus, and no
// device memory is needed for the conversion.
void CudaKernels::upload(bf16* dst, const float* host_src, int64_t n) {
  activate();
  for (int64_t offset = 0; offset < n; offset += static_cast<int64_t>(kStagingElements)) {
    const int64_t count = std::min<int64_t>(n - offset, static_cast<int64_t>(kStagingElements));
    for (int64_t i = 0; i < count; ++i) staging_[i] = bf16::from_float(host_src[offset + i]);
    copy_host_to_device(dst + offset, staging_, static_cast<size_t>(count) * sizeof(bf16),
                        "upload");
  }
}

void CudaKernels::upload(bf16* dst, const double* host_src, int64_t n) {
  activate();
  for (int64_t offset = 0; offset < n; offset += static_cast<int64_t>(kStagingElements)) {
    const int64_t count = std::min<int64_t>(n - offset, static_cast<int64_t>(kStagingElements));
    for (int64_t i = 0; i < count; ++i) staging_[i] = bf16_bits_from_double(host_src[offset + i]);
    copy_host_to_device(dst + offset, staging_, static_cast<size_t>(count) * sizeof(bf16),
                        "upload");
  }
}

void CudaKernels::download(float* host_dst, const bf16* src, int64_t n) {
  activate();
  for (int64_t offset = 0; offset < n; offset += static_cast<int64_t>(kStagingElements)) {
    const int64_t count = std::min<int64_t>(n - offset, static_cast<int64_t>(kStagingElements));
    copy_to_host(staging_, src + offset, static_cast<size_t>(count) * sizeof(bf16));
    for (int64_t i = 0; i < count; ++i) host_dst[offset + i] = bf16::to_float(staging_[i]);
  }
}

void CudaKernels::download(double* host_dst, const bf16* src, int64_t n) {
  activate();
  for (int64_t offset = 0; offset < n; offset += static_cast<int64_t>(kStagingElements)) {
    const int64_t count = std::min<int64_t>(n - offset, static_cast<int64_t>(kStagingElements));
    copy_to_host(staging_, src + offset, static_cast<size_t>(count) * sizeof(bf16));
    for (int64_t i = 0; i < count; ++i) host_dst[offset + i] = bf16::to_float(staging_[i]);
  }
}

// ---- dense algebra ------------------------------------------------------------------------------

// Row-major C = alpha op(A) op(B) + beta C is column-major C^T = alpha op(B)^T op(A)^T + beta C^T,
// and a row-major matrix is its transpose in column-major with the same leading dimension: so
// cuBLAS gets B first, then A, with the transposes as given and the sizes N, M (cuBLASLt the
// same, kernels/cuda/gemm_lt.cuh). cuBLASLt runs it unless FREQKV_GEMM=gemmex (set_cuda_gemm) or
// its heuristic has no algorithm for the problem; then cublasGemmEx does.
void CudaKernels::gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
                       const bf16* A, int64_t lda, const bf16* B, int64_t ldb, double beta, bf16* C,
                       int64_t ldc) {
  activate();
  const int m = blas_int(M, "M");
  const int n = blas_int(N, "N");
  const int k = blas_int(K, "K");
  if (m == 0 || n == 0) return;  // C is empty
  check_leading_dimension(ldc, N, "ldc");
  if (k == 0) {
    // An empty sum: C = beta C, with beta = 0 overwriting (NaN does not survive), as BLAS does.
    cuda::scale_matrix(context(), as_nv(C), ldc, M, N, static_cast<float>(beta));
    return;
  }
  check_leading_dimension(lda, trans_a ? M : K, "lda");
  check_leading_dimension(ldb, trans_b ? K : N, "ldb");
  const int lda_i = blas_int(lda, "lda");
  const int ldb_i = blas_int(ldb, "ldb");
  const int ldc_i = blas_int(ldc, "ldc");
  const float alpha_f = static_cast<float>(alpha);
  const float beta_f = static_cast<float>(beta);
  if (gemm_ == CudaGemm::Lt && lt_gemm_.run(stream_, trans_a, trans_b, m, n, k, alpha_f, as_nv(A),
                                            lda_i, as_nv(B), ldb_i, beta_f, as_nv(C), ldc_i)) {
    return;
  }
  gemm_ex(trans_a, trans_b, m, n, k, alpha_f, A, lda_i, B, ldb_i, beta_f, C, ldc_i);
}

void CudaKernels::gemm_ex(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                          const bf16* A, int lda, const bf16* B, int ldb, float beta, bf16* C,
                          int ldc) {
  const cublasStatus_t status = cublasGemmEx(
      cublas_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k,
      &alpha, B, CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda, &beta, C, CUDA_R_16BF, ldc,
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("cuda-bf16 gemm: cublasGemmEx failed with ") +
                             cublasGetStatusString(status) + " for " +
                             cuda::describe_gemm(trans_a, trans_b, m, n, k, lda, ldb, ldc));
  }
  ++gemmex_calls_;
}

double CudaKernels::sum_squares(const bf16* x, int64_t n) {
  activate();
  if (n <= 0) return 0.0;
  cuda::ScratchBuffer result(context(), sizeof(double), "sum_squares result");
  cuda::sum_squares(context(), as_nv(x), n, result.as<double>());
  check_cuda(cudaMemcpyAsync(scalar_host_, result.as<double>(), sizeof(double),
                             cudaMemcpyDeviceToHost, stream_),
             "sum_squares: copying the result");
  sync_and_check("sum_squares");
  return *scalar_host_;
}

// ---- RoPE ---------------------------------------------------------------------------------------

const double* CudaKernels::rope_inverse_frequencies(int head_dim, double theta) {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  const auto key = std::make_pair(head_dim, theta);
  auto it = rope_tables_.find(key);
  if (it == rope_tables_.end()) {
    std::vector<double> inv_freq(static_cast<size_t>(head_dim / 2));
    for (int i = 0; i < head_dim / 2; ++i) {
      inv_freq[static_cast<size_t>(i)] = rope_inv_freq(i, head_dim, theta);
    }
    auto* table = static_cast<double*>(
        device_alloc(inv_freq.size() * sizeof(double), "rope frequency table"));
    try {
      copy_host_to_device(table, inv_freq.data(), inv_freq.size() * sizeof(double), "rope");
    } catch (...) {
      (void)device_free(table);
      throw;
    }
    it = rope_tables_.emplace(key, table).first;
  }
  return it->second;
}

void CudaKernels::rope(bf16* out, int64_t ld_out, const bf16* x, int64_t ld_x,
                       const int32_t* positions, int64_t n_rows, int n_heads, int head_dim,
                       double theta, bool inverse) {
  activate();
  if (head_dim <= 0 || head_dim % 2 != 0 || n_heads <= 0) {
    throw std::invalid_argument(
        "cuda-bf16 rope: need n_heads > 0 and an even head_dim > 0, got n_heads = " +
        std::to_string(n_heads) + ", head_dim = " + std::to_string(head_dim));
  }
  const int64_t width = static_cast<int64_t>(n_heads) * head_dim;
  if (ld_out < width || ld_x < width) {
    throw std::invalid_argument("cuda-bf16 rope: ld_out = " + std::to_string(ld_out) +
                                " and ld_x = " + std::to_string(ld_x) +
                                " must be >= n_heads * head_dim = " + std::to_string(width));
  }
  // In place means row for row: with different strides a row's output would overwrite input
  // rows that other threads have not read yet.
  if (out == x && ld_out != ld_x) {
    throw std::invalid_argument("cuda-bf16 rope: in place (out == x) needs ld_out == ld_x, got " +
                                std::to_string(ld_out) + " and " + std::to_string(ld_x));
  }
  if (n_rows <= 0) return;
  const double* inv_freq = rope_inverse_frequencies(head_dim, theta);
  cuda::rope(context(), as_nv(out), ld_out, as_nv(x), ld_x, positions, n_rows, n_heads, head_dim,
             inv_freq, inverse);
}

// ---- attention ----------------------------------------------------------------------------------

const AttentionPlan& CudaKernels::attention_plan(const std::vector<AttnBlock>& blocks,
                                                 int tile_rows) {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  for (auto it = attention_plans_.begin(); it != attention_plans_.end(); ++it) {
    if (it->tile_rows == tile_rows && same_blocks(it->blocks, blocks)) {
      attention_plans_.splice(attention_plans_.begin(), attention_plans_, it);
      return attention_plans_.front();
    }
  }

  AttentionPlan plan;
  plan.blocks = blocks;
  plan.tile_rows = tile_rows;
  std::vector<cuda::AttentionTile> tiles = flash::make_query_tiles(blocks, tile_rows);
  for (const AttnBlock& b : blocks) {
    if (b.n_q > 0) plan.n_query_rows = std::max(plan.n_query_rows, b.q_start + b.n_q);
  }
  plan.n_query_tiles = static_cast<int64_t>(tiles.size());
  const std::vector<cuda::AttentionTile> key_tiles = flash::make_key_tiles(blocks, tile_rows);
  tiles.insert(tiles.end(), key_tiles.begin(), key_tiles.end());
  plan.n_key_tiles = static_cast<int64_t>(tiles.size()) - plan.n_query_tiles;
  const size_t bytes = tiles.size() * sizeof(cuda::AttentionTile);
  if (bytes > 0) {
    plan.device_tiles = device_alloc(bytes, "attention tile list");
    try {
      copy_host_to_device(plan.device_tiles, tiles.data(), bytes, "attention tile list");
    } catch (...) {
      (void)device_free(plan.device_tiles);
      throw;
    }
  }
  attention_plans_.push_front(std::move(plan));
  if (attention_plans_.size() > kMaxAttentionPlans) {
    // Stream-ordered: kernels already enqueued with these tiles still see them.
    (void)device_free(attention_plans_.back().device_tiles);
    attention_plans_.pop_back();
  }
  return attention_plans_.front();
}

void CudaKernels::attention_forward(bf16* out, int64_t ld_out, acc_t* lse, const bf16* q,
                                    int64_t ld_q, const bf16* k, const bf16* v, int64_t ld_kv,
                                    const std::vector<AttnBlock>& blocks, const AttnShape& shape) {
  activate();
  check_cuda_attention_arguments(blocks, shape, ld_q, ld_out, ld_kv, /*kv_disjoint=*/false,
                            "cuda-bf16 attention_forward");
  if (use_flash_attention(shape.head_dim)) {
    const AttentionPlan& plan = attention_plan(blocks, flash::kTileRows);
    cuda::flash_attention_forward(context(), as_nv(out), ld_out, lse, as_nv(q), ld_q, as_nv(k),
                                  as_nv(v), ld_kv, plan.query_tiles(), plan.n_query_tiles, shape);
    return;
  }
  const AttentionPlan& plan = attention_plan(blocks, cuda::attention_tile_rows(shape.head_dim));
  cuda::attention_forward(context(), as_nv(out), ld_out, lse, as_nv(q), ld_q, as_nv(k), as_nv(v),
                          ld_kv, plan.query_tiles(), plan.n_query_tiles, shape);
}

void CudaKernels::attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout,
                                     int64_t ld_dout, const bf16* out, const acc_t* lse,
                                     const bf16* q, int64_t ld_q, const bf16* k, const bf16* v,
                                     int64_t ld_kv, const std::vector<AttnBlock>& blocks,
                                     const AttnShape& shape) {
  activate();
  // As on the CPU: `out` has the layout of its gradient (ld_dout), dq that of q (ld_q); key
  // ranges must be disjoint since dk/dv are overwritten block by block.
  check_cuda_attention_arguments(blocks, shape, ld_q, ld_dout, ld_kv, /*kv_disjoint=*/true,
                            "cuda-bf16 attention_backward");
  if (use_flash_attention(shape.head_dim)) {
    const AttentionPlan& plan = attention_plan(blocks, flash::kTileRows);
    cuda::flash_attention_backward(context(), as_nv(dq), as_nv(dk), as_nv(dv), as_nv(dout),
                                   ld_dout, as_nv(out), lse, as_nv(q), ld_q, as_nv(k), as_nv(v),
                                   ld_kv, plan.query_tiles(), plan.n_query_tiles,
                                   plan.key_tiles(), plan.n_key_tiles, plan.n_query_rows, shape);
    return;
  }
  const AttentionPlan& plan = attention_plan(blocks, cuda::attention_tile_rows(shape.head_dim));
  cuda::attention_backward(context(), as_nv(dq), as_nv(dk), as_nv(dv), as_nv(dout), ld_dout,
                           as_nv(out), lse, as_nv(q), ld_q, as_nv(k), as_nv(v), ld_kv,
                           plan.query_tiles(), plan.n_query_tiles, plan.key_tiles(),
                           plan.n_key_tiles, plan.n_query_rows, shape);
}

// ---- cross-entropy ------------------------------------------------------------------------------

void CudaKernels::cross_entropy(acc_t* losses, bf16* logits, int64_t ld_logits,
                                const int32_t* targets, int64_t n_rows, int64_t vocab,
                                double grad_scale) {
  activate();
  if (vocab < 1 || ld_logits < vocab) {
    throw std::invalid_argument(
        "cuda-bf16 cross_entropy: need vocab >= 1 and ld_logits >= vocab, got vocab = " +
        std::to_string(vocab) + ", ld_logits = " + std::to_string(ld_logits));
  }
  cuda::cross_entropy(context(), losses, as_nv(logits), ld_logits, targets, n_rows, vocab,
                      static_cast<float>(grad_scale), grad_scale != 0.0);
}

// Vocabulary-parallel cross-entropy: the same preconditions as the CPU backend's.
void CudaKernels::cross_entropy_stats(acc_t* lse, acc_t* target_logit, const bf16* logits,
                                      int64_t ld_logits, const int32_t* targets, int64_t n_rows,
                                      int64_t vocab, int64_t vocab_begin) {
  activate();
  if (vocab < 1 || ld_logits < vocab) {
    throw std::invalid_argument(
        "cuda-bf16 cross_entropy_stats: need vocab >= 1 and ld_logits >= vocab, got vocab = " +
        std::to_string(vocab) + ", ld_logits = " + std::to_string(ld_logits));
  }
  cuda::cross_entropy_stats(context(), lse, target_logit, as_nv(logits), ld_logits, targets, n_rows,
                            vocab, vocab_begin);
}

void CudaKernels::cross_entropy_grad(bf16* logits, int64_t ld_logits, const acc_t* lse,
                                     const int32_t* targets, int64_t n_rows, int64_t vocab,
                                     int64_t vocab_begin, double grad_scale) {
  activate();
  if (vocab < 0 || ld_logits < vocab) {
    throw std::invalid_argument(
        "cuda-bf16 cross_entropy_grad: need vocab >= 0 and ld_logits >= vocab, got vocab = " +
        std::to_string(vocab) + ", ld_logits = " + std::to_string(ld_logits));
  }
  cuda::cross_entropy_grad(context(), as_nv(logits), ld_logits, lse, targets, n_rows, vocab,
                           vocab_begin, static_cast<float>(grad_scale));
}

// ---- FreqKV compression -------------------------------------------------------------------------

const bf16* CudaKernels::compression_matrix(int64_t n_in, int64_t n_out) {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  const auto key = std::make_pair(n_in, n_out);
  auto it = compression_matrices_.find(key);
  if (it == compression_matrices_.end()) {
    // Built in double on the host (it validates 1 <= n_out <= n_in), rounded to bf16 once.
    const std::vector<double> p = freqkv_compression_matrix(n_in, n_out);
    std::vector<bf16> rounded(p.size());
    for (size_t i = 0; i < p.size(); ++i) rounded[i].bits = bf16_bits_from_double(p[i]);
    auto* matrix = static_cast<bf16*>(
        device_alloc(rounded.size() * sizeof(bf16), "FreqKV compression matrix"));
    try {
      copy_host_to_device(matrix, rounded.data(), rounded.size() * sizeof(bf16), "freqkv_compress");
    } catch (...) {
      (void)device_free(matrix);
      throw;
    }
    it = compression_matrices_.emplace(key, matrix).first;
  }
  return it->second;
}

void CudaKernels::set_compression_crossover(int64_t n_in) {
  if (n_in < 1) {
    throw std::invalid_argument("cuda-bf16: the FreqKV compression crossover must be >= 1, got " +
                                std::to_string(n_in));
  }
  compression_crossover_ = n_in;
}

bool CudaKernels::compress_with_fft(int64_t n_in, int64_t n_out, int64_t channels, int64_t ld_in,
                                    int64_t ld_out, const char* where) const {
  if (n_out < 1 || n_out > n_in || channels < 0 || ld_in < std::max<int64_t>(channels, 1) ||
      ld_out < std::max<int64_t>(channels, 1)) {
    throw std::invalid_argument(
        std::string("cuda-bf16 ") + where + ": need 1 <= n_out <= n_in, channels >= 0 and " +
        "leading dimensions >= max(channels, 1), got n_in = " + std::to_string(n_in) +
        ", n_out = " + std::to_string(n_out) + ", channels = " + std::to_string(channels) +
        ", ld_in = " + std::to_string(ld_in) + ", ld_out = " + std::to_string(ld_out));
  }
  switch (compression_impl_) {
    case CompressionImpl::Gemm:
      return false;
    case CompressionImpl::Fft:
      return true;
    case CompressionImpl::Auto:
      break;
  }
  return n_in >= compression_crossover_;
}

void CudaKernels::freqkv_compress(bf16* out, int64_t ld_out, const bf16* in, int64_t ld_in,
                                  int64_t n_in, int64_t n_out, int64_t channels) {
  activate();
  if (compress_with_fft(n_in, n_out, channels, ld_in, ld_out, "freqkv_compress")) {
    if (channels > 0) {
      fft_compression_.forward(context(), as_nv(out), ld_out, as_nv(in), ld_in, n_in, n_out,
                               channels);
    }
    return;
  }
  const bf16* p = compression_matrix(n_in, n_out);
  // out[L, C] = P[L, N] in[N, C]
  gemm(false, false, n_out, channels, n_in, 1.0, p, n_in, in, ld_in, 0.0, out, ld_out);
}

void CudaKernels::freqkv_compress_backward(bf16* din, int64_t ld_in, const bf16* dout,
                                           int64_t ld_out, int64_t n_in, int64_t n_out,
                                           int64_t channels) {
  activate();
  if (compress_with_fft(n_in, n_out, channels, ld_in, ld_out, "freqkv_compress_backward")) {
    if (channels > 0) {
      fft_compression_.backward(context(), as_nv(din), ld_in, as_nv(dout), ld_out, n_in, n_out,
                                channels);
    }
    return;
  }
  const bf16* p = compression_matrix(n_in, n_out);
  // din[N, C] += P^T[N, L] dout[L, C]; P is stored L x N, hence trans_a with lda = N.
  gemm(true, false, n_in, channels, n_out, 1.0, p, n_in, dout, ld_out, 1.0, din, ld_in);
}

// ---- optimiser ----------------------------------------------------------------------------------

void CudaKernels::adamw_update(float* master, float* m, float* v, bf16* param, const bf16* grad,
                               int64_t n, double lr, double beta1, double beta2, double eps,
                               double weight_decay, int64_t step, double grad_scale) {
  activate();
  if (step < 1) {
    throw std::invalid_argument(
        "cuda-bf16 adamw_update: step must be >= 1 (bias correction), got " + std::to_string(step));
  }
  // The scalars as the CPU backend computes them: in double, then rounded to fp32.
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  cuda::AdamWScalars scalars;
  scalars.decay = static_cast<float>(1.0 - lr * weight_decay);
  scalars.lerp_weight = static_cast<float>(1.0 - beta1);
  scalars.beta2 = static_cast<float>(beta2);
  scalars.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  scalars.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  scalars.eps = static_cast<float>(eps);
  scalars.neg_step_size = static_cast<float>(-lr / bias_correction1);
  scalars.grad_scale = grad_scale;
  cuda::adamw_update(context(), master, m, v, as_nv(param), as_nv(grad), n, scalars);
}

CudaKernels& as_cuda_kernels(Kernels<bf16>& kernels, const char* caller) {
  auto* cuda = dynamic_cast<CudaKernels*>(&kernels);
  if (cuda == nullptr) {
    throw std::invalid_argument(std::string(caller) + ": the backend '" + kernels.name() +
                                "' was not made by make_cuda_kernels");
  }
  return *cuda;
}

}  // namespace

CUstream_st* cuda_kernels_stream(Kernels<bf16>& kernels) {
  return as_cuda_kernels(kernels, "cuda_kernels_stream").stream();
}

int cuda_kernels_device(Kernels<bf16>& kernels) {
  return as_cuda_kernels(kernels, "cuda_kernels_device").device();
}

void set_cuda_flash_attention(Kernels<bf16>& kernels, bool enabled) {
  as_cuda_kernels(kernels, "set_cuda_flash_attention").set_flash_attention(enabled);
}

void set_cuda_gemm(Kernels<bf16>& kernels, CudaGemm gemm) {
  as_cuda_kernels(kernels, "set_cuda_gemm").set_gemm(gemm);
}

CudaGemmCounts cuda_gemm_counts(Kernels<bf16>& kernels) {
  return as_cuda_kernels(kernels, "cuda_gemm_counts").gemm_counts();
}

int64_t cuda_gemm_heuristic_calls(Kernels<bf16>& kernels) {
  return as_cuda_kernels(kernels, "cuda_gemm_heuristic_calls").gemm_counts().heuristic_calls;
}

CudaMemoryStats cuda_memory_stats(Kernels<bf16>& kernels) {
  return as_cuda_kernels(kernels, "cuda_memory_stats").memory_stats();
}

void reset_cuda_peak_memory(Kernels<bf16>& kernels) {
  as_cuda_kernels(kernels, "reset_cuda_peak_memory").reset_peak_memory();
}

void set_cuda_compression_impl(Kernels<bf16>& kernels, CompressionImpl impl) {
  as_cuda_kernels(kernels, "set_cuda_compression_impl").set_compression_impl(impl);
}

void set_cuda_compression_crossover(Kernels<bf16>& kernels, int64_t n_in) {
  as_cuda_kernels(kernels, "set_cuda_compression_crossover").set_compression_crossover(n_in);
}

bool cuda_device_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: not an error for this question
    return false;
  }
  return count > 0;
}

std::unique_ptr<Kernels<bf16>> make_cuda_kernels(int device) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("make_cuda_kernels: no usable CUDA device: ") +
                             cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
  }
  if (device < 0 || device >= count) {
    throw std::runtime_error("make_cuda_kernels: device " + std::to_string(device) +
                             " requested, but " + std::to_string(count) +
                             " CUDA device(s) are present");
  }
  return std::make_unique<CudaKernels>(device);
}

}  // namespace freqkv
