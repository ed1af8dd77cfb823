#include "model/freqkv_decoder.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace freqkv {

namespace {

int64_t required_param(const ParamTable& table, const std::string& name) {
  const int64_t index = table.find(name);
  if (index < 0)
    throw std::invalid_argument("FreqKVDecoder: the model has no parameter " + name);
  return index;
}

}  // namespace

template <typename T>
FreqKVDecoder<T>::FreqKVDecoder(LlamaModel<T>& model)
    : FreqKVDecoder(model, model.freqkv_config()) {}

template <typename T>
FreqKVDecoder<T>::FreqKVDecoder(LlamaModel<T>& model, const FreqKVConfig& freqkv,
                                int64_t max_chunk_tokens)
    : model_(model),
      kernels_(model.kernels()),
      config_(model.config()),
      freqkv_(freqkv),
      max_chunk_tokens_(max_chunk_tokens) {
  if (model.tp_group() != nullptr)
    throw std::invalid_argument(
        "FreqKVDecoder: the model is built with tensor parallelism over " +
        std::to_string(model.tp_group()->size()) +
        " ranks, but the decoder runs on one rank with whole weights: build the model without "
        "ModelParallel::tp for decoding");
  // LlamaModel exposes no sequence-parallel group; a model split over sp > 1 ranks cannot hold
  // a 1-token sequence (one chunk) on each rank, and sequence_shard says so by throwing.
  try {
    model.sequence_shard(1);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(
        std::string("FreqKVDecoder: the model is built with sequence parallelism (") + e.what() +
        "), but the decoder runs on one rank: build the model without ModelParallel::sp for "
        "decoding");
  }
  if (freqkv_.enabled) freqkv_.validate();
  if (max_chunk_tokens_ < 1)
    throw std::invalid_argument("FreqKVDecoder: max_chunk_tokens must be >= 1, got " +
                                std::to_string(max_chunk_tokens_));

  const ParamTable& table = model.param_table();
  embed_index_ = required_param(table, "model.embed_tokens.weight");
  final_norm_index_ = required_param(table, "model.norm.weight");
  lm_head_index_ = config_.tie_word_embeddings ? embed_index_
                                               : required_param(table, "lm_head.weight");
  const LoraConfig& lora = model.lora_config();
  if (lora.enabled) {
    lora_rank_ = lora.rank;
    lora_scaling_ = lora.scaling();
  }
  const char* kModules[kLinearCount] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                        "mlp.down_proj"};
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    LayerWeights w;
    w.input_norm = required_param(table, prefix + "input_layernorm.weight");
    w.post_norm = required_param(table, prefix + "post_attention_layernorm.weight");
    for (int i = 0; i < kLinearCount; ++i) {
      Linear& lin = w.linear[i];
      const std::string module = prefix + kModules[i];
      lin.weight = required_param(table, module + ".weight");
      lin.lora_a = table.find(module + ".lora_A.weight");
      lin.lora_b = table.find(module + ".lora_B.weight");
      lin.out = table[lin.weight].shape[0];
      lin.in = table[lin.weight].shape[1];
    }
    layers_.push_back(w);
  }
  q_width_ = config_.num_attention_heads * config_.head_dim;
  kv_width_ = config_.num_key_value_heads * config_.head_dim;

  cache_.resize(static_cast<size_t>(config_.num_hidden_layers));
  if (freqkv_.enabled) {  // the cache never exceeds C rows: allocate it once
    capacity_ = freqkv_.cache;
    for (LayerCache& c : cache_) {
      c.keys = Buffer<T>(kernels_, capacity_ * kv_width_);
      c.rotated_keys = Buffer<T>(kernels_, capacity_ * kv_width_);
      c.values = Buffer<T>(kernels_, capacity_ * kv_width_);
    }
    const int64_t L = freqkv_.compressed();
    compressed_ = Buffer<T>(kernels_, L * kv_width_);
    std::vector<int32_t> positions(static_cast<size_t>(L));
    std::iota(positions.begin(), positions.end(), static_cast<int32_t>(freqkv_.sink));
    memory_positions_ = upload_array(kernels_, positions);
  }
  logits_ = Buffer<T>(kernels_, kClassifierRows * config_.vocab_size);
  losses_dev_ = Buffer<Acc<T>>(kernels_, kClassifierRows);
}

template <typename T>
void FreqKVDecoder<T>::reset() {
  rows_ = 0;
  peak_rows_ = 0;
  tokens_seen_ = 0;
  compressions_ = 0;
  have_logits_ = false;
}

