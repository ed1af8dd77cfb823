// compress_crossover: where FreqKV compression on the GPU is faster as cuFFT DCTs than as a GEMM
// with the L x N matrix P (CudaKernels, kernels/compression_impl.h).
//
//   compress_crossover [--channels 512,2048,8192] [--max-n 8192] [--freqkv-n 4092,2044]
//                      [--repeats 20] [--device 0]
//
// For N = 64, 128, ..., max-n and L = N/2, and for each channel count (the K|V width of one
// sequence: 2 x kv heads x head dim, e.g. 512 for TinyLlama-1.1B, 2048 for LLaMA-3-8B, 8192 for
// LLaMA-2-7B), it times one forward plus one backward (freqkv_compress + freqkv_compress_backward)
// on the backend's stream with CUDA events, averaged over `repeats` after a warm-up that builds P
// and the cuFFT plans. It prints a markdown table per channel count and the measured crossover:
// the smallest N from which the FFT path is faster at every larger N measured.
// CompressionImpl::Auto switches at kDefaultCompressionCrossover until that constant is updated
// from these figures (or FREQKV_COMPRESS_CROSSOVER overrides it). FreqKV's own lengths are rarely
// powers of two (N = C - S = 4092 for a 4096 cache and 4 sinks; cuFFT is fastest for factors 2,
// 3, 5, 7), so the --freqkv-n lengths get rows of their own below each table, outside the
// crossover.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/compression_impl.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/kernels.h"

namespace {

using freqkv::bf16;
using freqkv::Buffer;
using freqkv::CompressionImpl;
using freqkv::Kernels;

struct Options {
  std::vector<int64_t> channel_counts = {512, 2048, 8192};
  int64_t max_n = 8192;
  std::vector<int64_t> freqkv_lengths = {4092, 2044};
  int repeats = 20;
  int device = 0;
};

[[noreturn]] void usage_error(const std::string& message) {
  throw std::invalid_argument(
      "compress_crossover: " + message +
      "\nusage: compress_crossover [--channels 512,2048,8192] [--max-n 8192] "
      "[--freqkv-n 4092,2044] [--repeats 20] [--device 0]");
}

int64_t parse_positive(const std::string& text, const std::string& option) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < 1) {
    usage_error(option + " takes positive integers, got '" + text + "'");
  }
  return value;
}

std::vector<int64_t> parse_list(const std::string& text, const std::string& option) {
  std::vector<int64_t> values;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t comma = text.find(',', begin);
    const size_t end = comma == std::string::npos ? text.size() : comma;
    values.push_back(parse_positive(text.substr(begin, end - begin), option));
    begin = end + 1;
  }
  return values;
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string option = argv[i];
    if (i + 1 >= argc) usage_error(option + " needs a value");
    const std::string value = argv[++i];
    if (option == "--channels") {
      options.channel_counts = parse_list(value, option);
    } else if (option == "--freqkv-n") {
      options.freqkv_lengths = parse_list(value, option);
    } else if (option == "--max-n") {
      options.max_n = parse_positive(value, option);
    } else if (option == "--repeats") {
      options.repeats = static_cast<int>(parse_positive(value, option));
    } else if (option == "--device") {
      options.device = static_cast<int>(std::strtol(value.c_str(), nullptr, 10));
    } else {
      usage_error("unknown option " + option);
    }
  }
  return options;
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("compress_crossover: ") + what + ": " +
                             cudaGetErrorString(status));
  }
}

