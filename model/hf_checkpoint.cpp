#include "model/hf_checkpoint.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "model/hf_config.h"

namespace freqkv {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

template <typename T>
void load_hf_weights(LlamaModel<T>& model, const SafetensorsReader& reader) {
  const ParamTable& table = model.param_table();
  for (const std::string& name : reader.names()) {
    if (table.find(name) >= 0 || ends_with(name, "rotary_emb.inv_freq")) continue;
    if (name == "lm_head.weight" && model.config().tie_word_embeddings) continue;
    throw std::runtime_error("checkpoint tensor " + name + " " + shape_string(reader.shape(name)) +
                             " is not a parameter of this model (check config.json's "
                             "num_hidden_layers and tie_word_embeddings)");
  }
  std::vector<float> values;
  for (size_t i = 0; i < table.size(); ++i) {
    const ParamSpec& spec = table[i];
    if (spec.is_lora()) continue;  // adapters are not part of a base model
    if (!reader.contains(spec.name))
      throw std::runtime_error("checkpoint has no tensor " + spec.name + " (expected shape " +
                               shape_string(spec.shape) + ")");
    if (reader.shape(spec.name) != spec.shape)
      throw std::runtime_error("checkpoint tensor " + spec.name + " has shape " +
                               shape_string(reader.shape(spec.name)) + ", the model expects " +
                               shape_string(spec.shape) + " (does config.json match the weights?)");
    values.resize(static_cast<size_t>(spec.numel()));
    reader.read_f32_into(spec.name, values.data(), spec.numel());
    model.set_param(i, values.data());
  }
}

template <typename T>
std::vector<float> merged_weight(LlamaModel<T>& model, size_t i) {
  const ParamTable& table = model.param_table();
  std::vector<float> w = model.get_param(i);
  const std::string& name = table[i].name;
  const std::string module = name.substr(0, name.size() - std::string(".weight").size());
  const int64_t a_index = table.find(module + ".lora_A.weight");
  if (a_index < 0) return w;
  const std::vector<float> a = model.get_param(static_cast<size_t>(a_index));
  const std::vector<float> b = model.get_param(static_cast<size_t>(table.find(module + ".lora_B.weight")));
  const int64_t out = table[i].shape[0], in = table[i].shape[1], r = model.lora_config().rank;
  const double s = model.lora_config().scaling();
  for (int64_t o = 0; o < out; ++o)
    for (int64_t j = 0; j < in; ++j) {
      double delta = 0;
      for (int64_t q = 0; q < r; ++q) delta += static_cast<double>(b[o * r + q]) * a[q * in + j];
      w[o * in + j] = static_cast<float>(w[o * in + j] + s * delta);
    }
  return w;
}

template <typename T>
void save_hf_model(LlamaModel<T>& model, const std::string& dir) {
  std::filesystem::create_directories(dir);
  write_hf_config(model.config(), (std::filesystem::path(dir) / "config.json").string());
  SafetensorsWriter writer;
  const ParamTable& table = model.param_table();
  for (size_t i = 0; i < table.size(); ++i) {
    if (table[i].is_lora()) continue;
    const std::vector<float> values = merged_weight(model, i);
    writer.add(table[i].name, table[i].shape, values.data());
  }
  writer.write((std::filesystem::path(dir) / "model.safetensors").string());
}

template <typename T>
void save_peft_adapter(LlamaModel<T>& model, const std::string& dir) {
  const LoraConfig& lora = model.lora_config();
  if (!lora.enabled) throw std::runtime_error("the model has no LoRA adapter to export");
  std::filesystem::create_directories(dir);
  SafetensorsWriter writer;
  const ParamTable& table = model.param_table();
  for (size_t i = 0; i < table.size(); ++i) {
    if (!table[i].is_lora()) continue;
    const std::vector<float> values = model.get_param(i);
    writer.add("base_model.model." + table[i].name, table[i].shape, values.data());
  }
  writer.write((std::filesystem::path(dir) / "adapter_model.safetensors").string());
  nlohmann::json config = {{"peft_type", "LORA"},
                           {"task_type", "CAUSAL_LM"},
                           {"r", lora.rank},
                           {"lora_alpha", lora.alpha},
                           {"lora_dropout", 0.0},
                           {"bias", "none"},
                           {"fan_in_fan_out", false},
                           {"target_modules", lora.targets},
                           {"base_model_name_or_path", nullptr}};
  const std::string path = (std::filesystem::path(dir) / "adapter_config.json").string();
  std::ofstream out(path + ".tmp");
  out << config.dump(2) << "\n";
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path);
  std::filesystem::rename(path + ".tmp", path);
}

template <typename T>
void save_hf_gradients(LlamaModel<T>& model, const std::string& path, bool write_file) {
  SafetensorsWriter writer;
  const ParamTable& table = model.param_table();
  for (size_t i = 0; i < table.size(); ++i) {
    std::vector<float> values = model.get_grad(i);
    if (write_file) writer.add(table[i].name, table[i].shape, values.data());
  }
  if (write_file) writer.write(path);
}

template void load_hf_weights(LlamaModel<float>&, const SafetensorsReader&);
template void load_hf_weights(LlamaModel<double>&, const SafetensorsReader&);
template void save_hf_model(LlamaModel<float>&, const std::string&);
template void save_hf_model(LlamaModel<double>&, const std::string&);
template void save_hf_gradients(LlamaModel<float>&, const std::string&, bool);
template void save_peft_adapter(LlamaModel<float>&, const std::string&);
template void save_peft_adapter(LlamaModel<double>&, const std::string&);
template void save_hf_gradients(LlamaModel<double>&, const std::string&, bool);
template void load_hf_weights(LlamaModel<bf16>&, const SafetensorsReader&);
template void save_hf_model(LlamaModel<bf16>&, const std::string&);
template void save_hf_gradients(LlamaModel<bf16>&, const std::string&, bool);
template void save_peft_adapter(LlamaModel<bf16>&, const std::string&);

}  // namespace freqkv
