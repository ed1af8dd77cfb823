// The whole LLaMA + FreqKV model in double precision:
//   - its loss against a naive reference written here from FREQKV.md (explicit DCT sums,
//     chunk-by-chunk attention with explicit loops), with and without compression;
//   - T <= C gives exactly the plain causal model;
//   - every parameter's gradient against central finite differences of the loss.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "kernels/cpu/cpu_kernels.h"
#include "model/llama_model.h"
#include "tests/test_support.h"

namespace freqkv {
namespace {

using Matrix = std::vector<std::vector<double>>;  // [rows][cols]

ModelConfig tiny_config(bool tied, int64_t n_kv_heads) {
  ModelConfig c;
  c.vocab_size = 11;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = n_kv_heads;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 100.0;  // small theta: positions matter even in a short sequence
  c.tie_word_embeddings = tied;
  return c;
}

// ---- the naive reference -----------------------------------------------------------------------

Matrix weight(const std::map<std::string, std::vector<double>>& w, const std::string& name,
              int64_t rows, int64_t cols) {
  const std::vector<double>& flat = w.at(name);
  Matrix m(rows, std::vector<double>(cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) m[r][c] = flat[r * cols + c];
  return m;
}

Matrix linear(const Matrix& x, const Matrix& w) {  // x W^T
  Matrix y(x.size(), std::vector<double>(w.size(), 0.0));
  for (size_t n = 0; n < x.size(); ++n)
    for (size_t o = 0; o < w.size(); ++o)
      for (size_t i = 0; i < w[o].size(); ++i) y[n][o] += x[n][i] * w[o][i];
  return y;
}

Matrix rmsnorm(const Matrix& x, const std::vector<double>& w, double eps) {
  Matrix y = x;
  for (auto& row : y) {
    double ms = 0;
    for (double v : row) ms += v * v;
    const double r = 1.0 / std::sqrt(ms / row.size() + eps);
    for (size_t i = 0; i < row.size(); ++i) row[i] *= r * w[i];
  }
  return y;
}

std::vector<double> rope_row(std::vector<double> x, int64_t pos, int64_t heads, int64_t D,
                             double theta) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < D / 2; ++i) {
      const double a = pos * std::pow(theta, -2.0 * i / D);
      const double x1 = x[h * D + i], x2 = x[h * D + i + D / 2];
      x[h * D + i] = x1 * std::cos(a) - x2 * std::sin(a);
      x[h * D + i + D / 2] = x2 * std::cos(a) + x1 * std::sin(a);
    }
  return x;
}

// P_{N->L} = sqrt(L/N) IDCT_L(DCT_N(x)[0:L]) written as explicit cosine sums.
Matrix compression(int64_t N, int64_t L) {
  auto dct = [](int64_t n, int64_t k, int64_t i) {  // orthonormal DCT-II matrix entry [k][i]
    const double a = k == 0 ? std::sqrt(1.0 / n) : std::sqrt(2.0 / n);
    return a * std::cos(M_PI * (2 * i + 1) * k / (2.0 * n));
  };
  Matrix P(L, std::vector<double>(N, 0.0));
  for (int64_t l = 0; l < L; ++l)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < L; ++k) s += dct(L, k, l) * dct(N, k, n);
      P[l][n] = std::sqrt(static_cast<double>(L) / N) * s;
    }
  return P;
}

Matrix matmul(const Matrix& a, const Matrix& b) {
  Matrix y(a.size(), std::vector<double>(b[0].size(), 0.0));
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t k = 0; k < b.size(); ++k)
      for (size_t j = 0; j < b[0].size(); ++j) y[i][j] += a[i][k] * b[k][j];
  return y;
}

