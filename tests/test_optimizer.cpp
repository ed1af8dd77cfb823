// AdamW over a model: two steps against the update computed by hand, frozen parameters untouched
// and stateless, weight decay skipping norm weights, state round trip.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/cpu_kernels.h"
#include "trainer/optimizer.h"

namespace freqkv {
namespace {

ModelConfig tiny() {
  ModelConfig c;
  c.vocab_size = 7;
  c.hidden_size = 4;
  c.intermediate_size = 6;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 2;
  return c;
}

TEST(AdamW, TwoStepsMatchTheUpdateByHand) {
  CpuKernels<float> k;
  FreqKVConfig f;
  f.enabled = false;
  LlamaModel<float> model(tiny(), f, k);
  model.init_random(3, 0.5);
  const size_t frozen = static_cast<size_t>(model.param_table().find("lm_head.weight"));
  model.set_trainable(frozen, false);
  const AdamWOptions o{0.8, 0.95, 1e-6, 0.1};
  AdamW<float> opt(model, o);
  EXPECT_EQ(opt.param_indices().size(), model.param_table().size() - 1);

  const ParamTable& table = model.param_table();
  std::vector<std::vector<double>> w(table.size()), m(table.size()), v(table.size());
  for (size_t i = 0; i < table.size(); ++i) {
    const std::vector<float> p = model.get_param(i);
    w[i].assign(p.begin(), p.end());
    m[i].assign(p.size(), 0.0);
    v[i].assign(p.size(), 0.0);
  }
  const std::vector<float> frozen_before = model.get_param(frozen);
  const double lr = 0.05, scale = 0.5;
  for (int t = 1; t <= 2; ++t) {
    std::vector<std::vector<double>> g(table.size());
    for (size_t i = 0; i < table.size(); ++i) {
      std::vector<float> gi(static_cast<size_t>(table[i].numel()));
      for (size_t e = 0; e < gi.size(); ++e) gi[e] = std::sin(1.0f + i + 0.37f * e * t);
      k.upload(model.grad(i), gi.data(), table[i].numel());
      g[i].assign(gi.begin(), gi.end());
    }
    opt.step(lr, scale);
    for (size_t i = 0; i < table.size(); ++i) {
      if (i == frozen) continue;
      const double wd = table[i].is_norm() ? 0.0 : o.weight_decay;
      for (size_t e = 0; e < w[i].size(); ++e) {
        const double ge = g[i][e] * scale;
        w[i][e] -= lr * wd * w[i][e];
        m[i][e] = o.beta1 * m[i][e] + (1 - o.beta1) * ge;
        v[i][e] = o.beta2 * v[i][e] + (1 - o.beta2) * ge * ge;
        const double mhat = m[i][e] / (1 - std::pow(o.beta1, t));
        const double vhat = v[i][e] / (1 - std::pow(o.beta2, t));
        w[i][e] -= lr * mhat / (std::sqrt(vhat) + o.eps);
      }
      const std::vector<float> got = model.get_param(i);
      for (size_t e = 0; e < w[i].size(); ++e)
        ASSERT_NEAR(got[e], w[i][e], 2e-6 * (1 + std::abs(w[i][e]))) << table[i].name << " " << e;
    }
  }
  EXPECT_EQ(model.get_param(frozen), frozen_before);
  EXPECT_THROW(opt.get_state(frozen), std::out_of_range);

  // Clipping input: the global norm covers the trainable gradients only.
  double expected = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    if (i == frozen) continue;
    for (float x : model.get_grad(i)) expected += static_cast<double>(x) * x;
  }
  EXPECT_NEAR(opt.grad_norm(), std::sqrt(expected), 1e-6 * std::sqrt(expected));
}

TEST(AdamW, StateRoundTripRestoresWeights) {
  CpuKernels<float> k;
  FreqKVConfig f;
  f.enabled = false;
  LlamaModel<float> model(tiny(), f, k);
  model.init_random(4, 0.5);
  AdamW<float> opt(model, AdamWOptions{});
  for (size_t i = 0; i < model.param_table().size(); ++i) {
    std::vector<float> g(static_cast<size_t>(model.param_table()[i].numel()), 0.3f);
    k.upload(model.grad(i), g.data(), model.param_table()[i].numel());
  }
  opt.step(0.01, 1.0);
  const AdamWParamState s = opt.get_state(0);
  EXPECT_EQ(s.master, model.get_param(0));
  AdamWParamState changed = s;
  changed.master[0] += 1.0f;
  opt.set_state(0, changed);
  EXPECT_EQ(model.get_param(0)[0], changed.master[0]);
  EXPECT_EQ(opt.get_state(0).exp_avg, s.exp_avg);
  changed.exp_avg.pop_back();
  EXPECT_THROW(opt.set_state(0, changed), std::invalid_argument);
}

}  // namespace
}  // namespace freqkv
