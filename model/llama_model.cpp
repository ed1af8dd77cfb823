#include "model/llama_model.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "kernels/freqkv_matrix.h"

namespace freqkv {

namespace {

// Row n's log-sum-exp over the whole vocabulary from each tp rank's over its slice
// (all: [ranks][rows]): log sum_r exp(lse_r), shifted by the largest for stability.
template <typename A>
double combine_vocab_slices_lse(const A* all, int64_t rows, int ranks, int64_t n) {
  double m = static_cast<double>(all[n]);
  for (int r = 1; r < ranks; ++r) m = std::max(m, static_cast<double>(all[r * rows + n]));
  double sum = 0;
  for (int r = 0; r < ranks; ++r) sum += std::exp(static_cast<double>(all[r * rows + n]) - m);
  return m + std::log(sum);
}

}  // namespace

template <typename T>
LlamaModel<T>::LlamaModel(const ModelConfig& config, const FreqKVConfig& freqkv,
                          Kernels<T>& kernels, const LoraConfig& lora,
                          const ModelParallel& parallel)
    : config_(config),
      freqkv_(freqkv),
      lora_(lora),
      parallel_(parallel),
      kernels_(kernels),
      table_(llama_param_table(config, lora)) {
  if (freqkv_.enabled) freqkv_.validate();
  if (parallel_.tp && parallel_.tp->size() > 1) {
    tp_rank_ = parallel_.tp->rank();
    tp_size_ = parallel_.tp->size();
  } else {
    parallel_.tp = nullptr;
  }
  if (parallel_.sp && parallel_.sp->size() == 1) parallel_.sp = nullptr;
  const auto require_divisible = [&](const char* what, int64_t value) {
    if (value % tp_size_ != 0)
      throw std::invalid_argument(std::string("tensor parallelism: ") + what + " = " +
                                  std::to_string(value) + " is not divisible by tp = " +
                                  std::to_string(tp_size_) + " (choose a tp that divides it)");
  };
  require_divisible("num_attention_heads", config_.num_attention_heads);
  require_divisible("num_key_value_heads", config_.num_key_value_heads);
  require_divisible("intermediate_size", config_.intermediate_size);
  require_divisible("vocab_size", config_.vocab_size);
  vocab_local_ = config_.vocab_size / tp_size_;
  rank_dims_.heads = config_.num_attention_heads / tp_size_;
  rank_dims_.kv_heads = config_.num_key_value_heads / tp_size_;
  rank_dims_.ffn = config_.intermediate_size / tp_size_;
  rank_dims_.q_width = rank_dims_.heads * config_.head_dim;
  rank_dims_.k_width = rank_dims_.kv_heads * config_.head_dim;
  rank_dims_.kv_width = 2 * rank_dims_.k_width;
  vocab_begin_ = tp_rank_ * vocab_local_;

  // This rank's shard of each parameter, packed one after another in the arenas.
  int64_t offset = 0;
  for (size_t i = 0; i < table_.size(); ++i) {
    const ParamSpec& spec = table_[i];
    LocalParam lp;
    lp.shape = spec.shape;
    if (tp_size_ > 1 && spec.shard == ShardKind::kColumn) lp.split_dim = 0;
    if (tp_size_ > 1 && spec.shard == ShardKind::kRow) lp.split_dim = 1;
    if (lp.split_dim >= 0) lp.shape[lp.split_dim] /= tp_size_;
    lp.numel = 1;
    for (int64_t d : lp.shape) lp.numel *= d;
    lp.offset = offset;
    offset += lp.numel;
    local_.push_back(lp);
    if (tp_size_ > 1 && spec.role == ParamRole::kLoraA && spec.shard == ShardKind::kReplicated)
      column_lora_a_.push_back(static_cast<int64_t>(i));
  }
  params_ = Buffer<T>(kernels_, offset);
  grads_ = Buffer<T>(kernels_, offset);
  trainable_.assign(table_.size(), 1);
  embed_index_ = table_.find("model.embed_tokens.weight");
  final_norm_index_ = table_.find("model.norm.weight");
  lm_head_index_ = config_.tie_word_embeddings ? embed_index_ : table_.find("lm_head.weight");

  const char* kModules[kLinearCount] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                        "mlp.down_proj"};
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    LayerParams p;
    p.input_norm = table_.find(prefix + "input_layernorm.weight");
    p.post_norm = table_.find(prefix + "post_attention_layernorm.weight");
    for (int i = 0; i < kLinearCount; ++i) {
      Linear& lin = p.linear[i];
      const std::string module = prefix + kModules[i];
      lin.weight = table_.find(module + ".weight");
      lin.lora_a = table_.find(module + ".lora_A.weight");
      lin.lora_b = table_.find(module + ".lora_B.weight");
      lin.out = local_[lin.weight].shape[0];
      lin.in = local_[lin.weight].shape[1];
    }
    layers_.push_back(p);
    layer_first_param_.push_back(static_cast<size_t>(p.input_norm));
  }
  layer_first_param_.push_back(static_cast<size_t>(final_norm_index_));
}

template <typename T>
void LlamaModel<T>::set_recompute(bool on) {
  if (on == recompute_) return;
  recompute_ = on;
  batch_ = seq_len_ = 0;  // the next forward lays out its activations anew
  have_grad_state_ = false;
}

template <typename T>
void LlamaModel<T>::report_grads_ready(size_t first, size_t last) {
  if (!grad_ready_hook_) return;
  int64_t begin = 0, end = 0;  // the range being extended
  for (size_t i = first; i < last; ++i) {
    if (!trainable(i)) continue;
    if (end > begin && local_[i].offset != end) {
      grad_ready_hook_(begin, end - begin);
      begin = end = 0;
    }
    if (end == begin) begin = end = local_[i].offset;
    end += local_[i].numel;
  }
  if (end > begin) grad_ready_hook_(begin, end - begin);
}

