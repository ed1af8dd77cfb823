// FreqKV compression by cuFFT (the CUDA backend's second way beside the GEMM with P; see
// kernels/compression_impl.h for how one is chosen). The math is kernels/dct_fft_math.h's:
// compression N -> L and its adjoint L -> N are both "resample n_src -> n_dst":
//
//   1. reorder the n_src rows (Makhoul) while converting bf16 -> fp32 into scratch [n_src, C]
//   2. real-to-complex FFT of length n_src, batched over the C channels      -> [n_src/2+1, C]
//   3. per output bin: DCT-II coefficients, truncated or zero-padded, scaled,
//      turned into the inverse's input                                      -> [n_dst/2+1, C]
//   4. complex-to-real FFT of length n_dst                                   -> [n_dst, C]
//   5. reorder back, write bf16 (forward: overwrite; backward: add to din)
//
// The scratch is dense row-major [rows, C] (C = channels, the batch of the FFTs): steps 1 and 5
// are the only passes over the strided bf16 data and are coalesced along channels; cuFFT reads
// and writes with stride C and distance 1 between batches, so nothing is transposed. Scratch per
// call (stream-ordered): max(N, L) fp32 values and (N/2+1) + (L/2+1) complex ones per channel,
// about 10 N C bytes for L = N/2 (335 MB for N = 4092, C = 8192), plus cuFFT's work area.
// Included by .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cufft.h>

#include <cstdint>
#include <list>
#include <mutex>

#include "kernels/cuda/cuda_common.cuh"

namespace freqkv::cuda {

// The crossover N of CompressionImpl::Auto: FREQKV_COMPRESS_CROSSOVER when set (a positive
// integer, else std::invalid_argument naming the variable and its value), else
// kDefaultCompressionCrossover.
int64_t compression_crossover_from_environment();

// The cuFFT path with its cache of plans (one per transform type, length and channel count, the
// most recently used kMaxPlans of them). Arguments are validated by the caller (CudaKernels):
// 1 <= n_out <= n_in, channels >= 1, leading dimensions >= channels.
class FftCompression {
 public:
  FftCompression() = default;
  ~FftCompression() { release(); }
  FftCompression(const FftCompression&) = delete;
  FftCompression& operator=(const FftCompression&) = delete;

  // out[n_out, channels] = P in[n_in, channels]
  void forward(const LaunchContext& ctx, __nv_bfloat16* out, int64_t ld_out,
               const __nv_bfloat16* in, int64_t ld_in, int64_t n_in, int64_t n_out,
               int64_t channels);
  // din[n_in, channels] += P^T dout[n_out, channels]
  void backward(const LaunchContext& ctx, __nv_bfloat16* din, int64_t ld_in,
                const __nv_bfloat16* dout, int64_t ld_out, int64_t n_in, int64_t n_out,
                int64_t channels);

  // Destroys every plan. The caller makes sure no enqueued work still uses them (CudaKernels
  // calls it after synchronising its stream); errors are ignored.
  void release() noexcept;

 private:
  static constexpr size_t kMaxPlans = 16;

  struct Plan {
    cufftType type;
    int64_t length;
    int64_t channels;
    cudaStream_t stream;
    cufftHandle handle;
    size_t work_bytes;  // the work area it needs, provided per call from scratch
  };

  // The plan for `type` (CUFFT_R2C or CUFFT_C2R), most recently used first; the caller holds
  // mutex_ until its transforms are enqueued (the work area is per-plan state).
  const Plan& plan(const LaunchContext& ctx, cufftType type, int64_t length, int64_t channels);
  void resample(const LaunchContext& ctx, __nv_bfloat16* dst, int64_t ld_dst,
                const __nv_bfloat16* src, int64_t ld_src, int64_t n_src, int64_t n_dst,
                int64_t channels, bool accumulate, const char* what);

  std::mutex mutex_;
  std::list<Plan> plans_;
};

}  // namespace freqkv::cuda
