#include "model/hf_config.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace freqkv {

namespace {

using nlohmann::json;

// Field readers: each error names the file and the field and shows the offending value.
class ConfigFields {
 public:
  ConfigFields(const json& root, const std::string& path) : root_(root), path_(path) {}

  // An absent field and an explicit null both mean "use the default".
  bool has(const char* field) const { return root_.contains(field) && !root_[field].is_null(); }

  [[noreturn]] void fail(const char* field, const std::string& problem) const {
    throw std::runtime_error("config '" + path_ + "': field '" + field + "' " + problem);
  }

  int64_t required_int(const char* field) const {
    if (!has(field)) fail(field, "is required but missing");
    return as_int(field, root_[field]);
  }
  int64_t optional_int(const char* field, int64_t fallback) const {
    return has(field) ? as_int(field, root_[field]) : fallback;
  }
  double optional_number(const char* field, double fallback) const {
    if (!has(field)) return fallback;
    const json& value = root_[field];
    if (!value.is_number()) fail(field, "is " + value.dump() + ", expected a number");
    return value.get<double>();
  }
  bool optional_bool(const char* field, bool fallback) const {
    if (!has(field)) return fallback;
    const json& value = root_[field];
    if (!value.is_boolean()) fail(field, "is " + value.dump() + ", expected true or false");
    return value.get<bool>();
  }
  std::string optional_string(const char* field, const std::string& fallback) const {
    if (!has(field)) return fallback;
    const json& value = root_[field];
    if (!value.is_string()) fail(field, "is " + value.dump() + ", expected a string");
    return value.get<std::string>();
  }
  // An int or a list of ints (several end-of-sequence tokens): the first one is used.
  int64_t optional_int_or_first(const char* field, int64_t fallback) const {
    if (!has(field)) return fallback;
    const json& value = root_[field];
    if (value.is_array()) {
      if (value.empty()) fail(field, "is an empty list, expected an integer or a list of integers");
      return as_int(field, value[0]);
    }
    return as_int(field, value);
  }
  const json& raw(const char* field) const { return root_[field]; }

 private:
  int64_t as_int(const char* field, const json& value) const {
    if (!value.is_number_integer()) fail(field, "is " + value.dump() + ", expected an integer");
    return value.get<int64_t>();
  }

