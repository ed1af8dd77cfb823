// attention_bench: the CUDA attention kernels on FreqKV layouts, the tensor-core flash kernels
// (kernels/cuda/flash_attention.cu) against the CUDA-core ones (kernels/cuda/attention.cu), one
// layer's attention_forward and attention_backward over every chunk of a batch of sequences, as
// a markdown table: milliseconds per call and attention TFLOP/s.
//
// FLOPs as in `freqkv bench` (trainer/cmd_bench.cpp): 4 * pairs * head_dim * heads forward (q.k
// and p.v), twice that backward, pairs = the (query, key) pairs the bottom-right causal mask lets
// through, summed over chunks. Inputs are random bf16 values; lse comes from the forward.
//
//   attention_bench [--reps N]        (needs a CUDA device; exit 2 without one)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/kernels.h"
#include "model/freqkv_schedule.h"

namespace {

using freqkv::AttnBlock;
using freqkv::AttnShape;
using freqkv::bf16;
using freqkv::Buffer;
using freqkv::Kernels;

struct Case {
  const char* name;
  int heads, kv_heads, head_dim;
  int64_t cache, seq_len, batch;  // FreqKV cache C (sink 4, ratio 0.5); sequences of seq_len
};

struct Layout {
  std::vector<AttnBlock> blocks;
  int64_t q_rows = 0, kv_rows = 0;
  double pairs = 0;
};

Layout freqkv_layout(const Case& c) {
  freqkv::FreqKVConfig config;
  config.cache = c.cache;
  config.sink = 4;
  config.ratio = 0.5;
  const freqkv::FreqKVSchedule s = freqkv::FreqKVSchedule::build(c.seq_len, config);
  Layout l;
  for (int64_t b = 0; b < c.batch; ++b) {
    for (const freqkv::FreqKVChunk& chunk : s.chunks) {
      l.blocks.push_back(
          {l.q_rows + chunk.token_start, chunk.n_tokens, l.kv_rows + chunk.kv_start, chunk.kv_len});
      const double n_q = static_cast<double>(chunk.n_tokens);
      l.pairs += n_q * static_cast<double>(chunk.kv_len - chunk.n_tokens) + n_q * (n_q + 1) / 2;
    }
    l.q_rows += c.seq_len;
    l.kv_rows += s.kv_rows;
  }
  return l;
}

// Milliseconds per call of fn (after one warm-up call), the mean over reps.
template <typename Fn>
double time_ms(Kernels<bf16>& k, int reps, Fn&& fn) {
  fn();
  k.synchronize();
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) fn();
  k.synchronize();
  const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
  return elapsed.count() / reps;
}

void fill_random(Kernels<bf16>& k, bf16* dst, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  constexpr int64_t kChunk = int64_t{1} << 20;
  std::vector<float> host(static_cast<size_t>(std::min(n, kChunk)));
  for (int64_t off = 0; off < n; off += kChunk) {
    const int64_t len = std::min(kChunk, n - off);
    for (int64_t i = 0; i < len; ++i) host[static_cast<size_t>(i)] = uniform(rng);
    k.upload(dst + off, host.data(), len);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: attention_bench [--reps N]\n");
      return 2;
    }
  }
  if (!freqkv::cuda_device_available()) {
    std::fprintf(stderr, "attention_bench: no CUDA device\n");
    return 2;
  }
  // TinyLlama-1.1B (C = 2048), Llama-2-7B and Llama-3-8B (C = 4096) attention shapes.
  const std::vector<Case> cases = {
      {"tinyllama-1.1b", 32, 4, 64, 2048, 8192, 2},
      {"tinyllama-1.1b", 32, 4, 64, 2048, 32768, 1},
      {"llama2-7b", 32, 32, 128, 4096, 16384, 1},
      {"llama3-8b", 32, 8, 128, 4096, 32768, 1},
  };
  auto gpu = freqkv::make_cuda_kernels(0);
  std::printf("| shape | Hq/Hkv/D | tokens | kernel | forward ms | fwd TFLOP/s | backward ms | "
              "bwd TFLOP/s |\n|---|---|---|---|---|---|---|---|\n");
  for (const Case& c : cases) {
    const Layout l = freqkv_layout(c);
    const AttnShape shape{c.heads, c.kv_heads, c.head_dim,
                          1.0 / std::sqrt(static_cast<double>(c.head_dim))};
    const int64_t q_width = static_cast<int64_t>(c.heads) * c.head_dim;
    const int64_t kv_width = static_cast<int64_t>(c.kv_heads) * c.head_dim;
    const int64_t ld_kv = 2 * kv_width;  // k and v side by side, as the model keeps them
    Buffer<bf16> q(*gpu, l.q_rows * q_width), out(*gpu, l.q_rows * q_width);
    Buffer<bf16> dout(*gpu, l.q_rows * q_width), dq(*gpu, l.q_rows * q_width);
    Buffer<bf16> kv(*gpu, l.kv_rows * ld_kv), dkv(*gpu, l.kv_rows * ld_kv);
    Buffer<float> lse(*gpu, l.q_rows * c.heads);
    fill_random(*gpu, q.data(), q.size(), 1);
    fill_random(*gpu, kv.data(), kv.size(), 2);
    fill_random(*gpu, dout.data(), dout.size(), 3);
    const double forward_flops = 4.0 * l.pairs * c.head_dim * c.heads;
    for (bool flash : {true, false}) {
      freqkv::set_cuda_flash_attention(*gpu, flash);
      auto forward = [&] {
        gpu->attention_forward(out.data(), q_width, lse.data(), q.data(), q_width, kv.data(),
                               kv.data() + kv_width, ld_kv, l.blocks, shape);
      };
      auto backward = [&] {
        gpu->attention_backward(dq.data(), dkv.data(), dkv.data() + kv_width, dout.data(),
                                q_width, out.data(), lse.data(), q.data(), q_width, kv.data(),
                                kv.data() + kv_width, ld_kv, l.blocks, shape);
      };
      const double fwd_ms = time_ms(*gpu, reps, forward);
      const double bwd_ms = time_ms(*gpu, reps, backward);
      std::printf("| %s | %d/%d/%d | %lld x %lld | %s | %.3f | %.1f | %.3f | %.1f |\n", c.name,
                  c.heads, c.kv_heads, c.head_dim, static_cast<long long>(c.batch),
                  static_cast<long long>(c.seq_len), flash ? "flash" : "simple", fwd_ms,
                  forward_flops / (fwd_ms * 1e9), bwd_ms, 2 * forward_flops / (bwd_ms * 1e9));
      std::fflush(stdout);
    }
  }
  return 0;
}