// Attention of queries (already rotated) over keys/values, query i seeing keys j <= i + offset.
void attend(Matrix& out, int64_t out_row, const Matrix& q, int64_t q_row, const Matrix& k,
            const Matrix& v, int64_t offset, const ModelConfig& c) {
  const int64_t D = c.head_dim, group = c.num_attention_heads / c.num_key_value_heads;
  for (int64_t h = 0; h < c.num_attention_heads; ++h) {
    const int64_t g = h / group;
    std::vector<double> s;
    for (int64_t j = 0; j <= offset && j < static_cast<int64_t>(k.size()); ++j) {
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += q[q_row][h * D + d] * k[j][g * D + d];
      s.push_back(dot / std::sqrt(static_cast<double>(D)));
    }
    double mx = s[0], z = 0;
    for (double x : s) mx = std::max(mx, x);
    for (double& x : s) z += (x = std::exp(x - mx));
    for (int64_t d = 0; d < D; ++d) {
      double acc = 0;
      for (size_t j = 0; j < s.size(); ++j) acc += s[j] / z * v[j][g * D + d];
      out[out_row][h * D + d] = acc;
    }
  }
}

Matrix freqkv_attention(const Matrix& q, const Matrix& k, const Matrix& v, const ModelConfig& c,
                        const FreqKVConfig& f) {
  const int64_t T = q.size(), D = c.head_dim;
  const double theta = c.rope_theta;
  Matrix out(T, std::vector<double>(q[0].size()));
  auto rot = [&](const Matrix& x, int64_t first, int64_t pos0, int64_t n, int64_t heads) {
    Matrix y;
    for (int64_t i = 0; i < n; ++i) y.push_back(rope_row(x[first + i], pos0 + i, heads, D, theta));
    return y;
  };
  const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  if (!f.enabled || T <= f.cache) {
    const Matrix qr = rot(q, 0, 0, T, Hq), kr = rot(k, 0, 0, T, Hkv);
    for (int64_t i = 0; i < T; ++i) attend(out, i, qr, i, kr, v, i, c);
    return out;
  }
  const int64_t C = f.cache, S = f.sink, F = C - S, L = static_cast<int64_t>(std::floor(F * f.ratio));
  const int64_t step = F - L;
  const Matrix P = compression(F, L);
  // Chunk 0.
  {
    const Matrix qr = rot(q, 0, 0, C, Hq), kr = rot(k, 0, 0, C, Hkv);
    for (int64_t i = 0; i < C; ++i) attend(out, i, qr, i, kr, v, i, c);
  }
  Matrix mem_k = matmul(P, Matrix(k.begin() + S, k.begin() + C));
  Matrix mem_v = matmul(P, Matrix(v.begin() + S, v.begin() + C));
  for (int64_t start = C; start < T; start += step) {
    const int64_t n = std::min(step, T - start);
    Matrix keys(k.begin(), k.begin() + S), vals(v.begin(), v.begin() + S);
    keys.insert(keys.end(), mem_k.begin(), mem_k.end());
    vals.insert(vals.end(), mem_v.begin(), mem_v.end());
    keys.insert(keys.end(), k.begin() + start, k.begin() + start + n);
    vals.insert(vals.end(), v.begin() + start, v.begin() + start + n);
    const Matrix kr = rot(keys, 0, 0, keys.size(), Hkv);
    const Matrix qr = rot(q, start, S + L, n, Hq);
    for (int64_t i = 0; i < n; ++i) attend(out, start + i, qr, i, kr, vals, S + L + i, c);
    if (start + n < T) {  // M_{g+1} = P [M_g ; X_g]
      mem_k = matmul(P, Matrix(keys.begin() + S, keys.end()));
      mem_v = matmul(P, Matrix(vals.begin() + S, vals.end()));
    }
  }
  return out;
}

