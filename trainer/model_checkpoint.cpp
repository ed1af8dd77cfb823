#include "trainer/model_checkpoint.h"

#include <set>
#include <stdexcept>

#include "model/hf_config.h"
#include "trainer/train_setup.h"

namespace freqkv {

namespace {

const char* kStateGroups[] = {"optimizer/master/", "optimizer/exp_avg/", "optimizer/exp_avg_sq/"};

}  // namespace

template <typename T>
void save_training_checkpoint(const std::string& path, LlamaModel<T>& model, AdamW<T>& optimizer,
                              int64_t step, const std::string& config_yaml,
                              const CheckpointLayout& layout) {
  CheckpointWriter writer(path, layout.comm);  // collective over every rank of the job
  writer.set_attribute("step", step);
  writer.set_attribute("optimizer_step", optimizer.step_count());
  writer.set_attribute("config_yaml", config_yaml);
  writer.set_attribute("model_config_json", hf_config_json(model.config()));
  const ParamTable& table = model.param_table();

  // This rank's block of parameter i in the logical tensor: its tensor-parallel shard, or the
  // whole tensor (written by tp rank 0 alone) when the parameter is not split.
  const auto write_shard = [&](const std::string& name, size_t i, const std::vector<float>& local,
                               bool this_rank_writes) {
    writer.create_tensor(name, table[i].shape);
    const int split = model.split_dim(i);
    if (!this_rank_writes || (split < 0 && layout.tp_rank != 0)) {
      writer.write_rows(name, 0, 0, nullptr);  // nothing from this rank
      return;
    }
    std::vector<int64_t> offset(table[i].shape.size(), 0);
    if (split >= 0) offset[static_cast<size_t>(split)] = layout.tp_rank * model.local_shape(i)[static_cast<size_t>(split)];
    writer.write_block(name, offset, model.local_shape(i), local.data());
  };
  for (size_t i = 0; i < table.size(); ++i)
    write_shard("model/" + table[i].name, i, model.get_param_local(i), layout.writes_weights);
  for (size_t i = 0; i < table.size(); ++i) {
    if (optimizer.owner(i) < 0) continue;  // frozen: no state
    // ZeRO-1: the owner (a dp rank) holds the state; every sp rank holds a copy, sp rank 0 writes.
    const bool mine = layout.writes_states && optimizer.owner(i) == optimizer.dp_rank();
    AdamWParamState state;
    if (mine) state = optimizer.get_state(i);
    const std::vector<float>* parts[] = {&state.master, &state.exp_avg, &state.exp_avg_sq};
    for (int p = 0; p < 3; ++p) write_shard(kStateGroups[p] + table[i].name, i, *parts[p], mine);
  }
  writer.commit();
}

template <typename T>
void load_checkpoint_weights(const CheckpointReader& reader, LlamaModel<T>& model) {
  const ParamTable& table = model.param_table();
  for (const std::string& name : reader.tensor_names("model")) {
    const std::string param = name.substr(std::string("model/").size());
    if (table.find(param) < 0)
      throw std::runtime_error("checkpoint " + reader.path() + " holds " + param +
                               ", which this model does not have (different architecture or "
                               "LoRA targets?)");
  }
  for (size_t i = 0; i < table.size(); ++i) {
    const std::string name = "model/" + table[i].name;
    if (!reader.has_tensor(name))
      throw std::runtime_error("checkpoint " + reader.path() + " has no tensor " + table[i].name +
                               " " + shape_string(table[i].shape));
    if (reader.shape(name) != table[i].shape)
      throw std::runtime_error("checkpoint " + reader.path() + ": " + table[i].name + " is " +
                               shape_string(reader.shape(name)) + ", the model expects " +
                               shape_string(table[i].shape));
    const std::vector<float> values = reader.read_tensor(name);
    model.set_param(i, values.data());
  }
}

template <typename T>
int64_t load_checkpoint_optimizer(const CheckpointReader& reader, AdamW<T>& optimizer) {
  const ParamTable& table = optimizer.model().param_table();
  AdamWParamState state;
  std::vector<float>* parts[] = {&state.master, &state.exp_avg, &state.exp_avg_sq};
  for (size_t i : optimizer.param_indices()) {
    for (int p = 0; p < 3; ++p) {
      const std::string name = kStateGroups[p] + table[i].name;
      if (!reader.has_tensor(name))
        throw std::runtime_error("checkpoint " + reader.path() + " has no optimiser state " + name +
                                 ": the parameter was frozen when it was written (did "
                                 "lora.trainable or lora.enabled change?)");
      const std::vector<float> logical = reader.read_tensor(name);
      *parts[p] = optimizer.model().slice_local(i, logical.data());
    }
    optimizer.set_state(i, state);
  }
  optimizer.set_step_count(reader.int_attribute("optimizer_step"));
  return reader.int_attribute("step");
}

ModelConfig checkpoint_model_config(const CheckpointReader& reader) {
  return parse_hf_config(reader.string_attribute("model_config_json"),
                         reader.path() + " (model_config_json)");
}

LoraConfig checkpoint_lora_config(const CheckpointReader& reader) {
  const TrainConfig config = load_train_config_from_string(
      reader.string_attribute("config_yaml"), {}, reader.path() + " (config_yaml)");
  return lora_config_of(config);
}

template void save_training_checkpoint(const std::string&, LlamaModel<float>&, AdamW<float>&,
                                       int64_t, const std::string&, const CheckpointLayout&);
template void save_training_checkpoint(const std::string&, LlamaModel<double>&, AdamW<double>&,
                                       int64_t, const std::string&, const CheckpointLayout&);
template void load_checkpoint_weights(const CheckpointReader&, LlamaModel<float>&);
template void load_checkpoint_weights(const CheckpointReader&, LlamaModel<double>&);
template int64_t load_checkpoint_optimizer(const CheckpointReader&, AdamW<float>&);
template int64_t load_checkpoint_optimizer(const CheckpointReader&, AdamW<double>&);
template void save_training_checkpoint(const std::string&, LlamaModel<bf16>&, AdamW<bf16>&,
                                       int64_t, const std::string&, const CheckpointLayout&);
template void load_checkpoint_weights(const CheckpointReader&, LlamaModel<bf16>&);
template int64_t load_checkpoint_optimizer(const CheckpointReader&, AdamW<bf16>&);

}  // namespace freqkv
