#include "model/llama_model.h"

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

namespace freqkv {

namespace {

const char* kLayerParamSuffixes[] = {
    "input_layernorm.weight",       "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",      "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",         "mlp.up_proj.weight",      "mlp.down_proj.weight"};

}  // namespace

template <typename T>
LlamaModel<T>::LlamaModel(const ModelConfig& config, const FreqKVConfig& freqkv,
                          Kernels<T>& kernels)
    : config_(config), freqkv_(freqkv), kernels_(kernels), table_(llama_param_table(config)) {
  if (freqkv_.enabled) freqkv_.validate();
  params_ = Buffer<T>(kernels_, table_.total_numel());
  grads_ = Buffer<T>(kernels_, table_.total_numel());
  embed_index_ = table_.find("model.embed_tokens.weight");
  final_norm_index_ = table_.find("model.norm.weight");
  lm_head_index_ = config_.tie_word_embeddings ? embed_index_ : table_.find("lm_head.weight");
}

template <typename T>
typename LlamaModel<T>::LayerWeights LlamaModel<T>::layer_weights(T* base, int64_t layer) const {
  const std::string prefix = "model.layers." + std::to_string(layer) + ".";
  T* p[9];
  for (int i = 0; i < 9; ++i) p[i] = base + table_.at(prefix + kLayerParamSuffixes[i]).offset;
  return {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]};
}

template <typename T>
void LlamaModel<T>::set_param(size_t i, const float* host) {
  kernels_.upload(param(i), host, table_[i].numel());
}

template <typename T>
void LlamaModel<T>::set_param(size_t i, const double* host) {
  kernels_.upload(param(i), host, table_[i].numel());
}

template <typename T>
std::vector<float> LlamaModel<T>::get_param(size_t i) {
  std::vector<float> out(static_cast<size_t>(table_[i].numel()));
  kernels_.download(out.data(), param(i), table_[i].numel());
  return out;
}

template <typename T>
std::vector<float> LlamaModel<T>::get_grad(size_t i) {
  std::vector<float> out(static_cast<size_t>(table_[i].numel()));
  kernels_.download(out.data(), grad(i), table_[i].numel());
  return out;
}

template <typename T>
std::vector<double> LlamaModel<T>::get_grad_f64(size_t i) {
  std::vector<double> out(static_cast<size_t>(table_[i].numel()));
  kernels_.download(out.data(), grad(i), table_[i].numel());
  return out;
}

template <typename T>
void LlamaModel<T>::init_random(uint64_t seed, double std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, std);
  for (size_t i = 0; i < table_.size(); ++i) {
    std::vector<double> values(static_cast<size_t>(table_[i].numel()));
    for (double& v : values) v = table_[i].is_norm() ? 1.0 : normal(rng);
    set_param(i, values.data());
  }
}

template <typename T>
void LlamaModel<T>::zero_grads() {
  kernels_.fill_zero(grads_.data(), static_cast<size_t>(grads_.size()) * sizeof(T));
}