template <typename T>
template <typename U>
std::vector<U> LlamaModel<T>::slice_local(size_t i, const U* logical) const {
  const LocalParam& lp = local_[i];
  if (lp.split_dim < 0) return std::vector<U>(logical, logical + lp.numel);
  const std::vector<int64_t>& full = table_[i].shape;
  if (lp.split_dim == 0) {  // a block of rows
    const int64_t begin = tp_rank_ * lp.numel;
    return std::vector<U>(logical + begin, logical + begin + lp.numel);
  }
  std::vector<U> out(static_cast<size_t>(lp.numel));  // a block of columns of every row
  const int64_t cols = lp.shape[1], c0 = tp_rank_ * cols;
  for (int64_t r = 0; r < full[0]; ++r)
    std::copy(logical + r * full[1] + c0, logical + r * full[1] + c0 + cols, out.begin() + r * cols);
  return out;
}

template <typename T>
template <typename U>
std::vector<U> LlamaModel<T>::to_logical(size_t i, const std::vector<U>& gathered) const {
  // gathered = the ranks' shards one after another; row splits are already the logical layout.
  const LocalParam& lp = local_[i];
  if (lp.split_dim != 1) return gathered;
  const std::vector<int64_t>& full = table_[i].shape;
  const int64_t cols = lp.shape[1];
  std::vector<U> out(gathered.size());
  for (int r = 0; r < tp_size_; ++r)
    for (int64_t row = 0; row < full[0]; ++row)
      std::copy(gathered.begin() + r * lp.numel + row * cols,
                gathered.begin() + r * lp.numel + (row + 1) * cols,
                out.begin() + row * full[1] + r * cols);
  return out;
}

template <typename T>
void LlamaModel<T>::set_param(size_t i, const float* host) {
  const std::vector<float> local = slice_local(i, host);
  kernels_.upload(param(i), local.data(), local_[i].numel);
}

template <typename T>
void LlamaModel<T>::set_param(size_t i, const double* host) {
  const std::vector<double> local = slice_local(i, host);
  kernels_.upload(param(i), local.data(), local_[i].numel);
}

template <typename T>
void LlamaModel<T>::set_param_local(size_t i, const float* host) {
  kernels_.upload(param(i), host, local_[i].numel);
}

template <typename T>
std::vector<float> LlamaModel<T>::get_param_local(size_t i) {
  std::vector<float> out(static_cast<size_t>(local_[i].numel));
  kernels_.download(out.data(), param(i), local_[i].numel);
  return out;
}

template <typename T>
std::vector<float> LlamaModel<T>::gather_logical(size_t i, const std::vector<float>& local) {
  if (local_[i].split_dim < 0) return local;
  const int64_t n = local_[i].numel;
  Buffer<float> mine(kernels_, n), all(kernels_, n * tp_size_);  // the group's memory
  kernels_.copy_to_device(mine.data(), local.data(), static_cast<size_t>(n) * sizeof(float));
  parallel_.tp->all_gather(mine.data(), all.data(), n);
  std::vector<float> gathered(static_cast<size_t>(n * tp_size_));
  kernels_.copy_to_host(gathered.data(), all.data(), gathered.size() * sizeof(float));
  return to_logical(i, gathered);
}

template <typename T>
std::vector<float> LlamaModel<T>::get_param(size_t i) {
  return gather_logical(i, get_param_local(i));
}

template <typename T>
std::vector<float> LlamaModel<T>::get_grad(size_t i) {
  std::vector<float> local(static_cast<size_t>(local_[i].numel));
  kernels_.download(local.data(), grad(i), local_[i].numel);
  return gather_logical(i, local);
}

template <typename T>
std::vector<double> LlamaModel<T>::get_grad_f64(size_t i) {
  std::vector<double> local(static_cast<size_t>(local_[i].numel));
  kernels_.download(local.data(), grad(i), local_[i].numel);
  if (local_[i].split_dim < 0) return local;
  Buffer<T> all(kernels_, local_[i].numel * tp_size_);
  parallel_.tp->all_gather(grad(i), all.data(), local_[i].numel);
  std::vector<double> gathered(static_cast<size_t>(all.size()));
  kernels_.download(gathered.data(), all.data(), all.size());
  return to_logical(i, gathered);
}

template <typename T>
void LlamaModel<T>::init_random(uint64_t seed, double std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, std);
  for (size_t i = 0; i < table_.size(); ++i) {
    if (table_[i].is_lora()) continue;
    std::vector<double> values(static_cast<size_t>(table_[i].numel()));
    for (double& v : values) v = table_[i].is_norm() ? 1.0 : normal(rng);
    set_param(i, values.data());
  }
  init_lora(seed + 1);
}

template <typename T>
void LlamaModel<T>::init_lora(uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < table_.size(); ++i) {
    const ParamSpec& spec = table_[i];
    if (!spec.is_lora()) continue;
    std::vector<double> values(static_cast<size_t>(spec.numel()), 0.0);
    if (spec.role == ParamRole::kLoraA) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(spec.shape[1]));
      std::uniform_real_distribution<double> uniform(-bound, bound);
      for (double& v : values) v = uniform(rng);
    }
    set_param(i, values.data());
  }
}

template <typename T>
void LlamaModel<T>::zero_grads() {
  kernels_.fill_zero(grads_.data(), static_cast<size_t>(grads_.size()) * sizeof(T));
}