template <typename T>
int64_t FreqKVDecoder<T>::cache_bytes() const {
  int64_t elements = 0;
  for (const LayerCache& c : cache_)
    elements += c.keys.size() + c.rotated_keys.size() + c.values.size();
  return elements * static_cast<int64_t>(sizeof(T));
}

template <typename T>
std::vector<float> FreqKVDecoder<T>::prefill(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) throw std::invalid_argument("FreqKVDecoder::prefill: the prompt is empty");
  append(tokens.data(), nullptr, static_cast<int64_t>(tokens.size()), nullptr);
  return logits_to_host();
}

template <typename T>
std::vector<float> FreqKVDecoder<T>::step(int32_t token) {
  append(&token, nullptr, 1, nullptr);
  return logits_to_host();
}

template <typename T>
std::vector<double> FreqKVDecoder<T>::score(const std::vector<int32_t>& tokens,
                                            const std::vector<int32_t>& targets) {
  if (tokens.size() != targets.size())
    throw std::invalid_argument("FreqKVDecoder::score: " + std::to_string(tokens.size()) +
                                " tokens but " + std::to_string(targets.size()) + " targets");
  std::vector<double> losses(tokens.size(), 0.0);
  if (!tokens.empty())
    append(tokens.data(), targets.data(), static_cast<int64_t>(tokens.size()), losses.data());
  return losses;
}

template <typename T>
std::vector<double> FreqKVDecoder<T>::last_logits_double() {
  if (!have_logits_)
    throw std::logic_error("FreqKVDecoder::last_logits_double: no prefill or step since reset()");
  std::vector<double> out(static_cast<size_t>(config_.vocab_size));
  kernels_.download(out.data(), logits_.data(), config_.vocab_size);
  return out;
}

template <typename T>
std::vector<float> FreqKVDecoder<T>::logits_to_host() {
  std::vector<float> out(static_cast<size_t>(config_.vocab_size));
  kernels_.download(out.data(), logits_.data(), config_.vocab_size);
  return out;
}

template <typename T>
void FreqKVDecoder<T>::append(const int32_t* tokens, const int32_t* targets, int64_t n,
                              double* losses) {
  const int64_t V = config_.vocab_size;
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V)
      throw std::out_of_range("FreqKVDecoder: token " + std::to_string(tokens[i]) + " at index " +
                              std::to_string(i) + " is outside the vocabulary [0, " +
                              std::to_string(V) + ")");
    if (targets && targets[i] >= V)
      throw std::out_of_range("FreqKVDecoder: target " + std::to_string(targets[i]) +
                              " at index " + std::to_string(i) +
                              " is outside the vocabulary [0, " + std::to_string(V) + ")");
  }
  int64_t done = 0;
  while (done < n) {
    // Compress lazily, when a token arrives at a full cache: the token that filled it attended
    // over all C rows, as the last token of a training chunk does.
    if (freqkv_.enabled && rows_ == freqkv_.cache) compress_cache();
    const int64_t room = freqkv_.enabled ? freqkv_.cache - rows_ : n - done;
    const int64_t m = std::min({n - done, room, max_chunk_tokens_});
    if (!freqkv_.enabled) ensure_capacity(rows_ + m);
    run_chunk(tokens + done, targets ? targets + done : nullptr, m, losses ? losses + done : nullptr,
              done + m == n);
    done += m;
  }
}

template <typename T>
void FreqKVDecoder<T>::compress_cache() {
  // [M_g ; X_g] = pre-RoPE rows [S, C) become M_{g+1} = P_{F->L} [M_g ; X_g] in rows [S, S+L),
  // keys and values alike; the memory rows are then rotated with their positions S..S+L-1.
  const int64_t S = freqkv_.sink, L = freqkv_.compressed(), F = freqkv_.compressible();
  const size_t memory_bytes = static_cast<size_t>(L * kv_width_) * sizeof(T);
  for (LayerCache& c : cache_) {
    for (T* rows : {c.keys.data(), c.values.data()}) {
      // The output overlaps the input rows: compress into scratch, then copy back.
      kernels_.freqkv_compress(compressed_.data(), kv_width_, rows + S * kv_width_, kv_width_, F,
                               L, kv_width_);
      kernels_.copy_on_device(rows + S * kv_width_, compressed_.data(), memory_bytes);
    }
    kernels_.rope(c.rotated_keys.data() + S * kv_width_, kv_width_, c.keys.data() + S * kv_width_,
                  kv_width_, memory_positions_.data(), L,
                  static_cast<int>(config_.num_key_value_heads), static_cast<int>(config_.head_dim),
                  config_.rope_theta, false);
  }
  rows_ = S + L;
  ++compressions_;
}

