// The architecture of a LLaMA-family model (Hugging Face config.json fields and semantics)
// and the FreqKV attention settings that apply to it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace freqkv {

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // GQA; equals num_attention_heads for multi-head attention
  int64_t head_dim = 0;             // defaults to hidden_size / num_attention_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 4096;  // the pretrained context: FreqKV's default cache size
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;

  // Throws std::invalid_argument naming the field when a value is missing or inconsistent
  // (heads not dividing, odd head_dim, non-positive sizes, ...).
  void validate() const;
};

// FreqKV's parameters (../shared/docs/FREQKV.md): cache C, sink S, ratio r.
struct FreqKVConfig {
  bool enabled = true;
  int64_t cache = 4096;  // C
  int64_t sink = 4;      // S
  double ratio = 0.5;    // r

  int64_t compressible() const { return cache - sink; }  // F = C - S
  int64_t compressed() const;                            // L = floor(F * r)
  int64_t step() const { return compressible() - compressed(); }  // new tokens per chunk
  // Throws std::invalid_argument when L < 1, step < 1, S < 0 or S >= C, naming the values.
  void validate() const;
};

// Low-rank adapters (LoRA, Hu et al. 2021; PEFT's semantics): a target Linear y = x W^T becomes
// y = x W^T + (alpha / rank) (x A^T) B^T with A [rank, in] and B [out, rank]; B starts at zero.
struct LoraConfig {
  bool enabled = false;
  int64_t rank = 8;
  double alpha = 16;
  // Module names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
  std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj"};

  double scaling() const { return alpha / static_cast<double>(rank); }
  bool targets_module(const std::string& module) const;
  // Throws std::invalid_argument for a non-positive rank/alpha or an unknown target module.
  void validate() const;
};

}  // namespace freqkv
