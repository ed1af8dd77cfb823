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

void ParamTable::add(const std::string& name, std::vector<int64_t> shape, ShardKind shard) {
  if (index_.count(name)) throw std::invalid_argument("parameter table: duplicate name " + name);
  ParamSpec spec{name, std::move(shape), shard, total_numel_};
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

ParamTable llama_param_table(const ModelConfig& c) {
  c.validate();
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t q_width = c.num_attention_heads * c.head_dim;
  const int64_t kv_width = c.num_key_value_heads * c.head_dim;
  ParamTable t;
  t.add("model.embed_tokens.weight", {V, H}, ShardKind::kColumn);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.add(p + "input_layernorm.weight", {H}, ShardKind::kReplicated);
    t.add(p + "self_attn.q_proj.weight", {q_width, H}, ShardKind::kColumn);
    t.add(p + "self_attn.k_proj.weight", {kv_width, H}, ShardKind::kColumn);
    t.add(p + "self_attn.v_proj.weight", {kv_width, H}, ShardKind::kColumn);
    t.add(p + "self_attn.o_proj.weight", {H, q_width}, ShardKind::kRow);
    t.add(p + "post_attention_layernorm.weight", {H}, ShardKind::kReplicated);
    t.add(p + "mlp.gate_proj.weight", {I, H}, ShardKind::kColumn);
    t.add(p + "mlp.up_proj.weight", {I, H}, ShardKind::kColumn);
    t.add(p + "mlp.down_proj.weight", {H, I}, ShardKind::kRow);
  }
  t.add("model.norm.weight", {H}, ShardKind::kReplicated);
  if (!c.tie_word_embeddings) t.add("lm_head.weight", {V, H}, ShardKind::kColumn);
  return t;
}

}  // namespace freqkv