// Sum of the losses of one sequence.
double reference_loss(const std::map<std::string, std::vector<double>>& w, const ModelConfig& c,
                      const FreqKVConfig& f, const std::vector<int32_t>& inputs,
                      const std::vector<int32_t>& targets) {
  const int64_t T = inputs.size(), H = c.hidden_size, I = c.intermediate_size;
  const int64_t qw = c.num_attention_heads * c.head_dim, kw = c.num_key_value_heads * c.head_dim;
  const Matrix emb = weight(w, "model.embed_tokens.weight", c.vocab_size, H);
  Matrix x;
  for (int32_t t : inputs) x.push_back(emb[t]);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const Matrix y = rmsnorm(x, w.at(p + "input_layernorm.weight"), c.rms_norm_eps);
    const Matrix q = linear(y, weight(w, p + "self_attn.q_proj.weight", qw, H));
    const Matrix k = linear(y, weight(w, p + "self_attn.k_proj.weight", kw, H));
    const Matrix v = linear(y, weight(w, p + "self_attn.v_proj.weight", kw, H));
    const Matrix o = linear(freqkv_attention(q, k, v, c, f),
                            weight(w, p + "self_attn.o_proj.weight", H, qw));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < H; ++i) x[t][i] += o[t][i];
    const Matrix y2 = rmsnorm(x, w.at(p + "post_attention_layernorm.weight"), c.rms_norm_eps);
    const Matrix g = linear(y2, weight(w, p + "mlp.gate_proj.weight", I, H));
    Matrix u = linear(y2, weight(w, p + "mlp.up_proj.weight", I, H));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < I; ++i) u[t][i] *= g[t][i] / (1.0 + std::exp(-g[t][i]));
    const Matrix m = linear(u, weight(w, p + "mlp.down_proj.weight", H, I));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < H; ++i) x[t][i] += m[t][i];
  }
  const Matrix logits =
      linear(rmsnorm(x, w.at("model.norm.weight"), c.rms_norm_eps),
             c.tie_word_embeddings ? emb : weight(w, "lm_head.weight", c.vocab_size, H));
  double loss = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (targets[t] < 0) continue;
    double mx = logits[t][0], z = 0;
    for (double z_i : logits[t]) mx = std::max(mx, z_i);
    for (double z_i : logits[t]) z += std::exp(z_i - mx);
    loss += std::log(z) + mx - logits[t][targets[t]];
  }
  return loss;
}

// ---- fixtures -------------------------------------------------------------------------------------

struct Problem {
  ModelConfig config;
  FreqKVConfig freqkv;
  LoraConfig lora;
  int64_t batch, seq_len;
  std::vector<int32_t> inputs, targets;
  std::map<std::string, std::vector<double>> weights;
};

Problem make_problem(const ModelConfig& c, const FreqKVConfig& f, int64_t batch, int64_t seq_len,
                     uint64_t seed, const LoraConfig& lora = LoraConfig()) {
  Problem p{c, f, lora, batch, seq_len, {}, {}, {}};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(c.vocab_size - 1));
  for (int64_t i = 0; i < batch * seq_len; ++i) {
    p.inputs.push_back(token(rng));
    p.targets.push_back(i % 7 == 3 ? -1 : token(rng));  // some positions are not scored
  }
  std::normal_distribution<double> normal(0.0, 0.5);
  const ParamTable table = llama_param_table(c, lora);
  for (const ParamSpec& s : table.specs()) {
    std::vector<double> v(static_cast<size_t>(s.numel()));
    for (double& x : v) x = s.is_norm() ? 1.0 + 0.2 * normal(rng) : normal(rng);
    p.weights[s.name] = v;
  }
  return p;
}

void load(LlamaModel<double>& model, const Problem& p) {
  for (size_t i = 0; i < model.param_table().size(); ++i)
    model.set_param(i, p.weights.at(model.param_table()[i].name).data());
}

double model_loss_sum(const Problem& p) {
  CpuKernels<double> k;
  LlamaModel<double> model(p.config, p.freqkv, k);
  load(model, p);
  return model.forward(p.inputs.data(), p.targets.data(), p.batch, p.seq_len, 0.0).sum;
}

double reference_loss_sum(const Problem& p) {
  double sum = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const auto in0 = p.inputs.begin() + b * p.seq_len, t0 = p.targets.begin() + b * p.seq_len;
    sum += reference_loss(p.weights, p.config, p.freqkv, {in0, in0 + p.seq_len},
                          {t0, t0 + p.seq_len});
  }
  return sum;
}

// ---- tests ------------------------------------------------------------------------------------------

