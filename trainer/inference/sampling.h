// Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p
// (nucleus), deterministic for a given seed.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace freqkv {

struct SamplingConfig {
  bool greedy = true;        // argmax; the fields below apply when false
  double temperature = 1.0;  // logits / temperature; 0 means greedy
  int64_t top_k = 0;         // keep the k most likely tokens (0: all)
  double top_p = 1.0;        // then the smallest set whose probability reaches p (1: all)

  // Throws std::invalid_argument naming the field for temperature < 0, top_k < 0 or top_p
  // outside (0, 1].
  void validate() const;
  std::string describe() const;  // "greedy" or "temperature 0.8, top-k 40, top-p 0.95"
};

// The most likely token; ties go to the lowest id. Throws std::invalid_argument for empty
// logits or a NaN among them.
int32_t argmax_token(const std::vector<float>& logits);

// The distribution sampling draws from, most likely first (ties: lower id first): (token,
// probability) pairs after temperature, top-k and top-p, renormalised to sum to 1. Greedy (or
// temperature 0) gives the argmax alone with probability 1.
std::vector<std::pair<int32_t, double>> sampling_distribution(const std::vector<float>& logits,
                                                              const SamplingConfig& config);

class TokenSampler {
 public:
  // Validates config. The same seed and the same logits give the same tokens on every platform:
  // the uniform draw is built from the raw 64-bit output of std::mt19937_64 (whose sequence the
  // standard fixes), not from a library-defined distribution.
  TokenSampler(const SamplingConfig& config, uint64_t seed);
  int32_t next(const std::vector<float>& logits);
  const SamplingConfig& config() const { return config_; }

 private:
  SamplingConfig config_;
  std::mt19937_64 rng_;
};

}  // namespace freqkv