template <typename T>
SequenceShard LlamaModel<T>::sequence_shard(int64_t seq_len) const {
  const FreqKVSchedule schedule = FreqKVSchedule::build(seq_len, freqkv_);
  const int64_t sp_size = parallel_.sp ? parallel_.sp->size() : 1;
  const int64_t sp_rank = parallel_.sp ? parallel_.sp->rank() : 0;
  const std::vector<int64_t> bounds = partition_chunks(schedule, sp_size);
  SequenceShard sh;
  sh.chunk_begin = bounds[sp_rank];
  sh.chunk_end = bounds[sp_rank + 1];
  const FreqKVChunk& first = schedule.chunks[sh.chunk_begin];
  const FreqKVChunk& last = schedule.chunks[sh.chunk_end - 1];
  sh.token_begin = first.token_start;
  sh.tokens = last.token_start + last.n_tokens - first.token_start;
  sh.kv_begin = first.kv_start;
  sh.kv_rows = last.kv_start + last.kv_len - first.kv_start;
  const int64_t S = freqkv_.sink;
  for (int64_t g = 0; g + 1 < static_cast<int64_t>(schedule.chunks.size()); ++g) {
    FreqKVCompression c = schedule.compressions[g];  // chunk g -> chunk g + 1
    const bool src_here = g >= sh.chunk_begin && g < sh.chunk_end;
    const bool dst_here = g + 1 >= sh.chunk_begin && g + 1 < sh.chunk_end;
    c.src_row -= sh.kv_begin;
    c.dst_row -= sh.kv_begin;
    if (src_here && dst_here) sh.compressions.push_back(c);
    if (!src_here && dst_here) sh.memory_in_row = c.dst_row;
    if (src_here && !dst_here) sh.memory_out_row = c.src_row;
  }
  sh.receives_sinks = sp_size > 1 && S > 0 && schedule.chunks.size() > 1;
  return sh;
}

template <typename T>
void LlamaModel<T>::prepare(int64_t batch, int64_t seq_len, bool training) {
  const bool per_layer = training && !recompute_;
  const bool keep_exchanged = training && recompute_;
  if (batch == batch_ && seq_len == seq_len_ && training == prepared_training_) return;
  prepared_training_ = training;
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, I = rank_dims_.ffn;
  const int64_t q_width = rank_dims_.q_width, kv_width = rank_dims_.kv_width;

  schedule_ = FreqKVSchedule::build(seq_len, freqkv_);
  shard_ = sequence_shard(seq_len);
  const SequenceShard& sh = shard_;
  const int64_t T_local = sh.tokens, R = sh.kv_rows, S = freqkv_.sink;
  const int64_t N = batch * T_local;
  // kv_ext_ rows: [received sink rows of every sequence | this rank's tokens of every sequence].
  sink_rows_ = sh.receives_sinks ? batch * S : 0;
  blocks_.clear();
  std::vector<int64_t> kv_source;
  std::vector<int32_t> kv_positions, query_positions;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = sh.chunk_begin; g < sh.chunk_end; ++g) {
      const FreqKVChunk& ch = schedule_.chunks[g];
      blocks_.push_back({b * T_local + ch.token_start - sh.token_begin, ch.n_tokens,
                         b * R + ch.kv_start - sh.kv_begin, ch.kv_len});
    }
    for (int64_t r = sh.kv_begin; r < sh.kv_begin + R; ++r) {
      const int64_t src = schedule_.kv_source[r];
      if (src < 0) {
        kv_source.push_back(-1);
      } else if (src >= sh.token_begin && src < sh.token_begin + T_local) {
        kv_source.push_back(sink_rows_ + b * T_local + src - sh.token_begin);
      } else {  // a sink token held by sp rank 0
        kv_source.push_back(b * S + src);
      }
      kv_positions.push_back(schedule_.kv_positions[r]);
    }
    query_positions.insert(query_positions.end(), schedule_.query_positions.begin() + sh.token_begin,
                           schedule_.query_positions.begin() + sh.token_begin + T_local);
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
  kept_sinks_.clear();
  kept_memory_.clear();
  for (int64_t l = 0; l <= n_layers; ++l) residual_.emplace_back(kernels_, N * H);
  for (int64_t l = 0; l < (per_layer ? n_layers : 1); ++l) {
    LayerActivations a;
    a.norm1 = Buffer<T>(kernels_, N * H);
    a.rstd1 = Buffer<Acc<T>>(kernels_, N);
    a.q = Buffer<T>(kernels_, N * q_width);
    a.kv_rows = Buffer<T>(kernels_, batch * R * kv_width);
    a.att = Buffer<T>(kernels_, N * q_width);
    a.lse = Buffer<Acc<T>>(kernels_, N * rank_dims_.heads);
    a.res_mid = Buffer<T>(kernels_, N * H);
    a.norm2 = Buffer<T>(kernels_, N * H);
    a.rstd2 = Buffer<Acc<T>>(kernels_, N);
    a.gate = Buffer<T>(kernels_, N * I);
    a.up = Buffer<T>(kernels_, N * I);
    a.swiglu = Buffer<T>(kernels_, N * I);
    for (int i = 0; i < kLinearCount; ++i)
      if (layers_[l].linear[i].lora_a >= 0) a.lora_xa[i] = Buffer<T>(kernels_, N * lora_.rank);
    acts_.push_back(std::move(a));
  }
  final_norm_ = Buffer<T>(kernels_, N * H);
  final_rstd_ = Buffer<Acc<T>>(kernels_, N);
  losses_ = Buffer<Acc<T>>(kernels_, N);
  logits_ = Buffer<T>(kernels_, std::min(classifier_rows_, N) * vocab_local_);
  tp_stats_ = Buffer<Acc<T>>(kernels_, tp_size_ > 1 ? classifier_rows_ * (tp_size_ + 2) : 0);
  kv_ext_ = Buffer<T>(kernels_, (sink_rows_ + N) * kv_width);
  const int64_t L = freqkv_.enabled ? freqkv_.compressed() : 0;
  memory_in_ = Buffer<T>(kernels_, sh.memory_in_row >= 0 ? batch * L * kv_width : 0);
  memory_out_ = Buffer<T>(kernels_, sh.memory_out_row >= 0 ? batch * L * kv_width : 0);
  memory_transfer_ = Buffer<T>();
  if (sh.memory_in_row >= 0 && sh.memory_out_row >= 0) {
    // k compressions from the memory entering chunk_begin to the one leaving for chunk_end.
    const std::vector<double> a = freqkv_memory_transfer_matrix(
        freqkv_.compressible(), L, sh.chunk_end - sh.chunk_begin);
    memory_transfer_ = Buffer<T>(kernels_, L * L);
    kernels_.upload(memory_transfer_.data(), a.data(), L * L);
  }
  if (keep_exchanged) {
    for (int64_t l = 0; l < n_layers && sh.receives_sinks; ++l)
      kept_sinks_.emplace_back(kernels_, sink_rows_ * kv_width);
    for (int64_t l = 0; l < n_layers && sh.memory_in_row >= 0; ++l)
      kept_memory_.emplace_back(kernels_, batch * freqkv_.compressed() * kv_width);
  }

  d_residual_ = Buffer<T>(kernels_, N * H);
  d_final_norm_ = Buffer<T>(kernels_, N * H);
  d_norm_ = Buffer<T>(kernels_, N * H);
  d_q_ = Buffer<T>(kernels_, N * q_width);
  d_kv_rows_ = Buffer<T>(kernels_, batch * R * kv_width);
  d_kv_ext_ = Buffer<T>(kernels_, (sink_rows_ + N) * kv_width);
  d_att_ = Buffer<T>(kernels_, N * q_width);
  d_swiglu_ = Buffer<T>(kernels_, N * I);
  d_gate_ = Buffer<T>(kernels_, N * I);
  d_up_ = Buffer<T>(kernels_, N * I);
  d_lora_xa_ = Buffer<T>(kernels_, lora_.enabled ? N * lora_.rank : 0);

  batch_ = batch;
  seq_len_ = seq_len;
  n_tokens_ = N;
  kv_rows_ = batch * R;
}

