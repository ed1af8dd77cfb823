// From a training config to the objects a run is made of: the model's architecture and LoRA
// layout, and which parameters are trained.
#pragma once

#include "model/llama_model.h"
#include "trainer/train_config.h"

namespace freqkv {

// The LoRA layout the config asks for (disabled when lora.enabled is false).
LoraConfig lora_config_of(const TrainConfig& config);

// The architecture: model.path's config.json, or model.init_config.
ModelConfig model_config_of(const TrainConfig& config);

// LoRA fine-tuning trains the adapters and every parameter whose name contains one of
// lora.trainable; full fine-tuning (lora disabled) trains everything. Returns how many
// parameters (elements) are trained.
template <typename T>
int64_t apply_trainable(const TrainConfig& config, LlamaModel<T>& model);

}  // namespace freqkv
