#include "trainer/train_setup.h"

#include <filesystem>
#include <stdexcept>

#include "model/hf_config.h"

namespace freqkv {

LoraConfig lora_config_of(const TrainConfig& config) {
  LoraConfig lora;
  lora.enabled = config.lora.enabled;
  lora.rank = config.lora.rank;
  lora.alpha = config.lora.alpha;
  lora.targets = config.lora.targets;
  lora.validate();
  return lora;
}

ModelConfig model_config_of(const TrainConfig& config) {
  if (!config.model.path.empty()) {
    const std::string path = (std::filesystem::path(config.model.path) / "config.json").string();
    if (!std::filesystem::exists(path))
      throw std::runtime_error("model.path " + config.model.path +
                               " has no config.json: is it a Hugging Face model directory?");
    return read_hf_config(path);
  }
  return read_hf_config(config.model.init_config);
}

template <typename T>
int64_t apply_trainable(const TrainConfig& config, LlamaModel<T>& model) {
  const ParamTable& table = model.param_table();
  int64_t trained = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    bool train = !config.lora.enabled || table[i].is_lora();
    for (const std::string& pattern : config.lora.trainable)
      train = train || table[i].name.find(pattern) != std::string::npos;
    model.set_trainable(i, train);
    if (train) trained += table[i].numel();
  }
  return trained;
}

template int64_t apply_trainable(const TrainConfig&, LlamaModel<float>&);
template int64_t apply_trainable(const TrainConfig&, LlamaModel<double>&);
template int64_t apply_trainable(const TrainConfig&, LlamaModel<bf16>&);

}  // namespace freqkv
