// Hugging Face model directories (config.json + model.safetensors or a sharded index) in and out
// of a LlamaModel, by the parameter table's names.
#pragma once

#include <string>

#include "model/llama_model.h"
#include "model/safetensors.h"

namespace freqkv {

// Copies every parameter from the reader into the model. A missing tensor, a tensor whose shape
// differs from the table's, or a tensor the model does not have is an error naming it.
// (rotary_emb.inv_freq buffers of older checkpoints are skipped; a tied model ignores a stored
// lm_head.weight, as transformers does.)
template <typename T>
void load_hf_weights(LlamaModel<T>& model, const SafetensorsReader& reader);

// Writes config.json and model.safetensors (F32) into dir, creating it. LoRA adapters are merged
// into their weights (W + alpha/rank B A): the result is a plain Hugging Face LLaMA.
template <typename T>
void save_hf_model(LlamaModel<T>& model, const std::string& dir);

// Writes the LoRA adapter alone in PEFT's layout: adapter_config.json and
// adapter_model.safetensors with names base_model.model.<parameter name>.
template <typename T>
void save_peft_adapter(LlamaModel<T>& model, const std::string& dir);

// Writes the gradients as an F32 safetensors file with the parameters' names. Under tensor
// parallelism every rank of the tp group calls it (the shards are gathered) and the one with
// write_file = true writes.
template <typename T>
void save_hf_gradients(LlamaModel<T>& model, const std::string& path, bool write_file = true);

}  // namespace freqkv
