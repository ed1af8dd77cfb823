// Generating tokens with the FreqKV decoder: prefill the prompt, then sample token by token.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "trainer/inference/sampling.h"
#include "model/freqkv_decoder.h"

namespace freqkv {

struct GenerationStats {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double prefill_seconds = 0;  // the prompt, up to its first next-token logits
  double decode_seconds = 0;   // every later step
  int64_t decode_steps = 0;    // decoder steps (the last token chosen needs none)
  int64_t final_cache_rows = 0;
  int64_t peak_cache_rows = 0;
  int64_t compressions = 0;
  bool stopped_at_stop_token = false;
};

// Resets the decoder, feeds the prompt and draws up to max_new_tokens tokens from the sampler,
// stopping early after stop_token (kept in the result) when it is >= 0. on_token, if given, sees
// each token as it is chosen (streaming output). Throws std::invalid_argument for an empty prompt
// or max_new_tokens < 0.
template <typename T>
std::vector<int32_t> generate_tokens(FreqKVDecoder<T>& decoder, const std::vector<int32_t>& prompt,
                                     int64_t max_new_tokens, TokenSampler& sampler,
                                     int32_t stop_token, GenerationStats* stats = nullptr,
                                     const std::function<void(int32_t)>& on_token = {});

}  // namespace freqkv
