// Pieces shared by the kernel families of the CUDA backend: error checks that carry context, the
// launch context every family receives, stream-ordered scratch memory, the device-side report of
// invalid inputs, and warp/block reductions. Included by .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/dtype.h"

namespace freqkv::cuda {

// freqkv::bf16 is plain storage with the layout of __nv_bfloat16: device pointers are
// reinterpreted.
static_assert(sizeof(bf16) == sizeof(__nv_bfloat16) && alignof(bf16) == alignof(__nv_bfloat16),
              "freqkv::bf16 must have the layout of __nv_bfloat16");

inline __nv_bfloat16* as_nv(bf16* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* as_nv(const bf16* p) {
  return reinterpret_cast<const __nv_bfloat16*>(p);
}

// ---- errors -------------------------------------------------------------------------------------
// Every message starts with the backend's name and says what was being done.
[[noreturn]] inline void throw_cuda_error(cudaError_t status, const std::string& what) {
  // Clears a non-sticky error (a failed allocation, a bad argument) so that a caller who catches
  // this does not see it again at the next launch check.
  (void)cudaGetLastError();
  throw std::runtime_error("cuda-bf16: " + what + ": " + cudaGetErrorName(status) + " (" +
                           cudaGetErrorString(status) + ")");
}

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw_cuda_error(status, what);
}

// After a kernel launch: a bad launch configuration shows up here, faults inside the kernel at
// the next synchronisation.
inline void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) throw_cuda_error(status, std::string("launching ") + kernel);
}

// ---- invalid inputs found on the device ---------------------------------------------------------
// Kernels that read an index they cannot trust record the first bad one here (device memory) and
// skip it; the backend turns the record into an exception at its next synchronisation.
enum InvalidInput : int {
  kNoInvalidInput = 0,
  kNegativeTokenInEmbeddingForward = 1,
  kNegativeTokenInEmbeddingBackward = 2,
  kTargetOutsideVocabulary = 3,
};

struct DeviceErrorReport {
  int code;  // an InvalidInput
  int unused;
  long long row;    // the row (token position) at fault
  long long value;  // the offending index
  long long bound;  // the bound it broke (vocabulary size), or 0
};

__device__ inline void report_invalid_input(DeviceErrorReport* report, InvalidInput code,
                                            long long row, long long value, long long bound) {
  if (atomicCAS(&report->code, 0, static_cast<int>(code)) == 0) {
    report->row = row;
    report->value = value;
    report->bound = bound;
  }
}

// ---- what every kernel family receives ----------------------------------------------------------
struct LaunchContext {
  cudaStream_t stream;
  int multiprocessor_count;
  bool stream_ordered_allocation;   // cudaMallocAsync available (else cudaMalloc)
  DeviceErrorReport* error_report;  // device memory
};

// Device memory for the duration of one call, freed in stream order: kernels enqueued before the
// destructor still see it. Without stream-ordered allocation the free waits for the stream.
class ScratchBuffer {
 public:
  ScratchBuffer(const LaunchContext& ctx, size_t bytes, const char* what) : ctx_(ctx) {
    const size_t size = std::max<size_t>(bytes, 1);
    const cudaError_t status = ctx.stream_ordered_allocation
                                   ? cudaMallocAsync(&ptr_, size, ctx.stream)
                                   : cudaMalloc(&ptr_, size);
    if (status != cudaSuccess) {
      throw_cuda_error(status, std::string("allocating ") + std::to_string(bytes) +
                                   " bytes of scratch for " + what);
    }
  }
  ~ScratchBuffer() {
    // A failure here is a sticky device error that the next checked call reports.
    if (ctx_.stream_ordered_allocation) {
      (void)cudaFreeAsync(ptr_, ctx_.stream);
    } else {
      (void)cudaStreamSynchronize(ctx_.stream);
      (void)cudaFree(ptr_);
    }
  }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;

  template <typename U>
  U* as() const {
    return static_cast<U*>(ptr_);
  }

 private:
  LaunchContext ctx_;
  void* ptr_ = nullptr;
};

// Blocks for a grid-stride loop over n items: enough to fill the device, no more.
inline int grid_size(int64_t n_items, int threads_per_block, const LaunchContext& ctx,
                     int blocks_per_multiprocessor = 8) {
  const int64_t needed = (n_items + threads_per_block - 1) / threads_per_block;
  const int64_t cap = static_cast<int64_t>(ctx.multiprocessor_count) * blocks_per_multiprocessor;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, cap)));
}

// Blocks for a loop with one block per row (grid-stride over rows when there are more).
inline int row_grid_size(int64_t n_rows) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  return static_cast<int>(std::max<int64_t>(1, std::min(n_rows, kMaxBlocks)));
}

// ---- reductions ---------------------------------------------------------------------------------
template <typename A>
__device__ inline A warp_sum(A value) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename A>
__device__ inline A warp_max(A value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// The sum over the block, returned to every thread, in an order fixed by the block size (so the
// result is deterministic). blockDim.x must be a multiple of 32; `scratch` is 32 elements of
// shared memory, reusable right after the call returns.
template <typename A>
__device__ inline A block_sum(A value, A* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  value = warp_sum(value);
  __syncthreads();  // an earlier call may still be reading scratch
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  return warp_sum(lane < n_warps ? scratch[lane] : A(0));
}

template <typename A>
__device__ inline A block_max(A value, A* scratch, A lowest) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  value = warp_max(value);
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  return warp_max(lane < n_warps ? scratch[lane] : lowest);
}

}  // namespace freqkv::cuda