template <typename T>
void LlamaModel<T>::prepare(int64_t batch, int64_t seq_len) {
  if (batch == batch_ && seq_len == seq_len_) return;
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t q_width = c.num_attention_heads * c.head_dim;
  const int64_t kv_width = 2 * c.num_key_value_heads * c.head_dim;  // K columns, then V columns
  const int64_t N = batch * seq_len;

  schedule_ = FreqKVSchedule::build(seq_len, freqkv_);
  const int64_t R = schedule_.kv_rows;
  blocks_.clear();
  std::vector<int64_t> kv_source;
  std::vector<int32_t> kv_positions, query_positions;
  for (int64_t b = 0; b < batch; ++b) {
    for (const FreqKVChunk& ch : schedule_.chunks)
      blocks_.push_back({b * seq_len + ch.token_start, ch.n_tokens, b * R + ch.kv_start, ch.kv_len});
    for (int64_t src : schedule_.kv_source) kv_source.push_back(src < 0 ? -1 : b * seq_len + src);
    kv_positions.insert(kv_positions.end(), schedule_.kv_positions.begin(),
                        schedule_.kv_positions.end());
    query_positions.insert(query_positions.end(), schedule_.query_positions.begin(),
                           schedule_.query_positions.end());
  }
  kv_source_ = upload_array(kernels_, kv_source);
  kv_positions_ = upload_array(kernels_, kv_positions);
  query_positions_ = upload_array(kernels_, query_positions);
  inputs_ = Buffer<int32_t>(kernels_, N);
  targets_ = Buffer<int32_t>(kernels_, N);

  const int64_t n_layers = c.num_hidden_layers;
  // Release the old activations before allocating the new ones.
  residual_.clear();
  acts_.clear();
  for (int64_t l = 0; l <= n_layers; ++l) residual_.emplace_back(kernels_, N * H);
  for (int64_t l = 0; l < n_layers; ++l) {
    LayerActivations a;
    a.norm1 = Buffer<T>(kernels_, N * H);
    a.rstd1 = Buffer<Acc<T>>(kernels_, N);
    a.q = Buffer<T>(kernels_, N * q_width);
    a.kv_rows = Buffer<T>(kernels_, batch * R * kv_width);
    a.att = Buffer<T>(kernels_, N * q_width);
    a.lse = Buffer<Acc<T>>(kernels_, N * c.num_attention_heads);
    a.res_mid = Buffer<T>(kernels_, N * H);
    a.norm2 = Buffer<T>(kernels_, N * H);
    a.rstd2 = Buffer<Acc<T>>(kernels_, N);
    a.gate = Buffer<T>(kernels_, N * I);
    a.up = Buffer<T>(kernels_, N * I);
    a.swiglu = Buffer<T>(kernels_, N * I);
    acts_.push_back(std::move(a));
  }
  final_norm_ = Buffer<T>(kernels_, N * H);
  final_rstd_ = Buffer<Acc<T>>(kernels_, N);
  losses_ = Buffer<Acc<T>>(kernels_, N);
  logits_ = Buffer<T>(kernels_, std::min(classifier_rows_, N) * c.vocab_size);
  kv_scratch_ = Buffer<T>(kernels_, N * kv_width);

  d_residual_ = Buffer<T>(kernels_, N * H);
  d_final_norm_ = Buffer<T>(kernels_, N * H);
  d_norm_ = Buffer<T>(kernels_, N * H);
  d_q_ = Buffer<T>(kernels_, N * q_width);
  d_kv_rows_ = Buffer<T>(kernels_, batch * R * kv_width);
  d_kv_ = Buffer<T>(kernels_, N * kv_width);
  d_att_ = Buffer<T>(kernels_, N * q_width);
  d_swiglu_ = Buffer<T>(kernels_, N * I);
  d_gate_ = Buffer<T>(kernels_, N * I);
  d_up_ = Buffer<T>(kernels_, N * I);

  batch_ = batch;
  seq_len_ = seq_len;
  n_tokens_ = N;
  kv_rows_ = batch * R;
}

template <typename T>
void LlamaModel<T>::apply_compressions(T* kv_rows, bool backward) {
  const int64_t width = 2 * config_.num_key_value_heads * config_.head_dim;
  const auto& steps = schedule_.compressions;
  for (int64_t b = 0; b < batch_; ++b) {
    T* base = kv_rows + b * schedule_.kv_rows * width;
    if (!backward) {
      for (const FreqKVCompression& s : steps)
        kernels_.freqkv_compress(base + s.dst_row * width, width, base + s.src_row * width, width,
                                 s.n_src, s.n_dst, width);
    } else {
      // M_{g+1} depends on rows of chunk g that include M_g: walk the chain in reverse so each
      // memory's gradient is complete before it is passed on.
      for (auto it = steps.rbegin(); it != steps.rend(); ++it)
        kernels_.freqkv_compress_backward(base + it->src_row * width, width,
                                          base + it->dst_row * width, width, it->n_src,
                                          it->n_dst, width);
    }
  }
}