TEST(LlamaModel, MatchesNaiveReferenceWithFreqKVChunks) {
  // C = 6, S = 1, r = 0.5 (L = 2, step = 3); T = 13: chunks of 6, 3, 3 and 1 tokens.
  for (bool tied : {false, true}) {
    const Problem p = make_problem(tiny_config(tied, 1), freqkv_config(6, 1, 0.5), 2, 13, 7);
    const double ref = reference_loss_sum(p), got = model_loss_sum(p);
    EXPECT_NEAR(got, ref, 1e-10 * std::abs(ref)) << "tied=" << tied;
  }
  // No sink, ratio 0.25, multi-head attention.
  const Problem p = make_problem(tiny_config(false, 2), freqkv_config(8, 0, 0.25), 1, 21, 8);
  EXPECT_NEAR(model_loss_sum(p), reference_loss_sum(p), 1e-10 * std::abs(reference_loss_sum(p)));
}

TEST(LlamaModel, CompressionChangesTheResultBeyondTheCache) {
  Problem p = make_problem(tiny_config(false, 1), freqkv_config(6, 1, 0.5), 1, 13, 9);
  const double compressed = model_loss_sum(p);
  p.freqkv.enabled = false;
  const double full = model_loss_sum(p);
  EXPECT_NEAR(full, reference_loss_sum(p), 1e-10 * std::abs(full));
  EXPECT_GT(std::abs(compressed - full), 1e-6);
}

TEST(LlamaModel, ShortInputEqualsPlainCausalModelExactly) {
  // T <= C: FreqKV must be the base model, bit for bit, loss and gradients.
  Problem p = make_problem(tiny_config(false, 1), freqkv_config(16, 4, 0.5), 2, 16, 10);
  auto run = [&](const FreqKVConfig& f, std::vector<std::vector<double>>& grads) {
    CpuKernels<double> k;
    LlamaModel<double> model(p.config, f, k);
    load(model, p);
    model.zero_grads();
    const double loss = model.forward(p.inputs.data(), p.targets.data(), 2, 16, 0.1).sum;
    model.backward();
    for (size_t i = 0; i < model.param_table().size(); ++i) grads.push_back(model.get_grad_f64(i));
    return loss;
  };
  std::vector<std::vector<double>> g_freqkv, g_plain;
  const double l_freqkv = run(p.freqkv, g_freqkv);
  const double l_plain = run(freqkv_config(16, 4, 0.5, false), g_plain);
  EXPECT_EQ(l_freqkv, l_plain);
  EXPECT_EQ(g_freqkv, g_plain);
  EXPECT_NEAR(l_plain, reference_loss_sum(p), 1e-10 * std::abs(l_plain));
}

// Central differences of the mean loss for every parameter tensor (a few entries each) and along
// one random direction through all parameters at once.
void check_gradients(const Problem& p) {
  CpuKernels<double> k;
  LlamaModel<double> model(p.config, p.freqkv, k, p.lora);
  load(model, p);
  const ParamTable& table = model.param_table();
  int64_t count = 0;
  for (int32_t t : p.targets) count += t >= 0;
  const double scale = 1.0 / static_cast<double>(count);
  model.zero_grads();
  model.forward(p.inputs.data(), p.targets.data(), p.batch, p.seq_len, scale);
  model.backward();
  std::vector<std::vector<double>> grads;
  for (size_t i = 0; i < table.size(); ++i) grads.push_back(model.get_grad_f64(i));

  auto mean_loss = [&]() {
    return model.forward(p.inputs.data(), p.targets.data(), p.batch, p.seq_len, 0.0).sum * scale;
  };
  const double eps = 1e-6;
  std::mt19937_64 rng(42);
  for (size_t i = 0; i < table.size(); ++i) {
    std::vector<double> w = p.weights.at(table[i].name);
    std::uniform_int_distribution<int64_t> pick(0, table[i].numel() - 1);
    for (int trial = 0; trial < 4; ++trial) {
      const int64_t e = pick(rng);
      const double orig = w[e];
      w[e] = orig + eps;
      model.set_param(i, w.data());
      const double up = mean_loss();
      w[e] = orig - eps;
      model.set_param(i, w.data());
      const double down = mean_loss();
      w[e] = orig;
      model.set_param(i, w.data());
      const double numeric = (up - down) / (2 * eps);
      EXPECT_NEAR(grads[i][e], numeric, 1e-7 + 1e-6 * std::abs(numeric))
          << table[i].name << " element " << e;
    }
  }
  // Directional derivative along a random unit direction through every parameter.
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<std::vector<double>> dir(table.size());
  double norm2 = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    dir[i].resize(static_cast<size_t>(table[i].numel()));
    for (double& d : dir[i]) {
      d = normal(rng);
      norm2 += d * d;
    }
  }
  double analytic = 0;
  for (size_t i = 0; i < table.size(); ++i)
    for (size_t e = 0; e < dir[i].size(); ++e) analytic += grads[i][e] * (dir[i][e] /= std::sqrt(norm2));
  auto shifted_loss = [&](double t) {
    for (size_t i = 0; i < table.size(); ++i) {
      std::vector<double> w = p.weights.at(table[i].name);
      for (size_t e = 0; e < w.size(); ++e) w[e] += t * dir[i][e];
      model.set_param(i, w.data());
    }
    return mean_loss();
  };
  const double numeric = (shifted_loss(eps) - shifted_loss(-eps)) / (2 * eps);
  EXPECT_NEAR(analytic, numeric, 1e-6 * std::abs(numeric));
}