template <typename T>
void LlamaModel<T>::apply_compressions(T* kv_rows, bool backward) {
  const int64_t width = rank_dims_.kv_width;
  const auto& steps = shard_.compressions;
  for (int64_t b = 0; b < batch_; ++b) {
    T* base = kv_rows + b * shard_.kv_rows * width;
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
void LlamaModel<T>::linear_forward(const Linear& lin, Buffer<T>& xa, int64_t rows, const T* x,
                                   int64_t ld_x, T* y, int64_t ld_y, double beta) {
  const int64_t N = rows;
  Kernels<T>& k = kernels_;
  k.gemm(false, true, N, lin.out, lin.in, 1.0, x, ld_x, param(lin.weight), lin.in, beta, y, ld_y);
  if (lin.lora_a < 0) return;
  const int64_t r = lora_.rank;
  k.gemm(false, true, N, r, lin.in, 1.0, x, ld_x, param(lin.lora_a), lin.in, 0.0, xa.data(), r);
  k.gemm(false, true, N, lin.out, r, lora_.scaling(), xa.data(), r, param(lin.lora_b), r, 1.0, y,
         ld_y);
}

template <typename T>
void LlamaModel<T>::linear_backward(const Linear& lin, const Buffer<T>& xa, const T* dy,
                                    int64_t ld_dy, const T* x, int64_t ld_x, T* dx, int64_t ld_dx,
                                    double dx_beta) {
  const int64_t N = n_tokens_;
  Kernels<T>& k = kernels_;
  k.gemm(false, false, N, lin.in, lin.out, 1.0, dy, ld_dy, param(lin.weight), lin.in, dx_beta, dx,
         ld_dx);
  if (trainable(lin.weight))
    k.gemm(true, false, lin.out, lin.in, N, 1.0, dy, ld_dy, x, ld_x, 1.0, grad(lin.weight), lin.in);
  if (lin.lora_a < 0) return;
  const int64_t r = lora_.rank;
  const double s = lora_.scaling();
  T* d_xa = d_lora_xa_.data();  // d(x A^T) = s dy B
  k.gemm(false, false, N, r, lin.out, s, dy, ld_dy, param(lin.lora_b), r, 0.0, d_xa, r);
  if (trainable(lin.lora_b))
    k.gemm(true, false, lin.out, r, N, s, dy, ld_dy, xa.data(), r, 1.0, grad(lin.lora_b), r);
  // A column-parallel layer's ranks each hold some output columns: d(x A^T) is their sum. With
  // it complete, A's gradient is the same on every rank, and x's share is added once (rank 0),
  // since the caller sums the input gradient over the ranks.
  const bool column_parallel = tp_size_ > 1 && table_[lin.weight].shard == ShardKind::kColumn;
  if (column_parallel) parallel_.tp->all_reduce_sum(d_xa, N * r);
  if (trainable(lin.lora_a))
    k.gemm(true, false, r, lin.in, N, 1.0, d_xa, r, x, ld_x, 1.0, grad(lin.lora_a), lin.in);
  if (!column_parallel || tp_rank_ == 0)
    k.gemm(false, false, N, lin.in, r, 1.0, d_xa, r, param(lin.lora_a), lin.in, 1.0, dx, ld_dx);
}

template <typename T>
void LlamaModel<T>::row_parallel_forward(const Linear& lin, Buffer<T>& xa, int64_t rows,
                                         const T* x, int64_t ld_x, const T* residual, T* y) {
  const int64_t N = rows, H = config_.hidden_size;
  Kernels<T>& k = kernels_;
  const size_t bytes = static_cast<size_t>(N * H) * sizeof(T);
  if (tp_size_ == 1) {
    k.copy_on_device(y, residual, bytes);
    linear_forward(lin, xa, rows, x, ld_x, y, H, 1.0);
    return;
  }
  // Each rank multiplies its slice of the input features; the sum over ranks (one all-reduce)
  // is the output. The residual and the LoRA term are added by rank 0 only.
  if (tp_rank_ == 0) k.copy_on_device(y, residual, bytes);
  else k.fill_zero(y, bytes);
  k.gemm(false, true, N, lin.out, lin.in, 1.0, x, ld_x, param(lin.weight), lin.in, 1.0, y, H);
  if (lin.lora_a >= 0) {
    const int64_t r = lora_.rank;
    k.gemm(false, true, N, r, lin.in, 1.0, x, ld_x, param(lin.lora_a), lin.in, 0.0, xa.data(), r);
    parallel_.tp->all_reduce_sum(xa.data(), N * r);  // x A^T over all input features
    if (tp_rank_ == 0)
      k.gemm(false, true, N, lin.out, r, lora_.scaling(), xa.data(), r, param(lin.lora_b), r, 1.0,
             y, H);
  }
  parallel_.tp->all_reduce_sum(y, N * H);
}

template <typename T>
void LlamaModel<T>::reduce_input_grad(T* dx, int64_t n) {
  if (tp_size_ > 1) parallel_.tp->all_reduce_sum(dx, n);
}


// ---- sequence parallelism: what crosses ranks ---------------------------------------------------
// Forward: the S sink rows of every sequence from sp rank 0 (broadcast) and the L-row memory
// entering the first local chunk from the previous rank (recv); the memory leaving the last local
// chunk goes to the next rank (send). Backward: the adjoints -- the memory gradient goes back
// (send <-> recv reversed) and the sink gradients of all ranks are summed on rank 0.

template <typename T>
void LlamaModel<T>::exchange_sinks_forward(T* kv_ext) {
  const int64_t width = rank_dims_.kv_width, S = freqkv_.sink;
  Communicator& sp = *parallel_.sp;
  if (sp.rank() == 0)  // rank 0 holds tokens 0..S-1 of every sequence
    for (int64_t b = 0; b < batch_; ++b)
      kernels_.copy_on_device(kv_ext + b * S * width, kv_ext + (sink_rows_ + b * shard_.tokens) * width,
                              static_cast<size_t>(S * width) * sizeof(T));
  sp.broadcast(kv_ext, sink_rows_ * width, 0);
}

template <typename T>
void LlamaModel<T>::exchange_sinks_backward(T* d_kv_ext) {
  const int64_t width = rank_dims_.kv_width, S = freqkv_.sink;
  Communicator& sp = *parallel_.sp;
  sp.reduce_sum_to(d_kv_ext, sink_rows_ * width, 0);
  if (sp.rank() == 0)
    for (int64_t b = 0; b < batch_; ++b)
      kernels_.axpy(d_kv_ext + (sink_rows_ + b * shard_.tokens) * width, 1.0,
                    d_kv_ext + b * S * width, S * width);
}

// The memory chain across sequence-parallel ranks. Over its chunks a rank maps the memory M_in
// entering its first chunk to the memory M_out it hands on as M_out = A M_in + b, where
// A = (P[:, 0:L])^k for its k compressions (freqkv_memory_transfer_matrix) and b is its chain run
// with M_in = 0. The forward computes b before M_in arrives, so on arrival one L x L product gives
// M_out, sent on at once; only then does the rank run its chain with the true M_in. Ranks wait on
// each other for one small GEMM each instead of for each other's whole chains of compressions.
// The backward is the adjoint: the true chain's adjoint gives what this rank's own attention asks
// of M_in; the gradient of M_out arriving from the next rank goes on as A^T times it (plus that),
// and is fed through the chain with zero memory entering (b's adjoint) into this rank's tokens.

template <typename T>
T* LlamaModel<T>::memory_in_rows(T* kv_rows, int64_t b) const {
  const int64_t width = rank_dims_.kv_width;
  return kv_rows + (b * shard_.kv_rows + shard_.memory_in_row) * width;
}

template <typename T>
void LlamaModel<T>::memory_chain_forward(T* kv_rows, int64_t l, bool replay) {
  const bool has_in = shard_.memory_in_row >= 0, has_out = shard_.memory_out_row >= 0;
  if (!has_in && !has_out) {
    apply_compressions(kv_rows, false);
    return;
  }
  const int64_t width = rank_dims_.kv_width;
  const int64_t L = freqkv_.compressed(), F = freqkv_.compressible();
  const size_t memory_bytes = static_cast<size_t>(L * width) * sizeof(T);
  Kernels<T>& k = kernels_;
  if (replay) {  // the memory received in the first run; nothing crosses ranks
    for (int64_t b = 0; has_in && b < batch_; ++b)
      k.copy_on_device(memory_in_rows(kv_rows, b), kept_memory_[l].data() + b * L * width,
                       memory_bytes);
    apply_compressions(kv_rows, false);
    return;
  }
  Communicator& sp = *parallel_.sp;
  T* m_in = memory_in_.data();
  T* m_out = memory_out_.data();
  if (has_out) {  // b: the chain with a zero memory entering it (the true chain on sp rank 0)
    for (int64_t b = 0; has_in && b < batch_; ++b) k.fill_zero(memory_in_rows(kv_rows, b), memory_bytes);
    apply_compressions(kv_rows, false);
    for (int64_t b = 0; b < batch_; ++b)
      k.freqkv_compress(m_out + b * L * width, width,
                        kv_rows + (b * shard_.kv_rows + shard_.memory_out_row) * width, width, F,
                        L, width);
  }
  if (has_in) {
    sp.recv(m_in, batch_ * L * width, sp.rank() - 1);
    for (int64_t b = 0; has_out && b < batch_; ++b)  // M_out = A M_in + b
      k.gemm(false, false, L, width, L, 1.0, memory_transfer_.data(), L, m_in + b * L * width,
             width, 1.0, m_out + b * L * width, width);
  }
  if (has_out) sp.send(m_out, batch_ * L * width, sp.rank() + 1);
  if (has_in) {  // this rank's own chain, with the memory that really enters it
    for (int64_t b = 0; b < batch_; ++b)
      k.copy_on_device(memory_in_rows(kv_rows, b), m_in + b * L * width, memory_bytes);
    if (recompute_ && prepared_training_)
      k.copy_on_device(kept_memory_[l].data(), m_in, batch_ * memory_bytes);
    apply_compressions(kv_rows, false);
  }
}

template <typename T>
void LlamaModel<T>::memory_chain_backward(T* d_kv_rows) {
  apply_compressions(d_kv_rows, true);  // the true chain: what this rank's attention asks
  const bool has_in = shard_.memory_in_row >= 0, has_out = shard_.memory_out_row >= 0;
  if (!has_in && !has_out) return;
  const int64_t width = rank_dims_.kv_width;
  const int64_t L = freqkv_.compressed(), F = freqkv_.compressible();
  const size_t memory_bytes = static_cast<size_t>(L * width) * sizeof(T);
  Kernels<T>& k = kernels_;
  Communicator& sp = *parallel_.sp;
  T* d_in = memory_in_.data();
  T* d_out = memory_out_.data();
  for (int64_t b = 0; has_in && b < batch_; ++b)
    k.copy_on_device(d_in + b * L * width, memory_in_rows(d_kv_rows, b), memory_bytes);
  if (has_out) sp.recv(d_out, batch_ * L * width, sp.rank() + 1);
  if (has_in) {
    for (int64_t b = 0; has_out && b < batch_; ++b)  // dM_in += A^T dM_out
      k.gemm(true, false, L, width, L, 1.0, memory_transfer_.data(), L, d_out + b * L * width,
             width, 1.0, d_in + b * L * width, width);
    sp.send(d_in, batch_ * L * width, sp.rank() - 1);
  }
  if (!has_out) return;
  // b's adjoint: dM_out through the chain with zero memory entering. The memory rows have passed
  // their gradients on already; cleared, they carry only this one.
  for (int64_t b = 0; b < batch_; ++b) {
    T* base = d_kv_rows + b * shard_.kv_rows * width;
    for (const FreqKVCompression& c : shard_.compressions)
      k.fill_zero(base + c.dst_row * width, static_cast<size_t>(c.n_dst * width) * sizeof(T));
    k.freqkv_compress_backward(base + shard_.memory_out_row * width, width, d_out + b * L * width,
                               width, F, L, width);
  }
  apply_compressions(d_kv_rows, true);
}

template <typename T>
void LlamaModel<T>::layer_forward(int64_t l, bool replay) {
  const ModelConfig& c = config_;
  const int64_t N = n_tokens_, H = c.hidden_size, I = rank_dims_.ffn, D = c.head_dim;
  const int64_t Hq = rank_dims_.heads, Hkv = rank_dims_.kv_heads;
  const int64_t q_width = rank_dims_.q_width, k_width = rank_dims_.k_width;
  const int64_t kv_width = rank_dims_.kv_width;
  const LayerParams& p = layers_[l];
  LayerActivations& a = activations(l);
  const T* x = residual_[l].data();
  T* out = residual_[l + 1].data();
  Kernels<T>& k = kernels_;

  // Attention block: q/k/v projections of the normalised input; K and V side by side per token.
  k.rmsnorm_forward(a.norm1.data(), a.rstd1.data(), x, param(p.input_norm), N, H, c.rms_norm_eps);
  linear_forward(p.linear[kQ], a.lora_xa[kQ], N, a.norm1.data(), H, a.q.data(), q_width, 0.0);
  T* kv = kv_ext_.data() + sink_rows_ * kv_width;  // this rank's tokens
  linear_forward(p.linear[kK], a.lora_xa[kK], N, a.norm1.data(), H, kv, kv_width, 0.0);
  linear_forward(p.linear[kV], a.lora_xa[kV], N, a.norm1.data(), H, kv + k_width, kv_width, 0.0);

  // FreqKV: lay out [sink ; memory ; chunk] rows, compress pre-RoPE keys and values chunk by
  // chunk, then rotate keys and queries with their cache-layout positions. Under sequence
  // parallelism the sinks come from the first rank and the first memory from the previous one.
  // A replay takes the received rows from what the first run kept.
  T* kv_rows = a.kv_rows.data();
  const bool keep = !replay && recompute_ && prepared_training_;
  const size_t sink_bytes = static_cast<size_t>(sink_rows_ * kv_width) * sizeof(T);
  if (shard_.receives_sinks) {
    if (replay) {
      k.copy_on_device(kv_ext_.data(), kept_sinks_[l].data(), sink_bytes);
    } else {
      exchange_sinks_forward(kv_ext_.data());
      if (keep) k.copy_on_device(kept_sinks_[l].data(), kv_ext_.data(), sink_bytes);
    }
  }
  k.gather_rows(kv_rows, kv_width, kv_ext_.data(), kv_width, kv_source_.data(), kv_rows_, kv_width);
  memory_chain_forward(kv_rows, l, replay);
  k.rope(kv_rows, kv_width, kv_rows, kv_width, kv_positions_.data(), kv_rows_, static_cast<int>(Hkv),
         static_cast<int>(D), c.rope_theta, false);
  k.rope(a.q.data(), q_width, a.q.data(), q_width, query_positions_.data(), N, static_cast<int>(Hq),
         static_cast<int>(D), c.rope_theta, false);
  const AttnShape shape{static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(D),
                        1.0 / std::sqrt(static_cast<double>(D))};
  k.attention_forward(a.att.data(), q_width, a.lse.data(), a.q.data(), q_width, kv_rows,
                      kv_rows + k_width, kv_width, blocks_, shape);
  row_parallel_forward(p.linear[kO], a.lora_xa[kO], N, a.att.data(), q_width, x, a.res_mid.data());

  // MLP block: down(silu(gate(x)) * up(x)).
  k.rmsnorm_forward(a.norm2.data(), a.rstd2.data(), a.res_mid.data(), param(p.post_norm), N, H,
                    c.rms_norm_eps);
  linear_forward(p.linear[kGate], a.lora_xa[kGate], N, a.norm2.data(), H, a.gate.data(), I, 0.0);
  linear_forward(p.linear[kUp], a.lora_xa[kUp], N, a.norm2.data(), H, a.up.data(), I, 0.0);
  k.swiglu_forward(a.swiglu.data(), a.gate.data(), a.up.data(), N * I);
  row_parallel_forward(p.linear[kDown], a.lora_xa[kDown], N, a.swiglu.data(), I, a.res_mid.data(),
                       out);
}

template <typename T>
LossSum LlamaModel<T>::forward(const int32_t* inputs, const int32_t* targets, int64_t batch,
                               int64_t seq_len, double grad_scale) {
  if (batch < 1 || seq_len < 1)
    throw std::invalid_argument("forward: batch and sequence length must be >= 1, got batch=" +
                                std::to_string(batch) + " seq_len=" + std::to_string(seq_len));
  const ModelConfig& c = config_;
  prepare(batch, seq_len, grad_scale != 0.0);
  const int64_t N = n_tokens_, V = c.vocab_size, H = c.hidden_size;
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
  Kernels<T>& k = kernels_;
  k.copy_to_device(inputs_.data(), inputs, static_cast<size_t>(N) * sizeof(int32_t));
  k.copy_to_device(targets_.data(), targets, static_cast<size_t>(N) * sizeof(int32_t));

  // embed_rows_ keeps each token's local row (tp > 1) for the embedding's backward.
  embedding_lookup(inputs, inputs_.data(), N, residual_[0].data(), embed_rows_);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) layer_forward(l);
  k.rmsnorm_forward(final_norm_.data(), final_rstd_.data(), residual_[c.num_hidden_layers].data(),
                    param(final_norm_index_), N, H, c.rms_norm_eps);

  // Fused classifier: logits, loss and (when training) their gradient, block by block.
  have_grad_state_ = grad_scale != 0.0;
  if (tp_size_ > 1) {
    for (int64_t r0 = 0; r0 < N; r0 += classifier_rows_)
      classifier_block_tp(r0, std::min(classifier_rows_, N - r0), grad_scale, targets, result);
    if (have_grad_state_) reduce_input_grad(d_final_norm_.data(), N * H);
    return result;
  }
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
      if (trainable(lm_head_index_))
        k.gemm(true, false, V, H, rows, 1.0, logits_.data(), V, x, H, 1.0, d_head, H);
    }
  }
  std::vector<Acc<T>> losses(static_cast<size_t>(N));
  k.copy_to_host(losses.data(), losses_.data(), static_cast<size_t>(N) * sizeof(Acc<T>));
  for (Acc<T> v : losses) result.sum += static_cast<double>(v);
  return result;
}

