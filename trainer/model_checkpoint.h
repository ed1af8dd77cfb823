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

// Who writes what when all ranks of a job write one checkpoint together (parallel HDF5).
struct CheckpointLayout {
  MPI_Comm comm = MPI_COMM_NULL;  // every rank of the job; MPI_COMM_NULL: one process, serial
  int tp_rank = 0;                // offset of this rank's tensor-parallel shards
  bool writes_weights = true;     // this rank's copy of the weights is written (sp 0, dp 0)
  bool writes_states = true;      // this rank writes the optimiser states it owns (sp 0)
};

// Writes model, optimiser and step into one checkpoint file, atomically: every rank of
// layout.comm calls it and writes its own blocks of the logical tensors -- its tensor-parallel
// shard, the ZeRO-1 states it owns -- through MPI-IO (trainer/checkpoint_file.h).
template <typename T>
void save_training_checkpoint(const std::string& path, LlamaModel<T>& model, AdamW<T>& optimizer,
                              int64_t step, const std::string& config_yaml,
                              const CheckpointLayout& layout = CheckpointLayout());

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
