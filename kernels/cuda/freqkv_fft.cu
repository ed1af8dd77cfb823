// FreqKV compression and its adjoint by cuFFT DCTs (see freqkv_fft.cuh for the pipeline and
// kernels/dct_fft_math.h for the per-element math, which tests/test_dct_fft_math.cpp checks
// against the compression matrix on the CPU).
#include "kernels/cuda/freqkv_fft.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels/compression_impl.h"
#include "kernels/dct_fft_math.h"

namespace freqkv::cuda {

namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxGridRows = 65535;  // gridDim.y limit; kernels loop over further rows
// cuFFT wants its buffers aligned; each part of the one scratch allocation starts at a multiple.
constexpr size_t kScratchAlignment = 256;

size_t aligned(size_t bytes) {
  return (bytes + kScratchAlignment - 1) / kScratchAlignment * kScratchAlignment;
}

const char* cufft_result_name(cufftResult result) {
  switch (result) {
    case CUFFT_SUCCESS: return "CUFFT_SUCCESS";
    case CUFFT_INVALID_PLAN: return "CUFFT_INVALID_PLAN";
    case CUFFT_ALLOC_FAILED: return "CUFFT_ALLOC_FAILED";
    case CUFFT_INVALID_TYPE: return "CUFFT_INVALID_TYPE";
    case CUFFT_INVALID_VALUE: return "CUFFT_INVALID_VALUE";
    case CUFFT_INTERNAL_ERROR: return "CUFFT_INTERNAL_ERROR";
    case CUFFT_EXEC_FAILED: return "CUFFT_EXEC_FAILED";
    case CUFFT_SETUP_FAILED: return "CUFFT_SETUP_FAILED";
    case CUFFT_INVALID_SIZE: return "CUFFT_INVALID_SIZE";
    case CUFFT_UNALIGNED_DATA: return "CUFFT_UNALIGNED_DATA";
    case CUFFT_INVALID_DEVICE: return "CUFFT_INVALID_DEVICE";
    case CUFFT_NO_WORKSPACE: return "CUFFT_NO_WORKSPACE";
    case CUFFT_NOT_IMPLEMENTED: return "CUFFT_NOT_IMPLEMENTED";
    case CUFFT_NOT_SUPPORTED: return "CUFFT_NOT_SUPPORTED";
    default: return "an unknown cufftResult";
  }
}

const char* transform_name(cufftType type) {
  return type == CUFFT_R2C ? "real-to-complex" : "complex-to-real";
}

// Messages name the transform and its shape: "cuda-bf16 freqkv_compress (fft): cufftExecR2C of
// a real-to-complex transform of length 4092 over 512 channels: CUFFT_EXEC_FAILED".
void check_cufft(cufftResult result, const char* call, cufftType type, int64_t length,
                 int64_t channels) {
  if (result == CUFFT_SUCCESS) return;
  throw std::runtime_error(std::string("cuda-bf16 freqkv_compress (fft): ") + call + " of a " +
                           transform_name(type) + " transform of length " +
                           std::to_string(length) + " over " + std::to_string(channels) +
                           " channels: " + cufft_result_name(result) + " (" +
                           std::to_string(static_cast<int>(result)) + ")");
}

// Grids of the three kernels: threads along channels (coalesced), blocks along rows.
dim3 row_channel_grid(int64_t rows, int64_t channels, const LaunchContext& ctx) {
  const int64_t channel_blocks = (channels + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int64_t cap = static_cast<int64_t>(ctx.multiprocessor_count) * 8;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(channel_blocks, cap))),
              static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, kMaxGridRows))));
}

// Step 1: real[m, c] = src[makhoul_source(m), c] in fp32.
__global__ void reorder_to_fp32_kernel(float* __restrict__ real,
                                       const __nv_bfloat16* __restrict__ src, int64_t ld_src,
                                       int64_t n, int64_t channels) {
  for (int64_t m = blockIdx.y; m < n; m += gridDim.y) {
    const __nv_bfloat16* src_row = src + makhoul_source(m, n) * ld_src;
    float* real_row = real + m * channels;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
         c += static_cast<int64_t>(blockDim.x) * gridDim.x) {
      real_row[c] = __bfloat162float(src_row[c]);
    }
  }
}

// Step 3: the inverse transform's input bins 0..n_dst/2 from the source's bins 0..n_src/2.
__global__ void resample_bins_kernel(cufftComplex* __restrict__ dst_bins,
                                     const cufftComplex* __restrict__ src_bins, int64_t n_src,
                                     int64_t n_dst, int64_t channels, float gain) {
  const int64_t n_dst_bins = n_dst / 2 + 1;
  for (int64_t k = blockIdx.y; k < n_dst_bins; k += gridDim.y) {
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
         c += static_cast<int64_t>(blockDim.x) * gridDim.x) {
      dst_bins[k * channels + c] =
          dct_resample_bin(src_bins + c, channels, k, n_src, n_dst, gain);
    }
  }
}

