#include "model/model_config.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace freqkv {

namespace {

void require_positive(const char* field, int64_t value) {
  if (value <= 0) {
    throw std::invalid_argument(std::string("model config: ") + field + " must be positive, got " +
                                std::to_string(value));
  }
}

}  // namespace

void ModelConfig::validate() const {
  require_positive("vocab_size", vocab_size);
  require_positive("hidden_size", hidden_size);
  require_positive("intermediate_size", intermediate_size);
  require_positive("num_hidden_layers", num_hidden_layers);
  require_positive("num_attention_heads", num_attention_heads);
  require_positive("num_key_value_heads", num_key_value_heads);
  require_positive("head_dim", head_dim);
  require_positive("max_position_embeddings", max_position_embeddings);
  if (num_attention_heads % num_key_value_heads != 0) {
    throw std::invalid_argument(
        "model config: num_attention_heads (" + std::to_string(num_attention_heads) +
        ") must be divisible by num_key_value_heads (" + std::to_string(num_key_value_heads) +
        ") for grouped-query attention");
  }
  if (head_dim % 2 != 0) {
    // RoPE rotates channel pairs (i, i + head_dim/2).
    throw std::invalid_argument("model config: head_dim must be even for RoPE, got " +
                                std::to_string(head_dim));
  }
  if (!(rms_norm_eps > 0.0) || !std::isfinite(rms_norm_eps)) {
    std::ostringstream message;
    message << "model config: rms_norm_eps must be a positive finite number, got " << rms_norm_eps;
    throw std::invalid_argument(message.str());
  }
  if (!(rope_theta > 0.0) || !std::isfinite(rope_theta)) {
    std::ostringstream message;
    message << "model config: rope_theta must be a positive finite number, got " << rope_theta;
    throw std::invalid_argument(message.str());
  }
}

int64_t FreqKVConfig::compressed() const {
  // A plain floor of the double product, as the reference Python does (int(F * r)).
  return static_cast<int64_t>(std::floor(static_cast<double>(compressible()) * ratio));
}

void FreqKVConfig::validate() const {
  std::ostringstream values;
  values << "(cache C=" << cache << ", sink S=" << sink << ", ratio r=" << ratio << ")";
  const std::string context = "FreqKV config " + values.str() + ": ";
  if (sink < 0) {
    throw std::invalid_argument(context + "the sink size must be >= 0");
  }
  if (sink >= cache) {
    throw std::invalid_argument(context + "the sink size must be smaller than the cache size; "
                                          "increase the cache or reduce the sink");
  }
  if (!(ratio > 0.0 && ratio <= 1.0)) {
    throw std::invalid_argument(context + "the ratio must be in (0, 1], e.g. 0.5");
  }
  const int64_t kept = compressed();
  const int64_t new_tokens = step();
  if (kept < 1) {
    throw std::invalid_argument(
        context + "compressed length L = floor((C - S) * r) = floor(" +
        std::to_string(compressible()) + " * r) = " + std::to_string(kept) +
        " < 1; increase the cache size or the ratio");
  }
  if (new_tokens < 1) {
    throw std::invalid_argument(
        context + "step = (C - S) - L = " + std::to_string(compressible()) + " - " +
        std::to_string(kept) + " = " + std::to_string(new_tokens) +
        " < 1, so no new tokens fit after compression; lower the ratio below 1 or increase the "
        "cache size");
  }
}

bool LoraConfig::targets_module(const std::string& module) const {
  for (const std::string& t : targets)
    if (t == module) return true;
  return false;
}

void LoraConfig::validate() const {
  if (!enabled) return;
  if (rank < 1)
    throw std::invalid_argument("LoRA rank must be >= 1, got " + std::to_string(rank));
  if (!(alpha > 0))
    throw std::invalid_argument("LoRA alpha must be > 0, got " + std::to_string(alpha));
  static const char* kModules[] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                   "gate_proj", "up_proj", "down_proj"};
  for (const std::string& t : targets) {
    bool known = false;
    for (const char* m : kModules) known = known || t == m;
    if (!known)
      throw std::invalid_argument("LoRA target '" + t +
                                  "' is not a LLaMA linear module (valid: q_proj k_proj v_proj "
                                  "o_proj gate_proj up_proj down_proj)");
  }
}

}  // namespace freqkv
