// The named table of a model's parameters: Hugging Face names, logical (unsharded) shapes and how
// each tensor is split under tensor parallelism. It fixes where each parameter lives in the one
// contiguous parameter arena (and the gradient arena beside it), and it drives safetensors
// import/export, checkpoint dataset names and, later, TP slicing and optimiser sharding.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/model_config.h"

namespace freqkv {

// How a tensor is split across tensor-parallel ranks (Megatron's layer kinds).
enum class ShardKind {
  kReplicated,  // every rank holds it whole (norm weights)
  kColumn,      // split along dim 0, the output features (q/k/v, gate/up; vocab rows of embeddings)
  kRow,         // split along dim 1, the input features (o, down)
};

const char* shard_kind_name(ShardKind kind);

// What a parameter is to the model: a base weight, or one factor of a LoRA adapter.
enum class ParamRole { kWeight, kLoraA, kLoraB };

struct ParamSpec {
  std::string name;            // Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight
  std::vector<int64_t> shape;  // logical shape
  ShardKind shard;
  int64_t offset = 0;  // elements before it in the arena
  ParamRole role = ParamRole::kWeight;
  std::string adapts;  // LoRA factors: the weight they adapt (q_proj.weight for q_proj.lora_A)
  int64_t numel() const;
  bool is_norm() const;  // a 1-D scale (initialised to one)
  bool is_lora() const { return role != ParamRole::kWeight; }
};

std::string shape_string(const std::vector<int64_t>& shape);  // "[32000, 4096]"

class ParamTable {
 public:
  // Appends a parameter after the last one; the name must be new.
  void add(const std::string& name, std::vector<int64_t> shape, ShardKind shard,
           ParamRole role = ParamRole::kWeight, const std::string& adapts = "");
  const std::vector<ParamSpec>& specs() const { return specs_; }
  size_t size() const { return specs_.size(); }
  const ParamSpec& operator[](size_t i) const { return specs_[i]; }
  // Index of the parameter called name, or -1.
  int64_t find(const std::string& name) const;
  // The spec called name; throws std::out_of_range naming it when absent.
  const ParamSpec& at(const std::string& name) const;
  int64_t total_numel() const { return total_numel_; }

 private:
  std::vector<ParamSpec> specs_;
  std::unordered_map<std::string, size_t> index_;
  int64_t total_numel_ = 0;
};

// The parameters of a LLaMA model in Hugging Face's names and order; with LoRA, each target
// weight is followed by its adapter, named as PEFT names it inside the model
// (model.layers.0.self_attn.q_proj.lora_A.weight [rank, in], ...lora_B.weight [out, rank]).
ParamTable llama_param_table(const ModelConfig& config, const LoraConfig& lora = LoraConfig());

}  // namespace freqkv
