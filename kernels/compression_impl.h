// How a backend computes FreqKV compression (Kernels::freqkv_compress and its backward). The CPU
// backend always multiplies by the L x N matrix P; the CUDA backend (kernels/cuda/cuda_backend.h)
// can also run it as cuFFT DCTs (kernels/cuda/freqkv_fft.cu): O(N log N) per channel instead of
// O(L N), and fp32 throughout instead of a bf16-rounded P.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace freqkv {

enum class CompressionImpl {
  Auto,  // Fft when the compressed length N >= the crossover, else Gemm
  Gemm,  // one cuBLAS GEMM with P (rounded to bf16 once)
  Fft,   // DCT-II, truncate/zero-pad, DCT-III by cuFFT in fp32
};

// The default crossover N of Auto. NOT YET MEASURED on a GPU: a guess that the GEMM's L·N work
// per channel outgrows the FFTs' fixed costs (five launches, fp32 scratch) around N = 1024.
// `compress_crossover` (bench/compress_crossover.cu) measures it; the environment variable
// FREQKV_COMPRESS_CROSSOVER overrides it for a CUDA backend when it is created.
constexpr int64_t kDefaultCompressionCrossover = 1024;

// The config spellings: "auto", "gemm", "fft".
inline const char* compression_impl_name(CompressionImpl impl) {
  switch (impl) {
    case CompressionImpl::Gemm:
      return "gemm";
    case CompressionImpl::Fft:
      return "fft";
    case CompressionImpl::Auto:
      break;
  }
  return "auto";
}

// Throws std::invalid_argument naming the value and the choices.
inline CompressionImpl parse_compression_impl(const std::string& name) {
  for (CompressionImpl impl :
       {CompressionImpl::Auto, CompressionImpl::Gemm, CompressionImpl::Fft}) {
    if (name == compression_impl_name(impl)) return impl;
  }
  throw std::invalid_argument("FreqKV compression implementation '" + name +
                              "' is none of auto, gemm, fft");
}

}  // namespace freqkv
