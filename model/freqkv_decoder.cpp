#include "model/freqkv_decoder.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace freqkv {

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
      max_chunk_tokens_(max_chunk_tokens),
      tp_(model.parallel_.tp),
      tp_size_(model.tp_size_) {
  if (model.parallel_.sp != nullptr)
    throw std::invalid_argument(
        "FreqKVDecoder: the model is built with sequence parallelism over " +
        std::to_string(model.parallel_.sp->size()) +
        " ranks, which splits a sequence's FreqKV chunks among ranks; a decoder keeps one cache "
        "and appends one chunk of new tokens at a time, so there is nothing to split: build the "
        "model without ModelParallel::sp for decoding (tensor parallelism, ModelParallel::tp, is "
        "supported)");
  if (freqkv_.enabled) freqkv_.validate();
  if (max_chunk_tokens_ < 1)
    throw std::invalid_argument("FreqKVDecoder: max_chunk_tokens must be >= 1, got " +
                                std::to_string(max_chunk_tokens_));
  // This rank's share of the layers, as the model holds it.
  q_heads_ = model.rank_dims_.heads;
  kv_heads_ = model.rank_dims_.kv_heads;
  ffn_width_ = model.rank_dims_.ffn;
  vocab_local_ = model.vocab_local_;
  q_width_ = model.rank_dims_.q_width;
  kv_width_ = model.rank_dims_.k_width;

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
  local_logits_ = Buffer<T>(kernels_, kClassifierRows * vocab_local_);
  logits_ = Buffer<T>(kernels_, config_.vocab_size);
  loss_stats_ = Buffer<Acc<T>>(kernels_, kClassifierRows * (tp_size_ + 2));
  token_dev_ = Buffer<int32_t>(kernels_, 1);
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
                  static_cast<int>(kv_heads_), static_cast<int>(config_.head_dim),
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
  const int64_t H = config_.hidden_size, I = ffn_width_;
  hidden_ = Buffer<T>(kernels_, n * H);
  mid_ = Buffer<T>(kernels_, n * H);
  normed_ = Buffer<T>(kernels_, n * H);
  q_ = Buffer<T>(kernels_, n * q_width_);
  att_ = Buffer<T>(kernels_, n * q_width_);
  gate_ = Buffer<T>(kernels_, n * I);
  up_ = Buffer<T>(kernels_, n * I);
  swiglu_ = Buffer<T>(kernels_, n * I);
  lora_xa_ = Buffer<T>(kernels_, n * model_.lora_config().rank);
  rstd_ = Buffer<Acc<T>>(kernels_, n);
  lse_ = Buffer<Acc<T>>(kernels_, n * q_heads_);
  tokens_dev_ = Buffer<int32_t>(kernels_, n);
  targets_dev_ = Buffer<int32_t>(kernels_, n);
  positions_dev_ = Buffer<int32_t>(kernels_, n);
  scratch_rows_ = n;
}

template <typename T>
int32_t FreqKVDecoder<T>::agree_on_token(int32_t token) {
  if (tp_ == nullptr) return token;
  kernels_.copy_to_device(token_dev_.data(), &token, sizeof(int32_t));
  tp_->broadcast(token_dev_.data(), 1, 0);
  kernels_.copy_to_host(&token, token_dev_.data(), sizeof(int32_t));
  return token;
}

template <typename T>
void FreqKVDecoder<T>::run_chunk(const int32_t* tokens, const int32_t* targets, int64_t n,
                                 double* losses, bool keep_last_logits) {
  ensure_scratch(n);
  Kernels<T>& k = kernels_;
  const int64_t R = rows_;
  // The new tokens take cache rows [R, R+n); a row's index is its RoPE position.
  std::vector<int32_t> positions(static_cast<size_t>(n));
  std::iota(positions.begin(), positions.end(), static_cast<int32_t>(R));
  k.copy_to_device(positions_dev_.data(), positions.data(), positions.size() * sizeof(int32_t));
  k.copy_to_device(tokens_dev_.data(), tokens, static_cast<size_t>(n) * sizeof(int32_t));

  model_.embedding_lookup(tokens, tokens_dev_.data(), n, hidden_.data(), embed_rows_);
  for (size_t l = 0; l < cache_.size(); ++l) run_layer(l, n);
  rows_ += n;
  peak_rows_ = std::max(peak_rows_, rows_);
  tokens_seen_ += n;

  if (targets) score_rows(targets, n, losses);
  if (keep_last_logits) last_row_logits(n);  // after the scoring blocks, which use normed_
}