// Step 5: dst[i, c] (+)= real[makhoul_position(i), c], rounded to bf16 once.
__global__ void reorder_to_bf16_kernel(__nv_bfloat16* __restrict__ dst, int64_t ld_dst,
                                       const float* __restrict__ real, int64_t n, int64_t channels,
                                       bool accumulate) {
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const float* real_row = real + makhoul_position(i, n) * channels;
    __nv_bfloat16* dst_row = dst + i * ld_dst;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
         c += static_cast<int64_t>(blockDim.x) * gridDim.x) {
      float value = real_row[c];
      if (accumulate) value += __bfloat162float(dst_row[c]);
      dst_row[c] = __float2bfloat16(value);
    }
  }
}

// A transform of length 1 is the identity (V_0 = v_0), done here instead of asking cuFFT for a
// plan of that degenerate size (L = 1, or N = L = 1).
__global__ void length_one_fft_kernel(cufftComplex* __restrict__ bins,
                                      const float* __restrict__ real, int64_t channels) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
       c += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    bins[c] = make_cuComplex(real[c], 0.0f);
  }
}
__global__ void length_one_inverse_fft_kernel(float* __restrict__ real,
                                              const cufftComplex* __restrict__ bins,
                                              int64_t channels) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
       c += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    real[c] = bins[c].x;
  }
}

}  // namespace

int64_t compression_crossover_from_environment() {
  const char* text = std::getenv("FREQKV_COMPRESS_CROSSOVER");
  if (text == nullptr || *text == '\0') return kDefaultCompressionCrossover;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  if (errno != 0 || *end != '\0' || value < 1) {
    throw std::invalid_argument(
        std::string("cuda-bf16: the environment variable FREQKV_COMPRESS_CROSSOVER = '") + text +
        "' is not a positive integer (the compression length N from which FreqKV compression "
        "uses cuFFT instead of a GEMM)");
  }
  return static_cast<int64_t>(value);
}

const FftCompression::Plan& FftCompression::plan(const LaunchContext& ctx, cufftType type,
                                                 int64_t length, int64_t channels) {
  for (auto it = plans_.begin(); it != plans_.end(); ++it) {
    if (it->type == type && it->length == length && it->channels == channels &&
        it->stream == ctx.stream) {
      plans_.splice(plans_.begin(), plans_, it);
      return plans_.front();
    }
  }

  // Length `length` along rows of a dense [rows, channels] scratch: element (row r, channel c) at
  // r * channels + c, i.e. stride `channels` within a transform and distance 1 between them. The
  // complex side holds length/2 + 1 bins.
  long long n[1] = {length};
  long long real_embed[1] = {length};
  long long complex_embed[1] = {length / 2 + 1};
  const bool to_complex = type == CUFFT_R2C;
  Plan created{type, length, channels, ctx.stream, 0, 0};
  check_cufft(cufftCreate(&created.handle), "cufftCreate", type, length, channels);
  try {
    // The work area comes from the per-call scratch (stream-ordered) instead of living as long
    // as the plan.
    check_cufft(cufftSetAutoAllocation(created.handle, 0), "cufftSetAutoAllocation", type, length,
                channels);
    check_cufft(cufftMakePlanMany64(created.handle, 1, n, to_complex ? real_embed : complex_embed,
                                    channels, 1, to_complex ? complex_embed : real_embed, channels,
                                    1, type, channels, &created.work_bytes),
                "cufftMakePlanMany64", type, length, channels);
    check_cufft(cufftSetStream(created.handle, ctx.stream), "cufftSetStream", type, length,
                channels);
  } catch (...) {
    (void)cufftDestroy(created.handle);
    throw;
  }
  plans_.push_front(created);
  if (plans_.size() > kMaxPlans) {
    // The evicted plan may still be in use by enqueued transforms: wait for them first.
    (void)cudaStreamSynchronize(plans_.back().stream);
    (void)cufftDestroy(plans_.back().handle);
    plans_.pop_back();
  }
  return plans_.front();
}

void FftCompression::release() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const Plan& p : plans_) (void)cufftDestroy(p.handle);
  plans_.clear();
}