template <typename T>
void FreqKVDecoder<T>::ensure_capacity(int64_t rows) {
  if (rows <= capacity_) return;
  const int64_t capacity = std::max({rows, 2 * capacity_, int64_t{256}});
  const size_t used_bytes = static_cast<size_t>(rows_ * kv_width_) * sizeof(T);
  for (LayerCache& c : cache_) {
    Buffer<T> rotated(kernels_, capacity * kv_width_), values(kernels_, capacity * kv_width_);
    if (rows_ > 0) {
      kernels_.copy_on_device(rotated.data(), c.rotated_keys.data(), used_bytes);
      kernels_.copy_on_device(values.data(), c.values.data(), used_bytes);
    }
    c.rotated_keys = std::move(rotated);
    c.values = std::move(values);
  }
  capacity_ = capacity;
}

template <typename T>
void FreqKVDecoder<T>::ensure_scratch(int64_t n) {
  if (n <= scratch_rows_) return;
  const int64_t H = config_.hidden_size, I = config_.intermediate_size;
  hidden_ = Buffer<T>(kernels_, n * H);
  normed_ = Buffer<T>(kernels_, n * H);
  q_ = Buffer<T>(kernels_, n * q_width_);
  att_ = Buffer<T>(kernels_, n * q_width_);
  gate_ = Buffer<T>(kernels_, n * I);
  up_ = Buffer<T>(kernels_, n * I);
  swiglu_ = Buffer<T>(kernels_, n * I);
  lora_xa_ = Buffer<T>(kernels_, n * lora_rank_);
  rstd_ = Buffer<Acc<T>>(kernels_, n);
  lse_ = Buffer<Acc<T>>(kernels_, n * config_.num_attention_heads);
  tokens_dev_ = Buffer<int32_t>(kernels_, n);
  targets_dev_ = Buffer<int32_t>(kernels_, n);
  positions_dev_ = Buffer<int32_t>(kernels_, n);
  scratch_rows_ = n;
}

template <typename T>
void FreqKVDecoder<T>::linear(const Linear& lin, const T* x, int64_t ld_x, T* y, int64_t ld_y,
                              double beta, int64_t n) {
  Kernels<T>& k = kernels_;
  k.gemm(false, true, n, lin.out, lin.in, 1.0, x, ld_x, model_.param(lin.weight), lin.in, beta, y,
         ld_y);
  if (lin.lora_a < 0) return;
  const int64_t r = lora_rank_;
  k.gemm(false, true, n, r, lin.in, 1.0, x, ld_x, model_.param(lin.lora_a), lin.in, 0.0,
         lora_xa_.data(), r);
  k.gemm(false, true, n, lin.out, r, lora_scaling_, lora_xa_.data(), r, model_.param(lin.lora_b), r,
         1.0, y, ld_y);
}