template <typename T>
void LlamaModel<T>::layer_forward(int64_t l) {
  const ModelConfig& c = config_;
  const int64_t N = n_tokens_, H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const int64_t q_width = Hq * D, k_width = Hkv * D, kv_width = 2 * k_width;
  const LayerWeights w = layer_weights(params_.data(), l);
  LayerActivations& a = acts_[l];
  const T* x = residual_[l].data();
  T* out = residual_[l + 1].data();
  Kernels<T>& k = kernels_;

  // Attention block: q/k/v projections of the normalised input; K and V side by side per token.
  k.rmsnorm_forward(a.norm1.data(), a.rstd1.data(), x, w.input_norm, N, H, c.rms_norm_eps);
  k.gemm(false, true, N, q_width, H, 1.0, a.norm1.data(), H, w.wq, H, 0.0, a.q.data(), q_width);
  T* kv = kv_scratch_.data();
  k.gemm(false, true, N, k_width, H, 1.0, a.norm1.data(), H, w.wk, H, 0.0, kv, kv_width);
  k.gemm(false, true, N, k_width, H, 1.0, a.norm1.data(), H, w.wv, H, 0.0, kv + k_width, kv_width);

  // FreqKV: lay out [sink ; memory ; chunk] rows, compress pre-RoPE keys and values chunk by
  // chunk, then rotate keys and queries with their cache-layout positions.
  T* kv_rows = a.kv_rows.data();
  k.gather_rows(kv_rows, kv_width, kv, kv_width, kv_source_.data(), kv_rows_, kv_width);
  apply_compressions(kv_rows, false);
  k.rope(kv_rows, kv_width, kv_rows, kv_width, kv_positions_.data(), kv_rows_, static_cast<int>(Hkv),
         static_cast<int>(D), c.rope_theta, false);
  k.rope(a.q.data(), q_width, a.q.data(), q_width, query_positions_.data(), N, static_cast<int>(Hq),
         static_cast<int>(D), c.rope_theta, false);
  const AttnShape shape{static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(D),
                        1.0 / std::sqrt(static_cast<double>(D))};
  k.attention_forward(a.att.data(), q_width, a.lse.data(), a.q.data(), q_width, kv_rows,
                      kv_rows + k_width, kv_width, blocks_, shape);
  k.copy_on_device(a.res_mid.data(), x, static_cast<size_t>(N * H) * sizeof(T));
  k.gemm(false, true, N, H, q_width, 1.0, a.att.data(), q_width, w.wo, q_width, 1.0,
         a.res_mid.data(), H);

  // MLP block: down(silu(gate(x)) * up(x)).
  k.rmsnorm_forward(a.norm2.data(), a.rstd2.data(), a.res_mid.data(), w.post_norm, N, H,
                    c.rms_norm_eps);
  k.gemm(false, true, N, I, H, 1.0, a.norm2.data(), H, w.w_gate, H, 0.0, a.gate.data(), I);
  k.gemm(false, true, N, I, H, 1.0, a.norm2.data(), H, w.w_up, H, 0.0, a.up.data(), I);
  k.swiglu_forward(a.swiglu.data(), a.gate.data(), a.up.data(), N * I);
  k.copy_on_device(out, a.res_mid.data(), static_cast<size_t>(N * H) * sizeof(T));
  k.gemm(false, true, N, H, I, 1.0, a.swiglu.data(), I, w.w_down, I, 1.0, out, H);
}

