// AdamW over a model's trainable parameters, with fp32 master weights and states living on the
// model's backend (PyTorch's torch.optim.AdamW semantics; decoupled weight decay, not applied to
// 1-D norm weights, as Hugging Face's Trainer does). Frozen parameters keep no state.
//
// ZeRO-1 (Rajbhandari et al.): over a data-parallel group, each trainable parameter is owned by
// one dp rank (largest first, to the least loaded rank), which alone keeps its master weights and
// moments and updates it; after the step the owner broadcasts the new weights. The gradients must
// already be summed over the group.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/llama_model.h"

namespace freqkv {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// The optimiser state of one parameter's shard on this rank (all of it without tensor
// parallelism), as fp32 host arrays (checkpoints, resharding).
struct AdamWParamState {
  std::vector<float> master, exp_avg, exp_avg_sq;
};

template <typename T>
class AdamW {
 public:
  // Takes the model's current (trainable) parameters as the master weights. With a dp group of
  // more than one rank and shard = true, the state is sharded (ZeRO-1).
  AdamW(LlamaModel<T>& model, const AdamWOptions& options, Communicator* dp = nullptr,
        bool shard = false);

  // The global L2 norm of the trainable parameters' gradients.
  double grad_norm();
  // One update of every trainable parameter with learning rate lr, the gradients multiplied by
  // grad_scale first (gradient clipping). Writes the new weights back into the model.
  void step(double lr, double grad_scale);

  LlamaModel<T>& model() { return model_; }
  int dp_rank() const { return dp_ ? dp_->rank() : 0; }
  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t steps) { step_count_ = steps; }
  // Parameter indices (into the model's table) that have state on this rank, in table order.
  const std::vector<size_t>& param_indices() const { return indices_; }
  // The dp rank that updates trainable parameter i (0 without sharding).
  int owner(size_t param_index) const { return owner_[param_index]; }
  AdamWParamState get_state(size_t param_index);
  // Restores a parameter's state; also writes master into the model's weights.
  void set_state(size_t param_index, const AdamWParamState& state);

 private:
  struct Slot {
    size_t param;
    int64_t numel;
    Buffer<float> master, exp_avg, exp_avg_sq;
    bool decay;
  };
  Slot& slot(size_t param_index);

  LlamaModel<T>& model_;
  AdamWOptions options_;
  Communicator* dp_ = nullptr;  // set when sharded
  std::vector<int> owner_;      // per parameter; -1 for frozen ones
  std::vector<Slot> slots_;
  std::vector<size_t> indices_;
  int64_t step_count_ = 0;
};

}  // namespace freqkv