template <typename T>
void LlamaModel<T>::classifier_block_tp(int64_t r0, int64_t rows, double grad_scale,
                                        const int32_t* targets, LossSum& result) {
  // Vocabulary-parallel cross-entropy: each rank scores its vocabulary slice; the ranks' local
  // log-sum-exps and the owner's target logit make the loss, and the global log-sum-exp the
  // gradient of each slice. Only rows x (tp ranks) numbers cross ranks, never the logits.
  const int64_t H = config_.hidden_size, V = vocab_local_;
  Kernels<T>& k = kernels_;
  const T* x = final_norm_.data() + r0 * H;
  const T* head = param(lm_head_index_);
  k.gemm(false, true, rows, V, H, 1.0, x, H, head, H, 0.0, logits_.data(), V);
  Acc<T>* lse = tp_stats_.data();                         // [rows] local, then global
  Acc<T>* lse_all = tp_stats_.data() + classifier_rows_;  // [tp][rows]
  Acc<T>* target_logit = lse_all + classifier_rows_ * tp_size_;
  k.cross_entropy_stats(lse, target_logit, logits_.data(), V, targets_.data() + r0, rows, V,
                        vocab_begin_);
  parallel_.tp->all_gather(lse, lse_all, rows);
  parallel_.tp->all_reduce_sum(target_logit, rows);
  std::vector<Acc<T>> all(static_cast<size_t>(rows * tp_size_)), target(static_cast<size_t>(rows)),
      global(static_cast<size_t>(rows));
  k.copy_to_host(all.data(), lse_all, all.size() * sizeof(Acc<T>));
  k.copy_to_host(target.data(), target_logit, target.size() * sizeof(Acc<T>));
  for (int64_t n = 0; n < rows; ++n) {
    const double row_lse = combine_vocab_slices_lse(all.data(), rows, tp_size_, n);
    global[n] = static_cast<Acc<T>>(row_lse);
    if (targets[r0 + n] >= 0) result.sum += row_lse - static_cast<double>(target[n]);
  }
  if (grad_scale == 0.0) return;
  k.copy_to_device(lse, global.data(), global.size() * sizeof(Acc<T>));
  k.cross_entropy_grad(logits_.data(), V, lse, targets_.data() + r0, rows, V, vocab_begin_,
                       grad_scale);
  k.gemm(false, false, rows, H, V, 1.0, logits_.data(), V, head, H, 0.0,
         d_final_norm_.data() + r0 * H, H);
  if (trainable(lm_head_index_))
    k.gemm(true, false, V, H, rows, 1.0, logits_.data(), V, x, H, 1.0, grad(lm_head_index_), H);
}

