// The CUDA backend of Kernels<T> for T = bf16, as seen from plain C++: no CUDA header is needed to
// include this, so model and trainer code can pick the backend at run time.
//
// The backend exists only when the project was built with CUDA (the freqkv_cuda target, which
// defines FREQKV_HAVE_CUDA=1 for everything linking it). It stores tensors in bf16 on one device,
// computes in fp32 (Acc<bf16> = float statistics), and orders all its work on one CUDA stream of
// its own: calls return before the device has finished, except those that hand data to the host
// (copy_to_host, download, sum_squares), host-to-device copies and synchronize(), which wait.
// Invalid indices found on the device (a negative token, a target beyond the vocabulary) cannot
// throw where they are found: they are reported by the next of those waiting calls, as a
// std::out_of_range naming the call and the row.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/compression_impl.h"
#include "kernels/kernels.h"

// The CUDA runtime's stream type, declared as the runtime declares it (cudaStream_t is a pointer
// to it).
struct CUstream_st;

namespace freqkv {

// True when the CUDA runtime finds at least one usable device (false without a driver or GPU).
bool cuda_device_available();

// The bf16 CUDA backend on device `device`. Throws std::runtime_error carrying the CUDA error
// string when there is no such device or it cannot be initialised.
std::unique_ptr<Kernels<bf16>> make_cuda_kernels(int device = 0);

// ---- for code that works beside a backend made by make_cuda_kernels ------------------------------
// Each function throws std::invalid_argument when `kernels` is not such a backend.

// The stream the backend orders all its work on (a cudaStream_t: `struct CUstream_st*` is how the
// CUDA runtime declares it, so no CUDA header is needed here). Work of other libraries on the
// backend's data (NCCL collectives) must be ordered against it with events.
CUstream_st* cuda_kernels_stream(Kernels<bf16>& kernels);

// The CUDA device the backend runs on.
int cuda_kernels_device(Kernels<bf16>& kernels);

// Which attention kernels the backend runs: the tensor-core flash kernels for head_dim 64 and 128
// (kernels/cuda/flash_attention.cu; other head sizes always take the CUDA-core kernels of
// kernels/cuda/attention.cu), or the CUDA-core kernels for every head size. The default comes
// from the environment when the backend is made: FREQKV_ATTENTION=flash (or unset) or simple
// (make_cuda_kernels throws std::invalid_argument for anything else).
void set_cuda_flash_attention(Kernels<bf16>& kernels, bool enabled);

// How the backend's GEMMs run: cuBLASLt (bf16 in and out, fp32 accumulation, the algorithm chosen
// by cuBLASLt's heuristic once per shape and pointer alignment and cached; kernels/cuda/gemm_lt.cuh)
// or cublasGemmEx (the same types). Lt falls back to GemmEx for a problem its heuristic has no
// algorithm for. The default comes from the environment when the backend is made: FREQKV_GEMM=lt
// (or unset) or gemmex (make_cuda_kernels throws std::invalid_argument for anything else).
enum class CudaGemm { Lt, GemmEx };
void set_cuda_gemm(Kernels<bf16>& kernels, CudaGemm gemm);

// Counts since the backend was made, for tests and reports: cuBLASLt heuristic queries (one per
// new entry of the algorithm cache: a repeated shape adds none), GEMMs run by cuBLASLt, and GEMMs
// run by cublasGemmEx (chosen, or the fallback). K = 0 and empty GEMMs count in none.
struct CudaGemmCounts {
  int64_t heuristic_calls = 0;
  int64_t lt_calls = 0;
  int64_t gemmex_calls = 0;
};
CudaGemmCounts cuda_gemm_counts(Kernels<bf16>& kernels);
// The first of those counts.
int64_t cuda_gemm_heuristic_calls(Kernels<bf16>& kernels);

// Device memory, for reports (freqkv bench).
struct CudaMemoryStats {
  // What this backend holds through allocate_bytes and its caches (compression matrices, RoPE
  // tables, attention tile lists), counted at allocation and free.
  size_t allocated_bytes = 0;
  size_t peak_allocated_bytes = 0;  // the most held at once since creation or the last reset
  // The high-water mark of the device's default memory pool since the last reset: everything
  // allocated stream-ordered in this process on that device, so it includes the per-call scratch
  // of the kernels. 0 when the device has no memory pools.
  size_t pool_peak_bytes = 0;
  // The whole device (cudaMemGetInfo): used = total - free, by every process, context and pool.
  size_t device_used_bytes = 0;
  size_t device_total_bytes = 0;
};
CudaMemoryStats cuda_memory_stats(Kernels<bf16>& kernels);
// Restarts both peaks at what is allocated now. Waits for the backend's stream first.
void reset_cuda_peak_memory(Kernels<bf16>& kernels);

// How freqkv_compress and its backward run: Gemm (cuBLAS with the bf16 matrix P), Fft (cuFFT
// DCTs in fp32, kernels/cuda/freqkv_fft.cu) or Auto (the default: Fft when n_in >= the crossover).
// The crossover starts as FREQKV_COMPRESS_CROSSOVER from the environment when the backend is made
// (make_cuda_kernels throws std::invalid_argument if that is not a positive integer), else
// kDefaultCompressionCrossover; set_cuda_compression_crossover throws for n_in < 1.
void set_cuda_compression_impl(Kernels<bf16>& kernels, CompressionImpl impl);
void set_cuda_compression_crossover(Kernels<bf16>& kernels, int64_t n_in);

}  // namespace freqkv
