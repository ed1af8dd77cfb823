#include "trainer/optimizer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace freqkv {

template <typename T>
AdamW<T>::AdamW(LlamaModel<T>& model, const AdamWOptions& options, Communicator* dp, bool shard)
    : model_(model), options_(options) {
  Kernels<T>& k = model_.kernels();
  const ParamTable& table = model_.param_table();
  owner_.assign(table.size(), -1);
  std::vector<size_t> trainable;
  for (size_t i = 0; i < table.size(); ++i)
    if (model_.trainable(i)) trainable.push_back(i);
  if (shard && dp && dp->size() > 1) {
    dp_ = dp;
    // Largest first onto the least loaded rank: a balanced, deterministic assignment that every
    // rank computes alike.
    std::vector<size_t> by_size = trainable;
    std::stable_sort(by_size.begin(), by_size.end(), [&](size_t a, size_t b) {
      return model_.local_numel(a) > model_.local_numel(b);
    });
    std::vector<int64_t> load(static_cast<size_t>(dp->size()), 0);
    for (size_t i : by_size) {
      const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
      owner_[i] = r;
      load[static_cast<size_t>(r)] += model_.local_numel(i);
    }
  } else {
    for (size_t i : trainable) owner_[i] = 0;
  }
  const int my_rank = dp_ ? dp_->rank() : 0;
  for (size_t i : trainable) {
    if (owner_[i] != my_rank) continue;
    const int64_t n = model_.local_numel(i);  // this tp rank's shard
    Slot s{i, n, Buffer<float>(k, n), Buffer<float>(k, n), Buffer<float>(k, n), !table[i].is_norm()};
    const std::vector<float> weights = model_.get_param_local(i);
    k.copy_to_device(s.master.data(), weights.data(), static_cast<size_t>(n) * sizeof(float));
    slots_.push_back(std::move(s));
    indices_.push_back(i);
  }
}

template <typename T>
typename AdamW<T>::Slot& AdamW<T>::slot(size_t param_index) {
  for (Slot& s : slots_)
    if (s.param == param_index) return s;
  throw std::out_of_range("AdamW: parameter " + model_.param_table()[param_index].name +
                          (owner_[param_index] < 0
                               ? std::string(" is frozen and has no optimiser state")
                               : " has its optimiser state on dp rank " +
                                     std::to_string(owner_[param_index]) + " (ZeRO-1)"));
}

template <typename T>
double AdamW<T>::grad_norm() {
  // Gradients are already summed over sp/dp. Tensor-parallel shards add up over the tp group;
  // replicated parameters (norms) hold the same gradient on every tp rank and count once.
  double sharded = 0, whole = 0;
  for (size_t i = 0; i < owner_.size(); ++i) {
    if (owner_[i] < 0) continue;
    const double sq = model_.kernels().sum_squares(model_.grad(i), model_.local_numel(i));
    (model_.sharded(i) ? sharded : whole) += sq;
  }
  if (Communicator* tp = model_.tp_group()) sharded = tp->all_reduce_scalar(sharded, ReduceOp::kSum);
  return std::sqrt(sharded + whole);
}

template <typename T>
void AdamW<T>::step(double lr, double grad_scale) {
  ++step_count_;
  for (Slot& s : slots_)
    model_.kernels().adamw_update(s.master.data(), s.exp_avg.data(), s.exp_avg_sq.data(),
                                  model_.param(s.param), model_.grad(s.param), s.numel, lr,
                                  options_.beta1, options_.beta2, options_.eps,
                                  s.decay ? options_.weight_decay : 0.0, step_count_, grad_scale);
  if (!dp_) return;
  const ParamTable& table = model_.param_table();
  for (size_t i = 0; i < table.size(); ++i)
    if (owner_[i] >= 0) dp_->broadcast(model_.param(i), model_.local_numel(i), owner_[i]);
}

template <typename T>
AdamWParamState AdamW<T>::get_state(size_t param_index) {
  Slot& s = slot(param_index);
  AdamWParamState state;
  const size_t bytes = static_cast<size_t>(s.numel) * sizeof(float);
  for (auto [host, device] : {std::pair{&state.master, &s.master}, std::pair{&state.exp_avg, &s.exp_avg},
                              std::pair{&state.exp_avg_sq, &s.exp_avg_sq}}) {
    host->resize(static_cast<size_t>(s.numel));
    model_.kernels().copy_to_host(host->data(), device->data(), bytes);
  }
  return state;
}

template <typename T>
void AdamW<T>::set_state(size_t param_index, const AdamWParamState& state) {
  Slot& s = slot(param_index);
  const std::string& name = model_.param_table()[param_index].name;
  for (const std::vector<float>* v : {&state.master, &state.exp_avg, &state.exp_avg_sq})
    if (static_cast<int64_t>(v->size()) != s.numel)
      throw std::invalid_argument("AdamW state of " + name + " has " + std::to_string(v->size()) +
                                  " elements, the parameter has " + std::to_string(s.numel));
  const size_t bytes = static_cast<size_t>(s.numel) * sizeof(float);
  Kernels<T>& k = model_.kernels();
  k.copy_to_device(s.master.data(), state.master.data(), bytes);
  k.copy_to_device(s.exp_avg.data(), state.exp_avg.data(), bytes);
  k.copy_to_device(s.exp_avg_sq.data(), state.exp_avg_sq.data(), bytes);
  model_.set_param_local(param_index, state.master.data());
}

template class AdamW<float>;
template class AdamW<double>;
template class AdamW<bf16>;

}  // namespace freqkv