// Milliseconds per forward + backward of N -> N/2 over `channels`, with `impl` forced.
double time_compression(Kernels<bf16>& kernels, CompressionImpl impl, int64_t n_in,
                        int64_t channels, int repeats) {
  const int64_t n_out = n_in / 2;
  freqkv::set_cuda_compression_impl(kernels, impl);
  std::mt19937 rng(static_cast<uint32_t>(n_in * 31 + channels));
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(n_in * channels));
  for (float& v : values) v = uniform(rng);
  Buffer<bf16> in(kernels, n_in * channels), din(kernels, n_in * channels);
  Buffer<bf16> out(kernels, n_out * channels), dout(kernels, n_out * channels);
  kernels.upload(in.data(), values.data(), in.size());
  kernels.upload(dout.data(), values.data(), dout.size());

  const auto step = [&] {
    kernels.freqkv_compress(out.data(), channels, in.data(), channels, n_in, n_out, channels);
    kernels.freqkv_compress_backward(din.data(), channels, dout.data(), channels, n_in, n_out,
                                     channels);
  };
  // Warm-up: P (built on the host in double) or the cuFFT plans, and the memory pool.
  step();
  step();
  kernels.synchronize();

  cudaStream_t stream = freqkv::cuda_kernels_stream(kernels);
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  check(cudaEventRecord(start, stream), "cudaEventRecord");
  for (int r = 0; r < repeats; ++r) step();
  check(cudaEventRecord(stop, stream), "cudaEventRecord");
  check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float elapsed_ms = 0.0f;
  check(cudaEventElapsedTime(&elapsed_ms, start, stop), "cudaEventElapsedTime");
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  kernels.synchronize();  // reports any error of the timed work
  return static_cast<double>(elapsed_ms) / repeats;
}

int run(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  if (!freqkv::cuda_device_available()) {
    std::fprintf(stderr, "compress_crossover: no CUDA device\n");
    return 2;
  }
  const std::unique_ptr<Kernels<bf16>> kernels = freqkv::make_cuda_kernels(options.device);
  cudaDeviceProp properties{};
  check(cudaGetDeviceProperties(&properties, options.device), "cudaGetDeviceProperties");
  std::printf("# FreqKV compression N -> N/2, forward + backward: GEMM with P vs cuFFT DCTs\n\n");
  std::printf("device %d: %s; %d repeats after 2 warm-ups; CompressionImpl::Auto switches at "
              "N >= %lld today (kDefaultCompressionCrossover, not yet measured)\n",
              options.device, properties.name, options.repeats,
              static_cast<long long>(freqkv::kDefaultCompressionCrossover));

  for (const int64_t channels : options.channel_counts) {
    std::printf("\n## %lld channels\n\n| N | L | gemm ms | fft ms | gemm / fft |\n"
                "| ---: | ---: | ---: | ---: | ---: |\n",
                static_cast<long long>(channels));
    std::fflush(stdout);
    // One row; true when the FFT was faster.
    const auto row = [&](int64_t n, const char* note) {
      const double gemm_ms = time_compression(*kernels, CompressionImpl::Gemm, n, channels,
                                              options.repeats);
      const double fft_ms = time_compression(*kernels, CompressionImpl::Fft, n, channels,
                                             options.repeats);
      std::printf("| %lld%s | %lld | %.4f | %.4f | %.2f |\n", static_cast<long long>(n), note,
                  static_cast<long long>(n / 2), gemm_ms, fft_ms, gemm_ms / fft_ms);
      std::fflush(stdout);  // a run cut off by a time limit keeps its rows
      return fft_ms < gemm_ms;
    };
    std::vector<int64_t> lengths;
    std::vector<bool> fft_faster;
    for (int64_t n = 64; n <= options.max_n; n *= 2) {
      lengths.push_back(n);
      fft_faster.push_back(row(n, ""));
    }
    for (const int64_t n : options.freqkv_lengths) {
      if (n >= 2) (void)row(n, " (FreqKV)");
    }
    // The smallest N from which the FFT wins at every larger N measured.
    int64_t crossover = -1;
    for (size_t i = lengths.size(); i-- > 0 && fft_faster[i];) crossover = lengths[i];
    if (crossover < 0) {
      std::printf("\nmeasured crossover (%lld channels): none up to N = %lld: the GEMM is faster "
                  "at the largest N\n",
                  static_cast<long long>(channels), static_cast<long long>(options.max_n));
    } else {
      std::printf("\nmeasured crossover (%lld channels): N = %lld (the FFT is faster from there "
                  "on; FREQKV_COMPRESS_CROSSOVER=%lld selects it)\n",
                  static_cast<long long>(channels), static_cast<long long>(crossover),
                  static_cast<long long>(crossover));
    }
  }
  freqkv::set_cuda_compression_impl(*kernels, CompressionImpl::Auto);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 1;
  }
}