template <typename T>
LossSum LlamaModel<T>::forward(const int32_t* inputs, const int32_t* targets, int64_t batch,
                               int64_t seq_len, double grad_scale) {
  if (batch < 1 || seq_len < 1)
    throw std::invalid_argument("forward: batch and sequence length must be >= 1, got batch=" +
                                std::to_string(batch) + " seq_len=" + std::to_string(seq_len));
  const ModelConfig& c = config_;
  const int64_t N = batch * seq_len, V = c.vocab_size, H = c.hidden_size;
  LossSum result;
  for (int64_t n = 0; n < N; ++n) {
    if (inputs[n] < 0 || inputs[n] >= V)
      throw std::out_of_range("forward: input token " + std::to_string(inputs[n]) + " at position " +
                              std::to_string(n) + " is outside the vocabulary [0, " +
                              std::to_string(V) + ")");
    if (targets[n] >= V)
      throw std::out_of_range("forward: target token " + std::to_string(targets[n]) +
                              " at position " + std::to_string(n) +
                              " is outside the vocabulary [0, " + std::to_string(V) + ")");
    if (targets[n] >= 0) ++result.count;
  }
  prepare(batch, seq_len);
  Kernels<T>& k = kernels_;
  k.copy_to_device(inputs_.data(), inputs, static_cast<size_t>(N) * sizeof(int32_t));
  k.copy_to_device(targets_.data(), targets, static_cast<size_t>(N) * sizeof(int32_t));

  k.embedding_forward(residual_[0].data(), param(embed_index_), inputs_.data(), N, H);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) layer_forward(l);
  k.rmsnorm_forward(final_norm_.data(), final_rstd_.data(), residual_[c.num_hidden_layers].data(),
                    param(final_norm_index_), N, H, c.rms_norm_eps);

  // Fused classifier: logits, loss and (when training) their gradient, block by block.
  const T* head = param(lm_head_index_);
  T* d_head = grad(lm_head_index_);
  for (int64_t r0 = 0; r0 < N; r0 += classifier_rows_) {
    const int64_t rows = std::min(classifier_rows_, N - r0);
    const T* x = final_norm_.data() + r0 * H;
    k.gemm(false, true, rows, V, H, 1.0, x, H, head, H, 0.0, logits_.data(), V);
    k.cross_entropy(losses_.data() + r0, logits_.data(), V, targets_.data() + r0, rows, V,
                    grad_scale);
    if (grad_scale != 0.0) {  // logits_ now holds d(loss)/d(logits)
      k.gemm(false, false, rows, H, V, 1.0, logits_.data(), V, head, H, 0.0,
             d_final_norm_.data() + r0 * H, H);
      k.gemm(true, false, V, H, rows, 1.0, logits_.data(), V, x, H, 1.0, d_head, H);
    }
  }
  std::vector<Acc<T>> losses(static_cast<size_t>(N));
  k.copy_to_host(losses.data(), losses_.data(), static_cast<size_t>(N) * sizeof(Acc<T>));
  for (Acc<T> v : losses) result.sum += static_cast<double>(v);
  have_grad_state_ = grad_scale != 0.0;
  return result;
}

