#include "model/hf_checkpoint.h"

#include <filesystem>
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
void save_hf_model(LlamaModel<T>& model, const std::string& dir) {
  std::filesystem::create_directories(dir);
  write_hf_config(model.config(), (std::filesystem::path(dir) / "config.json").string());
  SafetensorsWriter writer;
  const ParamTable& table = model.param_table();
  for (size_t i = 0; i < table.size(); ++i) {
    std::vector<float> values = model.get_param(i);
    writer.add(table[i].name, table[i].shape, values.data());
  }
  writer.write((std::filesystem::path(dir) / "model.safetensors").string());
}

template <typename T>
void save_hf_gradients(LlamaModel<T>& model, const std::string& path) {
  SafetensorsWriter writer;
  const ParamTable& table = model.param_table();
  for (size_t i = 0; i < table.size(); ++i) {
    std::vector<float> values = model.get_grad(i);
    writer.add(table[i].name, table[i].shape, values.data());
  }
  writer.write(path);
}

template void load_hf_weights(LlamaModel<float>&, const SafetensorsReader&);
template void load_hf_weights(LlamaModel<double>&, const SafetensorsReader&);
template void save_hf_model(LlamaModel<float>&, const std::string&);
template void save_hf_model(LlamaModel<double>&, const std::string&);
template void save_hf_gradients(LlamaModel<float>&, const std::string&);
template void save_hf_gradients(LlamaModel<double>&, const std::string&);

}  // namespace freqkv