template <typename T>
void FreqKVDecoder<T>::run_layer(size_t l, int64_t n) {
  using Model = LlamaModel<T>;
  Kernels<T>& k = kernels_;
  const ModelConfig& c = config_;
  const typename Model::LayerParams& p = model_.layers_[l];
  LayerCache& cache = cache_[l];
  const int64_t H = c.hidden_size, I = ffn_width_, qw = q_width_, kw = kv_width_, R = rows_;
  const int Hq = static_cast<int>(q_heads_), Hkv = static_cast<int>(kv_heads_);
  const int D = static_cast<int>(c.head_dim);
  T* x = hidden_.data();  // the residual stream: x -> mid_ (attention) -> x (MLP)

  // Attention block, on this rank's heads. Keys go into the cache pre-RoPE (the compression's
  // input) when FreqKV may compress them later; without FreqKV only their rotation is ever read,
  // so they are rotated in place.
  k.rmsnorm_forward(normed_.data(), rstd_.data(), x, model_.param(p.input_norm), n, H,
                    c.rms_norm_eps);
  model_.linear_forward(p.linear[Model::kQ], lora_xa_, n, normed_.data(), H, q_.data(), qw, 0.0);
  T* new_keys = (freqkv_.enabled ? cache.keys.data() : cache.rotated_keys.data()) + R * kw;
  model_.linear_forward(p.linear[Model::kK], lora_xa_, n, normed_.data(), H, new_keys, kw, 0.0);
  model_.linear_forward(p.linear[Model::kV], lora_xa_, n, normed_.data(), H,
                        cache.values.data() + R * kw, kw, 0.0);
  k.rope(cache.rotated_keys.data() + R * kw, kw, new_keys, kw, positions_dev_.data(), n, Hkv, D,
         c.rope_theta, false);
  k.rope(q_.data(), qw, q_.data(), qw, positions_dev_.data(), n, Hq, D, c.rope_theta, false);
  const AttnShape shape{Hq, Hkv, D, 1.0 / std::sqrt(static_cast<double>(D))};
  const std::vector<AttnBlock> block = {{0, n, 0, R + n}};  // bottom-right: query i sees rows <= R+i
  k.attention_forward(att_.data(), qw, lse_.data(), q_.data(), qw, cache.rotated_keys.data(),
                      cache.values.data(), kw, block, shape);
  model_.row_parallel_forward(p.linear[Model::kO], lora_xa_, n, att_.data(), qw, x, mid_.data());

  // MLP block: down(silu(gate(x)) * up(x)) on this rank's FFN columns.
  k.rmsnorm_forward(normed_.data(), rstd_.data(), mid_.data(), model_.param(p.post_norm), n, H,
                    c.rms_norm_eps);
  model_.linear_forward(p.linear[Model::kGate], lora_xa_, n, normed_.data(), H, gate_.data(), I, 0.0);
  model_.linear_forward(p.linear[Model::kUp], lora_xa_, n, normed_.data(), H, up_.data(), I, 0.0);
  k.swiglu_forward(swiglu_.data(), gate_.data(), up_.data(), n * I);
  model_.row_parallel_forward(p.linear[Model::kDown], lora_xa_, n, swiglu_.data(), I, mid_.data(), x);
}

template <typename T>
void FreqKVDecoder<T>::score_rows(const int32_t* targets, int64_t n, double* losses) {
  Kernels<T>& k = kernels_;
  const int64_t H = config_.hidden_size, V = vocab_local_;
  const T* head = model_.param(model_.lm_head_index_);
  k.rmsnorm_forward(normed_.data(), rstd_.data(), hidden_.data(),
                    model_.param(model_.final_norm_index_), n, H, config_.rms_norm_eps);
  k.copy_to_device(targets_dev_.data(), targets, static_cast<size_t>(n) * sizeof(int32_t));
  for (int64_t r0 = 0; r0 < n; r0 += kClassifierRows) {
    const int64_t rows = std::min(kClassifierRows, n - r0);
    // Rows without a target are not scored; a block without any skips the LM head (on every tp
    // rank alike: they all see the same targets).
    if (std::none_of(targets + r0, targets + r0 + rows, [](int32_t t) { return t >= 0; }))
      continue;
    k.gemm(false, true, rows, V, H, 1.0, normed_.data() + r0 * H, H, head, H, 0.0,
           local_logits_.data(), V);
    model_.vocab_parallel_losses(local_logits_.data(), targets + r0, targets_dev_.data() + r0,
                                 rows, loss_stats_.data(), losses + r0);
  }
}

template <typename T>
void FreqKVDecoder<T>::last_row_logits(int64_t n) {
  Kernels<T>& k = kernels_;
  const int64_t H = config_.hidden_size, V = vocab_local_;
  T* last = normed_.data() + (n - 1) * H;
  k.rmsnorm_forward(last, rstd_.data(), hidden_.data() + (n - 1) * H,
                    model_.param(model_.final_norm_index_), 1, H, config_.rms_norm_eps);
  const T* head = model_.param(model_.lm_head_index_);
  // Rank r computes the logits of ids [r V/tp, (r+1) V/tp): gathered in rank order, the slices
  // are the whole vocabulary in order.
  T* slice = tp_ ? local_logits_.data() : logits_.data();
  k.gemm(false, true, 1, V, H, 1.0, last, H, head, H, 0.0, slice, V);
  if (tp_) tp_->all_gather(slice, logits_.data(), V);
  have_logits_ = true;
}

template class FreqKVDecoder<float>;
template class FreqKVDecoder<double>;
#if defined(FREQKV_HAVE_CUDA)
template class FreqKVDecoder<bf16>;  // the CUDA backend's
#endif

}  // namespace freqkv
