#include "model/param_table.h"

#include <stdexcept>

namespace freqkv {

const char* shard_kind_name(ShardKind kind) {
  switch (kind) {
    case ShardKind::kReplicated: return "replicated";
    case ShardKind::kColumn: return "column";
    case ShardKind::kRow: return "row";
  }
  return "?";
}

int64_t ParamSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool ParamSpec::is_norm() const { return shape.size() == 1; }

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void ParamTable::add(const std::string& name, std::vector<int64_t> shape, ShardKind shard,
                     ParamRole role, const std::string& adapts) {
  if (index_.count(name)) throw std::invalid_argument("parameter table: duplicate name " + name);
  ParamSpec spec{name, std::move(shape), shard, total_numel_, role, adapts};
  total_numel_ += spec.numel();
  index_[name] = specs_.size();
  specs_.push_back(std::move(spec));
}

int64_t ParamTable::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? -1 : static_cast<int64_t>(it->second);
}

const ParamSpec& ParamTable::at(const std::string& name) const {
  int64_t i = find(name);
  if (i < 0) throw std::out_of_range("parameter table: no parameter named " + name);
  return specs_[static_cast<size_t>(i)];
}

ParamTable llama_param_table(const ModelConfig& c, const LoraConfig& lora) {
  c.validate();
  lora.validate();
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t q_width = c.num_attention_heads * c.head_dim;
  const int64_t kv_width = c.num_key_value_heads * c.head_dim;
  ParamTable t;
  // A linear layer [out, in] and, when LoRA targets it, its adapter. Under tensor parallelism
  // the adapter splits with its layer: B with a column-parallel output, A with a row-parallel
  // input; the other factor is replicated.
  auto linear = [&](const std::string& prefix, const std::string& module, int64_t out, int64_t in,
                    ShardKind shard) {
    const std::string weight = prefix + module + ".weight";
    t.add(weight, {out, in}, shard);
    if (!lora.enabled || !lora.targets_module(module)) return;
    const bool column = shard == ShardKind::kColumn;
    t.add(prefix + module + ".lora_A.weight", {lora.rank, in},
          column ? ShardKind::kReplicated : ShardKind::kRow, ParamRole::kLoraA, weight);
    t.add(prefix + module + ".lora_B.weight", {out, lora.rank},
          column ? ShardKind::kColumn : ShardKind::kReplicated, ParamRole::kLoraB, weight);
  };
  t.add("model.embed_tokens.weight", {V, H}, ShardKind::kColumn);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.add(p + "input_layernorm.weight", {H}, ShardKind::kReplicated);
    linear(p + "self_attn.", "q_proj", q_width, H, ShardKind::kColumn);
    linear(p + "self_attn.", "k_proj", kv_width, H, ShardKind::kColumn);
    linear(p + "self_attn.", "v_proj", kv_width, H, ShardKind::kColumn);
    linear(p + "self_attn.", "o_proj", H, q_width, ShardKind::kRow);
    t.add(p + "post_attention_layernorm.weight", {H}, ShardKind::kReplicated);
    linear(p + "mlp.", "gate_proj", I, H, ShardKind::kColumn);
    linear(p + "mlp.", "up_proj", I, H, ShardKind::kColumn);
    linear(p + "mlp.", "down_proj", H, I, ShardKind::kRow);
  }
  t.add("model.norm.weight", {H}, ShardKind::kReplicated);
  if (!c.tie_word_embeddings) t.add("lm_head.weight", {V, H}, ShardKind::kColumn);
  return t;
}

}  // namespace freqkv