  const json& root_;
  const std::string& path_;
};

void write_text_atomically(const std::string& path, const std::string& text) {
  const std::string tmp_path = path + ".tmp";
  {
    std::ofstream out(tmp_path, std::ios::trunc);
    if (!out) {
      throw std::runtime_error("cannot create '" + tmp_path + "' to write config '" + path +
                               "': " + std::strerror(errno));
    }
    out << text;
    out.flush();
    if (!out) {
      std::remove(tmp_path.c_str());
      throw std::runtime_error("failed writing '" + tmp_path + "' (for config '" + path + "')");
    }
  }
  if (std::rename(tmp_path.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    std::remove(tmp_path.c_str());
    throw std::runtime_error("cannot rename '" + tmp_path + "' to '" + path + "': " + reason);
  }
}

}  // namespace

ModelConfig read_hf_config(const std::string& config_json_path) {
  std::ifstream in(config_json_path);
  if (!in) {
    throw std::runtime_error("cannot open config '" + config_json_path +
                             "': " + std::strerror(errno));
  }
  std::ostringstream text;
  text << in.rdbuf();
  return parse_hf_config(text.str(), config_json_path);
}

ModelConfig parse_hf_config(const std::string& json_text, const std::string& config_json_path) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& error) {
    throw std::runtime_error("config '" + config_json_path + "' is not valid JSON: " +
                             error.what());
  }
  if (!root.is_object()) {
    throw std::runtime_error("config '" + config_json_path + "' is " +
                             std::string(root.type_name()) + ", expected a JSON object");
  }
  const ConfigFields fields(root, config_json_path);

  // Features of the Hugging Face LLaMA family that this trainer does not implement.
  const std::string hidden_act = fields.optional_string("hidden_act", "silu");
  if (hidden_act != "silu") {
    fields.fail("hidden_act", "is \"" + hidden_act + "\"; only \"silu\" (SwiGLU) is supported");
  }
  if (fields.has("rope_scaling")) {
    fields.fail("rope_scaling", "is " + fields.raw("rope_scaling").dump() +
                                    "; RoPE scaling is not supported (only plain RoPE with "
                                    "rope_theta), it must be absent or null");
  }
  for (const char* bias_field : {"attention_bias", "mlp_bias"}) {
    if (fields.optional_bool(bias_field, false)) {
      fields.fail(bias_field, "is true; linear layers with biases are not supported");
    }
  }

  ModelConfig config;
  config.vocab_size = fields.required_int("vocab_size");
  config.hidden_size = fields.required_int("hidden_size");
  config.intermediate_size = fields.required_int("intermediate_size");
  config.num_hidden_layers = fields.required_int("num_hidden_layers");
  config.num_attention_heads = fields.required_int("num_attention_heads");
  config.num_key_value_heads =
      fields.optional_int("num_key_value_heads", config.num_attention_heads);
  if (fields.has("head_dim")) {
    config.head_dim = fields.optional_int("head_dim", 0);
  } else {
    if (config.num_attention_heads <= 0) {
      fields.fail("num_attention_heads",
                  "is " + std::to_string(config.num_attention_heads) + ", expected > 0");
    }
    if (config.hidden_size % config.num_attention_heads != 0) {
      fields.fail("hidden_size", "(" + std::to_string(config.hidden_size) +
                                     ") is not divisible by num_attention_heads (" +
                                     std::to_string(config.num_attention_heads) +
                                     ") and no head_dim is given");
    }
    config.head_dim = config.hidden_size / config.num_attention_heads;
  }
  config.rms_norm_eps = fields.optional_number("rms_norm_eps", 1e-6);
  config.rope_theta = fields.optional_number("rope_theta", 10000.0);
  config.tie_word_embeddings = fields.optional_bool("tie_word_embeddings", false);
  config.max_position_embeddings = fields.optional_int("max_position_embeddings", 4096);
  config.bos_token_id = fields.optional_int_or_first("bos_token_id", config.bos_token_id);
  config.eos_token_id = fields.optional_int_or_first("eos_token_id", config.eos_token_id);

  try {
    config.validate();
  } catch (const std::invalid_argument& error) {
    // Re-thrown as runtime_error so every problem with the file has one exception type.
    throw std::runtime_error("config '" + config_json_path + "': " + error.what());
  }
  return config;
}

void write_hf_config(const ModelConfig& config, const std::string& path) {
  write_text_atomically(path, hf_config_json(config));
}

std::string hf_config_json(const ModelConfig& config) {
  nlohmann::ordered_json root;
  root["architectures"] = {"LlamaForCausalLM"};
  root["model_type"] = "llama";
  root["hidden_act"] = "silu";
  root["torch_dtype"] = "float32";
  root["vocab_size"] = config.vocab_size;
  root["hidden_size"] = config.hidden_size;
  root["intermediate_size"] = config.intermediate_size;
  root["num_hidden_layers"] = config.num_hidden_layers;
  root["num_attention_heads"] = config.num_attention_heads;
  root["num_key_value_heads"] = config.num_key_value_heads;
  root["head_dim"] = config.head_dim;
  root["rms_norm_eps"] = config.rms_norm_eps;
  root["rope_theta"] = config.rope_theta;
  root["rope_scaling"] = nullptr;
  root["attention_bias"] = false;
  root["mlp_bias"] = false;
  root["tie_word_embeddings"] = config.tie_word_embeddings;
  root["max_position_embeddings"] = config.max_position_embeddings;
  root["bos_token_id"] = config.bos_token_id;
  root["eos_token_id"] = config.eos_token_id;
  return root.dump(2) + "\n";
}

}  // namespace freqkv