template <typename T>
void LlamaModel<T>::layer_backward(int64_t l) {
  const ModelConfig& c = config_;
  const int64_t N = n_tokens_, H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const int64_t q_width = Hq * D, k_width = Hkv * D, kv_width = 2 * k_width;
  const LayerWeights w = layer_weights(params_.data(), l);
  const LayerWeights g = layer_weights(grads_.data(), l);
  LayerActivations& a = acts_[l];
  Kernels<T>& k = kernels_;
  T* d_res = d_residual_.data();  // enters as d(layer output), leaves as d(layer input)

  // MLP block (out = res_mid + down(swiglu)).
  k.gemm(false, false, N, I, H, 1.0, d_res, H, w.w_down, I, 0.0, d_swiglu_.data(), I);
  k.gemm(true, false, H, I, N, 1.0, d_res, H, a.swiglu.data(), I, 1.0, g.w_down, I);
  k.swiglu_backward(d_gate_.data(), d_up_.data(), d_swiglu_.data(), a.gate.data(), a.up.data(),
                    N * I);
  k.gemm(false, false, N, H, I, 1.0, d_gate_.data(), I, w.w_gate, H, 0.0, d_norm_.data(), H);
  k.gemm(false, false, N, H, I, 1.0, d_up_.data(), I, w.w_up, H, 1.0, d_norm_.data(), H);
  k.gemm(true, false, I, H, N, 1.0, d_gate_.data(), I, a.norm2.data(), H, 1.0, g.w_gate, H);
  k.gemm(true, false, I, H, N, 1.0, d_up_.data(), I, a.norm2.data(), H, 1.0, g.w_up, H);
  k.rmsnorm_backward(d_res, g.post_norm, d_norm_.data(), a.res_mid.data(), w.post_norm,
                     a.rstd2.data(), N, H);

  // Attention block (res_mid = x + o_proj(attention)).
  k.gemm(false, false, N, q_width, H, 1.0, d_res, H, w.wo, q_width, 0.0, d_att_.data(), q_width);
  k.gemm(true, false, H, q_width, N, 1.0, d_res, H, a.att.data(), q_width, 1.0, g.wo, q_width);
  const AttnShape shape{static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(D),
                        1.0 / std::sqrt(static_cast<double>(D))};
  T* d_kv_rows = d_kv_rows_.data();
  k.attention_backward(d_q_.data(), d_kv_rows, d_kv_rows + k_width, d_att_.data(), q_width,
                       a.att.data(), a.lse.data(), a.q.data(), q_width, a.kv_rows.data(),
                       a.kv_rows.data() + k_width, kv_width, blocks_, shape);
  k.rope(d_q_.data(), q_width, d_q_.data(), q_width, query_positions_.data(), N,
         static_cast<int>(Hq), static_cast<int>(D), c.rope_theta, true);
  k.rope(d_kv_rows, kv_width, d_kv_rows, kv_width, kv_positions_.data(), kv_rows_,
         static_cast<int>(Hkv), static_cast<int>(D), c.rope_theta, true);
  apply_compressions(d_kv_rows, true);
  T* d_kv = d_kv_.data();
  k.fill_zero(d_kv, static_cast<size_t>(N * kv_width) * sizeof(T));
  k.scatter_add_rows(d_kv, kv_width, d_kv_rows, kv_width, kv_source_.data(), kv_rows_, kv_width);

  k.gemm(false, false, N, H, q_width, 1.0, d_q_.data(), q_width, w.wq, H, 0.0, d_norm_.data(), H);
  k.gemm(false, false, N, H, k_width, 1.0, d_kv, kv_width, w.wk, H, 1.0, d_norm_.data(), H);
  k.gemm(false, false, N, H, k_width, 1.0, d_kv + k_width, kv_width, w.wv, H, 1.0, d_norm_.data(),
         H);
  k.gemm(true, false, q_width, H, N, 1.0, d_q_.data(), q_width, a.norm1.data(), H, 1.0, g.wq, H);
  k.gemm(true, false, k_width, H, N, 1.0, d_kv, kv_width, a.norm1.data(), H, 1.0, g.wk, H);
  k.gemm(true, false, k_width, H, N, 1.0, d_kv + k_width, kv_width, a.norm1.data(), H, 1.0, g.wv,
         H);
  k.rmsnorm_backward(d_res, g.input_norm, d_norm_.data(), residual_[l].data(), w.input_norm,
                     a.rstd1.data(), N, H);
}

template <typename T>
void LlamaModel<T>::backward() {
  if (!have_grad_state_)
    throw std::logic_error("backward: call forward with grad_scale != 0 first (once per forward)");
  const ModelConfig& c = config_;
  const int64_t N = n_tokens_, H = c.hidden_size;
  Kernels<T>& k = kernels_;
  k.fill_zero(d_residual_.data(), static_cast<size_t>(N * H) * sizeof(T));
  k.rmsnorm_backward(d_residual_.data(), grad(final_norm_index_), d_final_norm_.data(),
                     residual_[c.num_hidden_layers].data(), param(final_norm_index_),
                     final_rstd_.data(), N, H);
  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) layer_backward(l);
  k.embedding_backward(grad(embed_index_), d_residual_.data(), inputs_.data(), N, H);
  have_grad_state_ = false;
}

template class LlamaModel<float>;
template class LlamaModel<double>;

}  // namespace freqkv