template <typename T>
void LlamaModel<T>::layer_backward(int64_t l) {
  const ModelConfig& c = config_;
  const int64_t N = n_tokens_, H = c.hidden_size, I = rank_dims_.ffn, D = c.head_dim;
  const int64_t Hq = rank_dims_.heads, Hkv = rank_dims_.kv_heads;
  const int64_t q_width = rank_dims_.q_width, k_width = rank_dims_.k_width;
  const int64_t kv_width = rank_dims_.kv_width;
  const LayerParams& p = layers_[l];
  LayerActivations& a = activations(l);
  Kernels<T>& k = kernels_;
  T* d_res = d_residual_.data();  // enters as d(layer output), leaves as d(layer input)

  // MLP block (out = res_mid + down(swiglu)).
  linear_backward(p.linear[kDown], a.lora_xa[kDown], d_res, H, a.swiglu.data(), I,
                  d_swiglu_.data(), I, 0.0);
  k.swiglu_backward(d_gate_.data(), d_up_.data(), d_swiglu_.data(), a.gate.data(), a.up.data(),
                    N * I);
  linear_backward(p.linear[kGate], a.lora_xa[kGate], d_gate_.data(), I, a.norm2.data(), H,
                  d_norm_.data(), H, 0.0);
  linear_backward(p.linear[kUp], a.lora_xa[kUp], d_up_.data(), I, a.norm2.data(), H,
                  d_norm_.data(), H, 1.0);
  reduce_input_grad(d_norm_.data(), N * H);
  k.rmsnorm_backward(d_res, grad(p.post_norm), d_norm_.data(), a.res_mid.data(),
                     param(p.post_norm), a.rstd2.data(), N, H);

  // Attention block (res_mid = x + o_proj(attention)).
  linear_backward(p.linear[kO], a.lora_xa[kO], d_res, H, a.att.data(), q_width, d_att_.data(),
                  q_width, 0.0);
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
  memory_chain_backward(d_kv_rows);
  k.fill_zero(d_kv_ext_.data(), static_cast<size_t>((sink_rows_ + N) * kv_width) * sizeof(T));
  k.scatter_add_rows(d_kv_ext_.data(), kv_width, d_kv_rows, kv_width, kv_source_.data(), kv_rows_,
                     kv_width);
  if (shard_.receives_sinks) exchange_sinks_backward(d_kv_ext_.data());
  T* d_kv = d_kv_ext_.data() + sink_rows_ * kv_width;

  linear_backward(p.linear[kQ], a.lora_xa[kQ], d_q_.data(), q_width, a.norm1.data(), H,
                  d_norm_.data(), H, 0.0);
  linear_backward(p.linear[kK], a.lora_xa[kK], d_kv, kv_width, a.norm1.data(), H, d_norm_.data(),
                  H, 1.0);
  linear_backward(p.linear[kV], a.lora_xa[kV], d_kv + k_width, kv_width, a.norm1.data(), H,
                  d_norm_.data(), H, 1.0);
  reduce_input_grad(d_norm_.data(), N * H);
  k.rmsnorm_backward(d_res, grad(p.input_norm), d_norm_.data(), residual_[l].data(),
                     param(p.input_norm), a.rstd1.data(), N, H);
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
  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
    // The workspace still holds the top layer's activations from the forward.
    if (recompute_ && l != c.num_hidden_layers - 1) layer_forward(l, /*replay=*/true);
    layer_backward(l);
    report_grads_ready(layer_first_param_[l], layer_first_param_[l + 1]);
  }
  if (trainable(embed_index_)) {
    if (tp_size_ == 1)
      k.embedding_backward(grad(embed_index_), d_residual_.data(), inputs_.data(), N, H);
    else  // the rows this rank holds
      k.scatter_add_rows(grad(embed_index_), H, d_residual_.data(), H, embed_rows_.data(), N, H);
  }
  report_grads_ready(0, layer_first_param_.front());  // the embeddings
  report_grads_ready(layer_first_param_.back(), table_.size());  // final norm, LM head
  have_grad_state_ = false;
}

