// Hugging Face config.json <-> ModelConfig for LlamaForCausalLM models.
#pragma once

#include <string>

#include "model/model_config.h"

namespace freqkv {

// Reads a LLaMA config.json. Required: vocab_size, hidden_size, intermediate_size,
// num_hidden_layers, num_attention_heads. Optional (null means the default): num_key_value_heads
// (= num_attention_heads), head_dim (= hidden_size / num_attention_heads), rms_norm_eps (1e-6),
// rope_theta (10000), tie_word_embeddings (false), max_position_embeddings (4096), bos_token_id,
// eos_token_id (an int, or a list whose first entry is used). Rejects what this trainer does not
// implement: hidden_act other than "silu", a non-null rope_scaling, attention_bias / mlp_bias.
// Throws std::runtime_error naming the file and the field; the result is validate()d.
ModelConfig read_hf_config(const std::string& config_json_path);

// Writes config.json for LlamaForCausalLM (float32) with every ModelConfig field, atomically
// (path + ".tmp", then rename).
void write_hf_config(const ModelConfig& config, const std::string& path);

// The same from/to JSON text (a config stored inside a checkpoint); source names it in errors.
ModelConfig parse_hf_config(const std::string& json_text, const std::string& source);
std::string hf_config_json(const ModelConfig& config);

}  // namespace freqkv
