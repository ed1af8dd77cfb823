// What a training checkpoint holds and how it maps onto a model and its optimiser:
//
//   attributes  step, optimizer_step, config_yaml (the resolved training config),
//               model_config_json (the architecture, HF config.json)
//   model/<name>                   every parameter (LoRA factors included), logical fp32
//   optimizer/master/<name>        AdamW state of every trainable parameter
//   optimizer/exp_avg/<name>
//   optimizer/exp_avg_sq/<name>
//
// Names are the parameter table's (Hugging Face) names, tensors are unsharded, so a checkpoint
// is independent of the device and of the parallel layout that wrote it.
#pragma once

#include <cstdint>
#include <string>

#include "trainer/checkpoint_file.h"
#include "trainer/optimizer.h"

namespace freqkv {

// Writes model, optimiser and step into a checkpoint file (atomically, via CheckpointWriter).
// With ZeRO-1 every rank of the optimiser's dp group calls it: each parameter's state streams
// from its owner to dp rank 0, which writes the file.
template <typename T>
void save_training_checkpoint(const std::string& path, LlamaModel<T>& model, AdamW<T>& optimizer,
                              int64_t step, const std::string& config_yaml,
                              bool write_file = true);

// Loads every model/<name> tensor into the model; a tensor the model lacks or misses, or a shape
// mismatch, is an error naming the tensor and the checkpoint.
template <typename T>
void load_checkpoint_weights(const CheckpointReader& reader, LlamaModel<T>& model);

// Restores the optimiser state this rank keeps (all of it, or its ZeRO-1 share), sets the weights
// of those parameters, and returns the checkpoint's step.
template <typename T>
int64_t load_checkpoint_optimizer(const CheckpointReader& reader, AdamW<T>& optimizer);

// The architecture and the LoRA layout a checkpoint was trained with.
ModelConfig checkpoint_model_config(const CheckpointReader& reader);
LoraConfig checkpoint_lora_config(const CheckpointReader& reader);

}  // namespace freqkv