// ---- for inference (FreqKVDecoder) ----------------------------------------------------------

template <typename T>
int64_t LlamaModel<T>::release_grads() {
  const int64_t bytes = grads_.size() * static_cast<int64_t>(sizeof(T));
  grads_ = Buffer<T>();
  have_grad_state_ = false;
  return bytes;
}

template <typename T>
void LlamaModel<T>::embedding_lookup(const int32_t* tokens, const int32_t* tokens_dev,
                                     int64_t n_tokens, T* out, Buffer<int64_t>& row_map) {
  const int64_t H = config_.hidden_size;
  Kernels<T>& k = kernels_;
  if (tp_size_ == 1) {
    k.embedding_forward(out, param(embed_index_), tokens_dev, n_tokens, H);
    return;
  }
  // Vocabulary-parallel: each rank looks up the tokens it holds, the sum is the lookup.
  std::vector<int64_t> rows(static_cast<size_t>(n_tokens));
  for (int64_t n = 0; n < n_tokens; ++n) {
    const int64_t row = tokens[n] - vocab_begin_;
    rows[n] = row >= 0 && row < vocab_local_ ? row : -1;
  }
  if (row_map.size() != n_tokens) row_map = Buffer<int64_t>(kernels_, n_tokens);
  k.copy_to_device(row_map.data(), rows.data(), static_cast<size_t>(n_tokens) * sizeof(int64_t));
  k.fill_zero(out, static_cast<size_t>(n_tokens * H) * sizeof(T));
  k.gather_rows(out, H, param(embed_index_), H, row_map.data(), n_tokens, H);
  parallel_.tp->all_reduce_sum(out, n_tokens * H);
}