template <typename T>
void FreqKVDecoder<T>::run_chunk(const int32_t* tokens, const int32_t* targets, int64_t n,
                                 double* losses, bool keep_last_logits) {
  ensure_scratch(n);
  Kernels<T>& k = kernels_;
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int Hq = static_cast<int>(c.num_attention_heads);
  const int Hkv = static_cast<int>(c.num_key_value_heads);
  const int D = static_cast<int>(c.head_dim);
  const int64_t qw = q_width_, kw = kv_width_, R = rows_;

  // The new tokens take cache rows [R, R+n); a row's index is its RoPE position.
  std::vector<int32_t> positions(static_cast<size_t>(n));
  std::iota(positions.begin(), positions.end(), static_cast<int32_t>(R));
  k.copy_to_device(positions_dev_.data(), positions.data(), positions.size() * sizeof(int32_t));
  k.copy_to_device(tokens_dev_.data(), tokens, static_cast<size_t>(n) * sizeof(int32_t));

  T* x = hidden_.data();  // the residual stream, updated in place layer by layer
  k.embedding_forward(x, model_.param(embed_index_), tokens_dev_.data(), n, H);
  const AttnShape shape{Hq, Hkv, D, 1.0 / std::sqrt(static_cast<double>(D))};
  const std::vector<AttnBlock> block = {{0, n, 0, R + n}};  // bottom-right: query i sees rows <= R+i
  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerWeights& w = layers_[l];
    LayerCache& cache = cache_[l];
    k.rmsnorm_forward(normed_.data(), rstd_.data(), x, model_.param(w.input_norm), n, H,
                      c.rms_norm_eps);
    linear(w.linear[kQ], normed_.data(), H, q_.data(), qw, 0.0, n);
    // Keys go in pre-RoPE (the compression's input) when FreqKV may compress them later;
    // without FreqKV only their rotation is ever read, so they are rotated in place.
    T* new_keys = (freqkv_.enabled ? cache.keys.data() : cache.rotated_keys.data()) + R * kw;
    linear(w.linear[kK], normed_.data(), H, new_keys, kw, 0.0, n);
    linear(w.linear[kV], normed_.data(), H, cache.values.data() + R * kw, kw, 0.0, n);
    k.rope(cache.rotated_keys.data() + R * kw, kw, new_keys, kw, positions_dev_.data(), n, Hkv, D,
           c.rope_theta, false);
    k.rope(q_.data(), qw, q_.data(), qw, positions_dev_.data(), n, Hq, D, c.rope_theta, false);
    k.attention_forward(att_.data(), qw, lse_.data(), q_.data(), qw, cache.rotated_keys.data(),
                        cache.values.data(), kw, block, shape);
    linear(w.linear[kO], att_.data(), qw, x, H, 1.0, n);  // x += o_proj(attention)

    k.rmsnorm_forward(normed_.data(), rstd_.data(), x, model_.param(w.post_norm), n, H,
                      c.rms_norm_eps);
    linear(w.linear[kGate], normed_.data(), H, gate_.data(), I, 0.0, n);
    linear(w.linear[kUp], normed_.data(), H, up_.data(), I, 0.0, n);
    k.swiglu_forward(swiglu_.data(), gate_.data(), up_.data(), n * I);
    linear(w.linear[kDown], swiglu_.data(), I, x, H, 1.0, n);  // x += down(swiglu)
  }
  rows_ += n;
  peak_rows_ = std::max(peak_rows_, rows_);
  tokens_seen_ += n;

  // Final norm of the rows the classifier reads: all of them when scoring, else the last.
  const T* final_norm = model_.param(final_norm_index_);
  const T* head = model_.param(lm_head_index_);
  if (targets) {
    k.rmsnorm_forward(normed_.data(), rstd_.data(), x, final_norm, n, H, c.rms_norm_eps);
    k.copy_to_device(targets_dev_.data(), targets, static_cast<size_t>(n) * sizeof(int32_t));
    std::vector<Acc<T>> block_losses(static_cast<size_t>(kClassifierRows));
    for (int64_t r0 = 0; r0 < n; r0 += kClassifierRows) {
      const int64_t rows = std::min(kClassifierRows, n - r0);
      // Rows without a target are not scored; a block without any skips the LM head.
      if (std::none_of(targets + r0, targets + r0 + rows, [](int32_t t) { return t >= 0; }))
        continue;
      k.gemm(false, true, rows, V, H, 1.0, normed_.data() + r0 * H, H, head, H, 0.0,
             logits_.data(), V);
      k.cross_entropy(losses_dev_.data(), logits_.data(), V, targets_dev_.data() + r0, rows, V,
                      0.0);
      k.copy_to_host(block_losses.data(), losses_dev_.data(),
                     static_cast<size_t>(rows) * sizeof(Acc<T>));
      for (int64_t i = 0; i < rows; ++i) losses[r0 + i] = static_cast<double>(block_losses[i]);
    }
  } else if (keep_last_logits) {
    k.rmsnorm_forward(normed_.data() + (n - 1) * H, rstd_.data(), x + (n - 1) * H, final_norm, 1,
                      H, c.rms_norm_eps);
  }
  if (keep_last_logits) {  // after the scoring blocks, which also use logits_
    k.gemm(false, true, 1, V, H, 1.0, normed_.data() + (n - 1) * H, H, head, H, 0.0,
           logits_.data(), V);
    have_logits_ = true;
  }
}

template class FreqKVDecoder<float>;
template class FreqKVDecoder<double>;
#if defined(FREQKV_HAVE_CUDA)
template class FreqKVDecoder<bf16>;  // the CUDA backend's
#endif

}  // namespace freqkv