void FftCompression::resample(const LaunchContext& ctx, __nv_bfloat16* dst, int64_t ld_dst,
                              const __nv_bfloat16* src, int64_t ld_src, int64_t n_src,
                              int64_t n_dst, int64_t channels, bool accumulate, const char* what) {
  const int64_t n_src_bins = n_src / 2 + 1;
  const int64_t n_dst_bins = n_dst / 2 + 1;
  const size_t real_bytes =
      aligned(static_cast<size_t>(std::max(n_src, n_dst) * channels) * sizeof(float));
  const size_t src_bins_bytes =
      aligned(static_cast<size_t>(n_src_bins * channels) * sizeof(cufftComplex));
  const size_t dst_bins_bytes =
      aligned(static_cast<size_t>(n_dst_bins * channels) * sizeof(cufftComplex));

  // Held until both transforms are enqueued: a plan's work area is state of the plan. (The
  // second plan() cannot evict the first: that one is second most recently used by then.)
  std::lock_guard<std::mutex> lock(mutex_);
  const Plan* to_spectrum = n_src > 1 ? &plan(ctx, CUFFT_R2C, n_src, channels) : nullptr;
  const Plan* from_spectrum = n_dst > 1 ? &plan(ctx, CUFFT_C2R, n_dst, channels) : nullptr;
  // The two transforms run one after the other on the stream: one work area serves both (never
  // empty, so that its address lies inside the allocation).
  const size_t work_bytes =
      aligned(std::max<size_t>({to_spectrum ? to_spectrum->work_bytes : 0,
                                from_spectrum ? from_spectrum->work_bytes : 0, 1}));
  ScratchBuffer scratch(ctx, real_bytes + src_bins_bytes + dst_bins_bytes + work_bytes, what);
  char* base = scratch.as<char>();
  auto* real = reinterpret_cast<float*>(base);
  auto* src_bins = reinterpret_cast<cufftComplex*>(base + real_bytes);
  auto* dst_bins = reinterpret_cast<cufftComplex*>(base + real_bytes + src_bins_bytes);
  void* work = base + real_bytes + src_bins_bytes + dst_bins_bytes;

  reorder_to_fp32_kernel<<<row_channel_grid(n_src, channels, ctx), kThreadsPerBlock, 0,
                           ctx.stream>>>(real, src, ld_src, n_src, channels);
  check_launch("freqkv fft: reorder_to_fp32_kernel");

  if (to_spectrum != nullptr) {
    check_cufft(cufftSetWorkArea(to_spectrum->handle, work), "cufftSetWorkArea", CUFFT_R2C, n_src,
                channels);
    check_cufft(cufftExecR2C(to_spectrum->handle, real, src_bins), "cufftExecR2C", CUFFT_R2C,
                n_src, channels);
  } else {
    length_one_fft_kernel<<<grid_size(channels, kThreadsPerBlock, ctx), kThreadsPerBlock, 0,
                            ctx.stream>>>(src_bins, real, channels);
    check_launch("freqkv fft: length_one_fft_kernel");
  }

  const float gain = static_cast<float>(dct_resample_gain(n_src, n_dst));
  resample_bins_kernel<<<row_channel_grid(n_dst_bins, channels, ctx), kThreadsPerBlock, 0,
                         ctx.stream>>>(dst_bins, src_bins, n_src, n_dst, channels, gain);
  check_launch("freqkv fft: resample_bins_kernel");

  // Complex-to-real transforms overwrite their input: dst_bins is scratch, so that is fine.
  if (from_spectrum != nullptr) {
    check_cufft(cufftSetWorkArea(from_spectrum->handle, work), "cufftSetWorkArea", CUFFT_C2R,
                n_dst, channels);
    check_cufft(cufftExecC2R(from_spectrum->handle, dst_bins, real), "cufftExecC2R", CUFFT_C2R,
                n_dst, channels);
  } else {
    length_one_inverse_fft_kernel<<<grid_size(channels, kThreadsPerBlock, ctx), kThreadsPerBlock,
                                    0, ctx.stream>>>(real, dst_bins, channels);
    check_launch("freqkv fft: length_one_inverse_fft_kernel");
  }

  reorder_to_bf16_kernel<<<row_channel_grid(n_dst, channels, ctx), kThreadsPerBlock, 0,
                           ctx.stream>>>(dst, ld_dst, real, n_dst, channels, accumulate);
  check_launch("freqkv fft: reorder_to_bf16_kernel");
}

void FftCompression::forward(const LaunchContext& ctx, __nv_bfloat16* out, int64_t ld_out,
                             const __nv_bfloat16* in, int64_t ld_in, int64_t n_in, int64_t n_out,
                             int64_t channels) {
  resample(ctx, out, ld_out, in, ld_in, n_in, n_out, channels, /*accumulate=*/false,
           "freqkv_compress (fft)");
}

void FftCompression::backward(const LaunchContext& ctx, __nv_bfloat16* din, int64_t ld_in,
                              const __nv_bfloat16* dout, int64_t ld_out, int64_t n_in,
                              int64_t n_out, int64_t channels) {
  resample(ctx, din, ld_in, dout, ld_out, n_out, n_in, channels, /*accumulate=*/true,
           "freqkv_compress_backward (fft)");
}

}  // namespace freqkv::cuda