TEST(LlamaModelGradients, MultiChunkFreqKVGroupedQueryAttention) {
  check_gradients(make_problem(tiny_config(false, 1), freqkv_config(6, 1, 0.5), 2, 13, 11));
}

TEST(LlamaModelGradients, MultiChunkFreqKVTiedNoSink) {
  check_gradients(make_problem(tiny_config(true, 2), freqkv_config(8, 0, 0.25), 1, 21, 12));
}

TEST(LlamaModelGradients, PlainCausal) {
  check_gradients(make_problem(tiny_config(false, 1), freqkv_config(6, 1, 0.5, false), 2, 9, 13));
}

LoraConfig lora_config(std::vector<std::string> targets) {
  LoraConfig l;
  l.enabled = true;
  l.rank = 3;
  l.alpha = 6;
  l.targets = std::move(targets);
  return l;
}

TEST(LlamaModelGradients, LoraOnEveryProjection) {
  // Random (non-zero) B so that every adapter factor gets a gradient.
  check_gradients(make_problem(tiny_config(false, 1), freqkv_config(6, 1, 0.5), 2, 13, 15,
                               lora_config({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"})));
}

TEST(LlamaModel, LoraMatchesItsMergedWeights) {
  // y = x W^T + s (x A^T) B^T must equal x (W + s B A)^T: compare against the naive reference
  // run on merged weights.
  const Problem p = make_problem(tiny_config(false, 1), freqkv_config(6, 1, 0.5), 1, 13, 16,
                                 lora_config({"q_proj", "v_proj", "down_proj"}));
  Problem merged = p;
  const ParamTable table = llama_param_table(p.config, p.lora);
  for (const ParamSpec& s : table.specs()) {
    if (s.role != ParamRole::kLoraA) continue;
    const std::vector<double>& a = p.weights.at(s.name);
    const std::string b_name = s.name.substr(0, s.name.size() - 14) + ".lora_B.weight";
    const std::vector<double>& b = p.weights.at(b_name);
    std::vector<double>& w = merged.weights.at(s.adapts);
    const int64_t r = s.shape[0], in = s.shape[1], out = static_cast<int64_t>(w.size()) / in;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < in; ++j)
        for (int64_t q = 0; q < r; ++q) w[o * in + j] += p.lora.scaling() * b[o * r + q] * a[q * in + j];
  }
  CpuKernels<double> k;
  LlamaModel<double> model(p.config, p.freqkv, k, p.lora);
  load(model, p);
  const double got = model.forward(p.inputs.data(), p.targets.data(), 1, 13, 0.0).sum;
  const double ref = reference_loss_sum(merged);
  EXPECT_NEAR(got, ref, 1e-10 * std::abs(ref));
}

TEST(LlamaModel, FreshLoraLeavesTheModelUnchangedAndFrozenWeightsGetNoGradient) {
  const Problem p = make_problem(tiny_config(false, 1), freqkv_config(6, 1, 0.5), 1, 13, 17);
  CpuKernels<double> k;
  LlamaModel<double> model(p.config, p.freqkv, k, lora_config({"q_proj", "o_proj"}));
  for (size_t i = 0; i < model.param_table().size(); ++i)
    if (!model.param_table()[i].is_lora())
      model.set_param(i, p.weights.at(model.param_table()[i].name).data());
  model.init_lora(5);
  const double base = reference_loss_sum(p);
  for (size_t i = 0; i < model.param_table().size(); ++i)
    model.set_trainable(i, model.param_table()[i].is_lora());
  model.zero_grads();
  const double got = model.forward(p.inputs.data(), p.targets.data(), 1, 13, 1.0).sum;
  model.backward();
  EXPECT_NEAR(got, base, 1e-10 * std::abs(base));
  for (size_t i = 0; i < model.param_table().size(); ++i) {
    const ParamSpec& s = model.param_table()[i];
    double norm = 0;
    for (double g : model.get_grad_f64(i)) norm += g * g;
    if (s.role == ParamRole::kLoraB) {
      EXPECT_GT(norm, 0.0) << s.name;  // B = 0 still learns
    } else if (s.role == ParamRole::kWeight && s.shape.size() == 2) {
      EXPECT_EQ(norm, 0.0) << s.name;
    }
  }
}

// Loss and every gradient of one training step, in the model's own (local) order.
struct StepResult {
  double loss;
  std::vector<std::vector<double>> grads;
};

StepResult train_step(const Problem& p, bool recompute, int repeats = 1) {
  CpuKernels<double> k;
  LlamaModel<double> model(p.config, p.freqkv, k, p.lora);
  load(model, p);
  model.set_recompute(recompute);
  model.zero_grads();
  StepResult r{0, {}};
  for (int i = 0; i < repeats; ++i) {  // accumulation: later passes reuse the activations' layout
    r.loss = model.forward(p.inputs.data(), p.targets.data(), p.batch, p.seq_len, 0.5).sum;
    model.backward();
  }
  for (size_t i = 0; i < model.param_table().size(); ++i) r.grads.push_back(model.get_grad_f64(i));
  return r;
}

TEST(LlamaModelRecompute, GivesTheGradientsOfThePlainPath) {
  // Recomputation replays the same kernels on the same inputs: the gradients must not change.
  // Cases: multi-chunk FreqKV with GQA, LoRA on every projection, plain causal; two passes of
  // gradient accumulation.
  const std::vector<Problem> problems = {
      make_problem(tiny_config(false, 2), freqkv_config(8, 2, 0.5), 2, 29, 21),
      make_problem(tiny_config(false, 1), freqkv_config(6, 1, 0.5), 1, 17, 22,
                   lora_config({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj"})),
      make_problem(tiny_config(true, 1), freqkv_config(8, 0, 0.5, false), 2, 11, 23)};
  for (size_t c = 0; c < problems.size(); ++c) {
    const StepResult plain = train_step(problems[c], false, 2);
    const StepResult replayed = train_step(problems[c], true, 2);
    EXPECT_EQ(plain.loss, replayed.loss) << "case " << c;
    ASSERT_EQ(plain.grads.size(), replayed.grads.size());
    for (size_t i = 0; i < plain.grads.size(); ++i) {
      double diff = 0, norm = 0;
      for (size_t j = 0; j < plain.grads[i].size(); ++j) {
        diff = std::max(diff, std::abs(plain.grads[i][j] - replayed.grads[i][j]));
        norm = std::max(norm, std::abs(plain.grads[i][j]));
      }
      EXPECT_LE(diff, 1e-13 * std::max(norm, 1.0)) << "case " << c << " parameter " << i;
      EXPECT_GT(norm, 0.0) << "case " << c << " parameter " << i;
    }
  }
}

TEST(LlamaModelRecompute, EvaluationBetweenStepsKeepsTrainingExact) {
  // Switching layouts (an evaluation forward between training steps, recomputation toggled)
  // must leave the next step's gradients unchanged.
  const Problem p = make_problem(tiny_config(false, 2), freqkv_config(8, 2, 0.5), 1, 29, 24);
  const StepResult reference = train_step(p, false);
  CpuKernels<double> k;
  LlamaModel<double> model(p.config, p.freqkv, k, p.lora);
  load(model, p);
  model.set_recompute(true);
  const double eval = model.forward(p.inputs.data(), p.targets.data(), 1, 29, 0.0).sum;
  EXPECT_EQ(eval, reference.loss);  // grad_scale does not change the loss
  EXPECT_THROW(model.backward(), std::logic_error);
  model.zero_grads();
  model.forward(p.inputs.data(), p.targets.data(), 1, 29, 0.5);
  model.backward();
  for (size_t i = 0; i < model.param_table().size(); ++i) {
    const std::vector<double> g = model.get_grad_f64(i);
    for (size_t j = 0; j < g.size(); ++j)
      ASSERT_NEAR(g[j], reference.grads[i][j], 1e-13 * (1.0 + std::abs(g[j]))) << i << " " << j;
  }
}

TEST(LlamaModel, GradReadyHookCoversEveryTrainableParameterOnceWhenFinal) {
  // The ranges reported must be disjoint, cover exactly the trainable parameters, and each must
  // hold its final gradient when reported (nothing added to it afterwards).
  const Problem p = make_problem(tiny_config(true, 2), freqkv_config(8, 2, 0.5), 1, 29, 25,
                                 lora_config({"q_proj", "down_proj"}));
  CpuKernels<double> k;
  LlamaModel<double> model(p.config, p.freqkv, k, p.lora);
  load(model, p);
  for (size_t i = 0; i < model.param_table().size(); ++i)  // LongLoRA's: adapters, norms, embeddings
    model.set_trainable(i, model.param_table()[i].role != ParamRole::kWeight ||
                               model.param_table()[i].shape.size() == 1 ||
                               model.param_table()[i].name.find("embed") != std::string::npos);
  for (bool recompute : {false, true}) {
    model.set_recompute(recompute);
    std::vector<std::pair<int64_t, int64_t>> ranges;
    std::vector<std::vector<double>> at_report;
    model.set_grad_ready_hook([&](int64_t offset, int64_t count) {
      ranges.emplace_back(offset, count);
      at_report.emplace_back(model.grads() + offset, model.grads() + offset + count);
    });
    model.zero_grads();
    model.forward(p.inputs.data(), p.targets.data(), 1, 29, 1.0);
    model.backward();
    std::vector<int> covered(static_cast<size_t>(model.arena_numel()), 0);
    for (size_t r = 0; r < ranges.size(); ++r) {
      for (int64_t j = 0; j < ranges[r].second; ++j) {
        ++covered[static_cast<size_t>(ranges[r].first + j)];
        ASSERT_EQ(at_report[r][j], model.grads()[ranges[r].first + j]) << "range " << r;
      }
    }
    for (size_t i = 0; i < model.param_table().size(); ++i)
      for (int64_t j = 0; j < model.local_numel(i); ++j)
        ASSERT_EQ(covered[static_cast<size_t>(model.param(i) - model.params() + j)],
                  model.trainable(i) ? 1 : 0)
            << model.param_table()[i].name;
    EXPECT_GT(ranges.size(), static_cast<size_t>(p.config.num_hidden_layers));
  }
}

TEST(LlamaModel, RejectsTokensOutsideTheVocabulary) {
  Problem p = make_problem(tiny_config(false, 1), freqkv_config(6, 1, 0.5), 1, 5, 14);
  CpuKernels<double> k;
  LlamaModel<double> model(p.config, p.freqkv, k);
  p.inputs[2] = 11;
  EXPECT_THROW(model.forward(p.inputs.data(), p.targets.data(), 1, 5, 0.0), std::out_of_range);
  p.inputs[2] = 0;
  p.targets[4] = 99;
  EXPECT_THROW(model.forward(p.inputs.data(), p.targets.data(), 1, 5, 0.0), std::out_of_range);
}

}  // namespace
}  // namespace freqkv