template <typename T>
void LlamaModel<T>::vocab_parallel_losses(T* logits, const int32_t* targets,
                                          const int32_t* targets_dev, int64_t rows,
                                          Acc<T>* stats, double* losses) {
  const int64_t V = vocab_local_;
  Kernels<T>& k = kernels_;
  std::vector<Acc<T>> host(static_cast<size_t>(rows * (tp_size_ + 1)));
  if (tp_size_ == 1) {
    k.cross_entropy(stats, logits, V, targets_dev, rows, V, 0.0);
    k.copy_to_host(host.data(), stats, static_cast<size_t>(rows) * sizeof(Acc<T>));
    for (int64_t n = 0; n < rows; ++n) losses[n] = static_cast<double>(host[n]);
    return;
  }
  // stats: [rows] local lse | [tp][rows] every rank's lse | [rows] target logit (summed).
  Acc<T>* lse = stats;
  Acc<T>* lse_all = stats + rows;
  Acc<T>* target_logit = lse_all + rows * tp_size_;
  k.cross_entropy_stats(lse, target_logit, logits, V, targets_dev, rows, V, vocab_begin_);
  parallel_.tp->all_gather(lse, lse_all, rows);
  parallel_.tp->all_reduce_sum(target_logit, rows);
  k.copy_to_host(host.data(), lse_all, host.size() * sizeof(Acc<T>));  // lse_all, target_logit
  const Acc<T>* target = host.data() + rows * tp_size_;
  for (int64_t n = 0; n < rows; ++n)
    losses[n] = targets[n] >= 0 ? combine_vocab_slices_lse(host.data(), rows, tp_size_, n) -
                                      static_cast<double>(target[n])
                                : 0.0;
}

template class LlamaModel<float>;
template class LlamaModel<double>;
template class LlamaModel<bf16>;  // the CUDA backend's

}  // namespace freqkv

