#include "trainer/inference/generation.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

namespace freqkv {

template <typename T>
std::vector<int32_t> generate_tokens(FreqKVDecoder<T>& decoder, const std::vector<int32_t>& prompt,
                                     int64_t max_new_tokens, TokenSampler& sampler,
                                     int32_t stop_token, GenerationStats* stats,
                                     const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) throw std::invalid_argument("generate: the prompt has no tokens");
  if (max_new_tokens < 0)
    throw std::invalid_argument("generate: max_new_tokens must be >= 0, got " +
                                std::to_string(max_new_tokens));
  using Clock = std::chrono::steady_clock;
  GenerationStats s;
  s.prompt_tokens = static_cast<int64_t>(prompt.size());
  decoder.reset();
  const auto start = Clock::now();
  std::vector<float> logits = decoder.prefill(prompt);
  const auto prefilled = Clock::now();
  s.peak_cache_rows = decoder.peak_cache_rows();
  std::vector<int32_t> generated;
  while (static_cast<int64_t>(generated.size()) < max_new_tokens) {
    // Every tp rank samples (keeping the samplers in step); rank 0's token is appended.
    const int32_t token = decoder.agree_on_token(sampler.next(logits));
    generated.push_back(token);
    if (on_token) on_token(token);
    if (stop_token >= 0 && token == stop_token) {
      s.stopped_at_stop_token = true;
      break;
    }
    // The last token needs no logits of its own.
    if (static_cast<int64_t>(generated.size()) < max_new_tokens) {
      logits = decoder.step(token);
      ++s.decode_steps;
    }
  }
  const auto end = Clock::now();
  s.generated_tokens = static_cast<int64_t>(generated.size());
  s.prefill_seconds = std::chrono::duration<double>(prefilled - start).count();
  s.decode_seconds = std::chrono::duration<double>(end - prefilled).count();
  s.final_cache_rows = decoder.cache_rows();
  s.peak_cache_rows = decoder.peak_cache_rows();
  s.compressions = decoder.compressions();
  if (stats) *stats = s;
  return generated;
}

#define FREQKV_INSTANTIATE_GENERATE(T)                                                         \
  template std::vector<int32_t> generate_tokens<T>(                                            \
      FreqKVDecoder<T>&, const std::vector<int32_t>&, int64_t, TokenSampler&, int32_t,          \
      GenerationStats*, const std::function<void(int32_t)>&);
FREQKV_INSTANTIATE_GENERATE(float)
FREQKV_INSTANTIATE_GENERATE(double)
#if defined(FREQKV_HAVE_CUDA)
FREQKV_INSTANTIATE_GENERATE(bf16)
#endif
#undef FREQKV_INSTANTIATE_GENERATE

}  // namespace freqkv
