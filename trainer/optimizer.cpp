#include "trainer/optimizer.h"

#include <cmath>
#include <stdexcept>

namespace freqkv {

template <typename T>
AdamW<T>::AdamW(LlamaModel<T>& model, const AdamWOptions& options)
    : model_(model), options_(options) {
  Kernels<T>& k = model_.kernels();
  const ParamTable& table = model_.param_table();
  for (size_t i = 0; i < table.size(); ++i) {
    if (!model_.trainable(i)) continue;
    const int64_t n = table[i].numel();
    Slot s{i, n, Buffer<float>(k, n), Buffer<float>(k, n), Buffer<float>(k, n), !table[i].is_norm()};
    const std::vector<float> weights = model_.get_param(i);
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
                          " is frozen and has no optimiser state");
}

template <typename T>
double AdamW<T>::grad_norm() {
  double sum = 0;
  for (const Slot& s : slots_) sum += model_.kernels().sum_squares(model_.grad(s.param), s.numel);
  return std::sqrt(sum);
}

template <typename T>
void AdamW<T>::step(double lr, double grad_scale) {
  ++step_count_;
  for (Slot& s : slots_)
    model_.kernels().adamw_update(s.master.data(), s.exp_avg.data(), s.exp_avg_sq.data(),
                                  model_.param(s.param), model_.grad(s.param), s.numel, lr,
                                  options_.beta1, options_.beta2, options_.eps,
                                  s.decay ? options_.weight_decay : 0.0, step_count_, grad_scale);
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
  model_.set_param(param_index, state.master.data());
}

template class AdamW<float>;
template class AdamW<double>;

}  // namespace freqkv
