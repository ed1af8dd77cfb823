// Weights for model tests whose results must depend on every part of the model.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "model/llama_model.h"

namespace freqkv {

// The same logical weights on every model (set_param slices them under tp): std 0.5 so that
// attention matters, LoRA B non-zero so that the adapters change the result.
template <typename T>
void init_model(LlamaModel<T>& model, uint64_t seed) {
  model.init_random(seed, 0.5);
  std::mt19937_64 rng(seed + 7);
  std::normal_distribution<double> normal(0.0, 0.3);
  for (size_t i = 0; i < model.param_table().size(); ++i) {
    const ParamSpec& spec = model.param_table()[i];
    if (spec.role != ParamRole::kLoraB) continue;
    std::vector<double> values(static_cast<size_t>(spec.numel()));
    for (double& v : values) v = normal(rng);
    model.set_param(i, values.data());
  }
}

}  // namespace freqkv
