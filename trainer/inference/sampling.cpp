#include "trainer/inference/sampling.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

namespace freqkv {

void SamplingConfig::validate() const {
  if (greedy) return;
  if (!(temperature >= 0.0) || std::isinf(temperature))
    throw std::invalid_argument("sampling: temperature must be a finite number >= 0, got " +
                                std::to_string(temperature));
  if (top_k < 0)
    throw std::invalid_argument("sampling: top-k must be >= 0 (0: off), got " +
                                std::to_string(top_k));
  if (!(top_p > 0.0 && top_p <= 1.0))
    throw std::invalid_argument("sampling: top-p must be in (0, 1] (1: off), got " +
                                std::to_string(top_p));
}

std::string SamplingConfig::describe() const {
  if (greedy || temperature == 0.0) return "greedy";
  std::ostringstream s;
  s << "temperature " << temperature << ", top-k " << (top_k > 0 ? std::to_string(top_k) : "off")
    << ", top-p " << top_p;
  return s.str();
}

int32_t argmax_token(const std::vector<float>& logits) {
  if (logits.empty()) throw std::invalid_argument("argmax_token: empty logits");
  size_t best = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i]))
      throw std::invalid_argument("argmax_token: logit " + std::to_string(i) + " is NaN");
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

std::vector<std::pair<int32_t, double>> sampling_distribution(const std::vector<float>& logits,
                                                              const SamplingConfig& config) {
  config.validate();
  if (config.greedy || config.temperature == 0.0) return {{argmax_token(logits), 1.0}};
  argmax_token(logits);  // rejects empty and NaN logits

  std::vector<std::pair<int32_t, double>> ranked(logits.size());  // (token, scaled logit)
  for (size_t i = 0; i < logits.size(); ++i)
    ranked[i] = {static_cast<int32_t>(i), static_cast<double>(logits[i]) / config.temperature};
  const auto more_likely = [](const std::pair<int32_t, double>& a,
                              const std::pair<int32_t, double>& b) {
    return a.second != b.second ? a.second > b.second : a.first < b.first;
  };
  const size_t keep = config.top_k > 0 ? std::min(static_cast<size_t>(config.top_k), ranked.size())
                                       : ranked.size();
  std::partial_sort(ranked.begin(), ranked.begin() + static_cast<std::ptrdiff_t>(keep),
                    ranked.end(), more_likely);
  ranked.resize(keep);

  // Softmax over the kept tokens (the largest first, so exp never overflows).
  const double top = ranked.front().second;
  double total = 0;
  for (auto& entry : ranked) {
    entry.second = std::exp(entry.second - top);
    total += entry.second;
  }
  for (auto& entry : ranked) entry.second /= total;

  if (config.top_p < 1.0) {  // the smallest prefix whose probability reaches top_p
    double cumulative = 0;
    size_t n = 0;
    while (n < ranked.size()) {
      cumulative += ranked[n++].second;
      if (cumulative >= config.top_p) break;
    }
    ranked.resize(n);
    for (auto& entry : ranked) entry.second /= cumulative;
  }
  return ranked;
}

TokenSampler::TokenSampler(const SamplingConfig& config, uint64_t seed)
    : config_(config), rng_(seed) {
  config_.validate();
}

int32_t TokenSampler::next(const std::vector<float>& logits) {
  if (config_.greedy || config_.temperature == 0.0) return argmax_token(logits);
  const std::vector<std::pair<int32_t, double>> distribution =
      sampling_distribution(logits, config_);
  // A uniform double in [0, 1) from the top 53 bits of one draw.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  double cumulative = 0;
  for (const auto& [token, probability] : distribution) {
    cumulative += probability;
    if (u < cumulative) return token;
  }
  return distribution.back().first;  // rounding left u just above the total
}

}  // namespace freqkv
