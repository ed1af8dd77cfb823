// A LLaMA-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with FreqKV attention,
// its forward and backward written out layer by layer against the Kernels<T> interface.
//
// One training step is forward() then backward(): forward keeps what backward needs and, fused
// with the classifier as llm.c does, already turns the logits into their gradient block by block,
// so the whole [tokens x vocab] logits never exist at once. Gradients accumulate (+=) into the
// gradient arena until zero_grads().
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <vector>

#include "comm/communicator.h"
#include "kernels/kernels.h"
#include "model/freqkv_schedule.h"
#include "model/model_config.h"
#include "model/param_table.h"

namespace freqkv {

struct LossSum {
  double sum = 0;     // sum of the per-token losses
  int64_t count = 0;  // tokens with a target (targets < 0 are ignored)
};

// The groups a model shards itself over (nullptr: not parallel in that dimension).
//   tp: Megatron-style tensor parallelism -- heads and FFN columns split (q/k/v, gate/up are
//       column-parallel, o/down row-parallel), vocabulary-parallel embedding, LM head and
//       cross-entropy; each rank holds its shard of those weights (the table's ShardKind).
//   sp: the FreqKV chunks of each sequence are split among the ranks (see SequenceShard).
struct ModelParallel {
  Communicator* tp = nullptr;
  Communicator* sp = nullptr;
};

// This rank's share of every sequence under sequence parallelism (all of it with sp = 1): whole
// chunks, so that only the sink rows and the one memory entering the first chunk come from other
// ranks -- per layer L + S rows of keys/values, whatever the sequence length.
struct SequenceShard {
  int64_t chunk_begin = 0, chunk_end = 0;  // chunks [begin, end) of the schedule
  int64_t token_begin = 0, tokens = 0;     // tokens [begin, begin + tokens) of each sequence
  int64_t kv_begin = 0, kv_rows = 0;       // rows of the schedule's kv buffer held here
  int64_t memory_in_row = -1;   // local kv row of the memory received from the previous rank
  int64_t memory_out_row = -1;  // local kv row the compression for the next rank reads from
  std::vector<FreqKVCompression> compressions;  // those inside the shard, local rows
  bool receives_sinks = false;  // sink rows come from sp rank 0 (sp > 1, S > 0, > 1 chunk)
};

template <typename T>
class LlamaModel {
 public:
  LlamaModel(const ModelConfig& config, const FreqKVConfig& freqkv, Kernels<T>& kernels,
             const LoraConfig& lora = LoraConfig(), const ModelParallel& parallel = {});

  const ModelConfig& config() const { return config_; }
  const FreqKVConfig& freqkv_config() const { return freqkv_; }
  const LoraConfig& lora_config() const { return lora_; }
  const ParamTable& param_table() const { return table_; }
  Kernels<T>& kernels() { return kernels_; }
  Communicator* tp_group() const { return parallel_.tp; }

  // The arenas: this rank's shard of every parameter (and of its gradient), one after another.
  T* params() { return params_.data(); }
  T* grads() { return grads_.data(); }
  int64_t arena_numel() const { return params_.size(); }
  T* param(size_t i) { return params_.data() + local_[i].offset; }
  T* grad(size_t i) { return grads_.data() + local_[i].offset; }
  // This rank's shard of parameter i (the whole tensor unless tensor parallelism splits it).
  int64_t local_numel(size_t i) const { return local_[i].numel; }
  const std::vector<int64_t>& local_shape(size_t i) const { return local_[i].shape; }
  bool sharded(size_t i) const { return local_[i].split_dim >= 0; }
  int split_dim(size_t i) const { return local_[i].split_dim; }  // -1: whole on every rank

  // Host copies of one parameter or gradient in its logical (unsharded) shape, row-major. With
  // tensor parallelism set_param keeps this rank's slice, and the getters gather the shards:
  // a collective of the tp group (every rank of it calls them together).
  void set_param(size_t i, const float* host);
  void set_param(size_t i, const double* host);
  std::vector<float> get_param(size_t i);
  std::vector<float> get_grad(size_t i);
  std::vector<double> get_grad_f64(size_t i);
  // The same for this rank's shard only (no communication).
  void set_param_local(size_t i, const float* host);
  std::vector<float> get_param_local(size_t i);
  // Logical <-> shard for any per-parameter host array (optimiser states): gather is a
  // collective of the tp group.
  std::vector<float> gather_logical(size_t i, const std::vector<float>& local);
  template <typename U>
  std::vector<U> slice_local(size_t i, const U* logical) const;

  // Random initialisation: N(0, std) for matrices, ones for norm weights, LoRA as init_lora;
  // deterministic in seed.
  void init_random(uint64_t seed, double std = 0.02);
  // LoRA factors only, as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0 (the adapted model
  // starts equal to the base model).
  void init_lora(uint64_t seed);
  void zero_grads();

  // Frozen parameters get no weight gradient (their GEMMs are skipped); all start trainable.
  void set_trainable(size_t i, bool trainable) { trainable_[i] = trainable; }
  bool trainable(size_t i) const { return trainable_[i] != 0; }

  // The tokens [begin, begin + count) of each sequence of seq_len that this rank processes
  // (everything without sequence parallelism).
  SequenceShard sequence_shard(int64_t seq_len) const;

  // Runs B sequences of T tokens (host arrays of B*T ids; targets < 0 are not scored). Under
  // sequence parallelism each rank passes only its shard's tokens of each sequence
  // (B * sequence_shard(T).tokens ids) and gets the losses of those; T is the full length.
  // With grad_scale != 0 it keeps the activations for backward() and prepares the gradient of
  // grad_scale * (sum of losses) -- the fused classifier already adds the LM head's share to its
  // gradient here; with grad_scale == 0 it only evaluates.
  LossSum forward(const int32_t* inputs, const int32_t* targets, int64_t batch, int64_t seq_len,
                  double grad_scale);
  // Accumulates the gradient of the last forward (which must have had grad_scale != 0).
  void backward();

  // Rows of logits computed at once by the fused classifier (bounds its scratch memory).
  void set_classifier_block_rows(int64_t rows) { classifier_rows_ = rows; }

  // Activation recomputation per layer (Megatron's full recompute, llm.c's -r): forward keeps
  // only each layer's input (and the few rows sequence parallelism received for it); backward
  // runs the layer's forward again into one shared workspace just before the layer's backward.
  // Costs one more forward of every layer (about a third more compute); saves the activations of
  // all layers but one. Gradients are those of the plain path (the same kernels on the same
  // inputs). Tensor-parallel all-reduces inside the layer run again; sequence-parallel transfers
  // do not (their rows are kept).
  void set_recompute(bool on);
  bool recompute() const { return recompute_; }

  // Called during backward() with disjoint ranges [offset, offset + count) of the gradient arena
  // as soon as their gradients are final for this backward: a layer's trainable parameters right
  // after its backward, the rest (embeddings, final norm, LM head) at the end. Together the calls
  // cover every trainable parameter once; frozen parameters are never reported. The trainer
  // starts the data-parallel reduction of each range here, overlapping it with the backward of
  // the layers below. No hook (the default): nothing is called.
  using GradReadyHook = std::function<void(int64_t offset, int64_t count)>;
  void set_grad_ready_hook(GradReadyHook hook) { grad_ready_hook_ = std::move(hook); }

  // ---- for inference (FreqKVDecoder runs the layers itself, with its cache-aware attention,
  // but through this model's projections, tp collectives, embedding and classifier statistics;
  // it is a friend for linear_forward, row_parallel_forward and the layer parameters) ----------
  template <typename U>
  friend class FreqKVDecoder;
  // Frees the gradient arena, which only training uses (as much memory as the weights). After
  // it, gradients are gone for good: backward(), forward() with grad_scale != 0, zero_grads()
  // and grad()/grads() must not be used. Returns the bytes freed.
  int64_t release_grads();
  // out[n, :] = the embedding of tokens[n] for n < n_tokens (tokens: host ids, tokens_dev: the
  // same ids on the device). Vocabulary-parallel under tp: each rank gathers the rows of its
  // vocabulary slice (row_map, device scratch resized to n_tokens, is left holding each token's
  // local row or -1), zeros the others, and an all-reduce over tp sums the ranks' lookups. A
  // collective of the tp group.
  void embedding_lookup(const int32_t* tokens, const int32_t* tokens_dev, int64_t n_tokens,
                        T* out, Buffer<int64_t>& row_map);
  // This rank's vocabulary slice of the LM head: logits of ids [vocab_begin(), + vocab_local()).
  int64_t vocab_begin() const { return vocab_begin_; }
  int64_t vocab_local() const { return vocab_local_; }
  // losses[n] = -log softmax(logits of row n over the whole vocabulary)[targets[n]] (0 where
  // targets[n] < 0) for `rows` rows of this rank's logits slice (row stride vocab_local();
  // targets: host ids, targets_dev: the same on the device). Under tp the ranks' log-sum-exps
  // and the owner's target logit are combined (cross_entropy_stats, then an all-gather and an
  // all-reduce of `rows` numbers each): the full logits are never gathered. stats: device
  // scratch of at least rows * (tp + 2) elements. The logits may be overwritten. A collective
  // of the tp group.
  void vocab_parallel_losses(T* logits, const int32_t* targets, const int32_t* targets_dev,
                             int64_t rows, Acc<T>* stats, double* losses);

 private:
  // One projection y = x W^T (+ LoRA), by parameter indices (-1: no adapter).
  enum LinearId { kQ, kK, kV, kO, kGate, kUp, kDown, kLinearCount };
  struct Linear {
    int64_t weight = -1, lora_a = -1, lora_b = -1;
    int64_t in = 0, out = 0;
  };
  struct LayerParams {
    int64_t input_norm = -1, post_norm = -1;
    std::array<Linear, kLinearCount> linear;
  };
  struct LayerActivations {
    Buffer<T> norm1, q, kv_rows, att, res_mid, norm2, gate, up, swiglu;
    Buffer<Acc<T>> rstd1, lse, rstd2;
    std::array<Buffer<T>, kLinearCount> lora_xa;  // x A^T of each adapted projection
  };

  // y = beta * y + x W^T (+ scaling * (x A^T) B^T, keeping x A^T in xa), for `rows` rows of x.
  void linear_forward(const Linear& lin, Buffer<T>& xa, int64_t rows, const T* x, int64_t ld_x,
                      T* y, int64_t ld_y, double beta);
  // dx = dx_beta * dx + dy W (+ the adapter's share); weight gradients += for trainable ones.
  void linear_backward(const Linear& lin, const Buffer<T>& xa, const T* dy, int64_t ld_dy,
                       const T* x, int64_t ld_x, T* dx, int64_t ld_dx, double dx_beta);
  // Row-parallel output: y = residual + x W^T summed over the tp ranks (Megatron's g: all-reduce
  // forward, identity backward).
  void row_parallel_forward(const Linear& lin, Buffer<T>& xa, int64_t rows, const T* x,
                            int64_t ld_x, const T* residual, T* y);
  // Column-parallel inputs: the input gradient is summed over the tp ranks (Megatron's f:
  // identity forward, all-reduce backward).
  void reduce_input_grad(T* dx, int64_t n);
  void classifier_block_tp(int64_t r0, int64_t rows, double grad_scale, const int32_t* targets,
                           LossSum& result);
  template <typename U>
  std::vector<U> to_logical(size_t i, const std::vector<U>& gathered) const;
  // Allocates activations and the schedule; per-layer activations only when `keep_per_layer`
  // (training without recomputation), else one workspace shared by all layers.
  void prepare(int64_t batch, int64_t seq_len, bool keep_per_layer);
  // The activations layer l writes: its own, or the shared workspace.
  LayerActivations& activations(int64_t l) { return acts_[acts_.size() == 1 ? 0 : l]; }
  // replay: the recomputation in backward (sequence-parallel rows come from what the first run
  // kept, nothing is sent or received).
  void layer_forward(int64_t l, bool replay = false);
  void layer_backward(int64_t l);
  // Reports the trainable parameters among table indices [first, last) to the hook, as
  // contiguous arena ranges.
  void report_grads_ready(size_t first, size_t last);
  void apply_compressions(T* kv_rows, bool backward);
  // Sequence parallelism: fill the sink rows from sp rank 0 (forward); return their gradients.
  void exchange_sinks_forward(T* kv_ext);
  void exchange_sinks_backward(T* d_kv_ext);
  // The compressions of layer l's kv rows, with the memory entering this rank's first chunk
  // received and the one leaving its last chunk sent on (see llama_model.cpp); a replay uses the
  // kept memory and sends nothing. Backward: their adjoint.
  void memory_chain_forward(T* kv_rows, int64_t l, bool replay);
  void memory_chain_backward(T* d_kv_rows);
  T* memory_in_rows(T* kv_rows, int64_t b) const;  // sequence b's rows of the entering memory

  ModelConfig config_;
  FreqKVConfig freqkv_;
  LoraConfig lora_;
  ModelParallel parallel_;
  Kernels<T>& kernels_;
  ParamTable table_;
  std::vector<LayerParams> layers_;
  std::vector<char> trainable_;
  struct LocalParam {
    std::vector<int64_t> shape;
    int64_t offset = 0, numel = 0;
    int split_dim = -1;  // the dimension tensor parallelism splits, -1: whole on every rank
  };
  std::vector<LocalParam> local_;
  int tp_rank_ = 0, tp_size_ = 1;
  int64_t vocab_begin_ = 0, vocab_local_ = 0;  // this rank's rows of embeddings and LM head
  // This rank's share of a layer (all of it without tensor parallelism): query heads, kv heads,
  // FFN columns, and the widths of q, of k, and of K and V side by side in the kv rows.
  struct RankDims {
    int64_t heads = 0, kv_heads = 0, ffn = 0, q_width = 0, k_width = 0, kv_width = 0;
  };
  RankDims rank_dims_;
  std::vector<int64_t> column_lora_a_;  // LoRA A of column-parallel layers: gradient summed over tp
  Buffer<int64_t> embed_rows_;          // vocabulary-parallel lookup: local row per token or -1
  Buffer<T> params_, grads_;
  int64_t embed_index_ = 0, final_norm_index_ = 0, lm_head_index_ = 0;
  int64_t classifier_rows_ = 1024;
  bool recompute_ = false;
  GradReadyHook grad_ready_hook_;
  std::vector<size_t> layer_first_param_;  // table index of each layer's first parameter, + end

  // Shape of the current activations.
  int64_t batch_ = 0, seq_len_ = 0, n_tokens_ = 0, kv_rows_ = 0;  // kv_rows_: all sequences
  bool have_grad_state_ = false;
  FreqKVSchedule schedule_;
  SequenceShard shard_;
  int64_t sink_rows_ = 0;  // rows of received sinks before the tokens in kv_ext_ (all sequences)
  std::vector<AttnBlock> blocks_;
  Buffer<int64_t> kv_source_;
  Buffer<int32_t> kv_positions_, query_positions_, inputs_, targets_;

  // Activations: the residual stream before each layer and after the last, per-layer saves.
  std::vector<Buffer<T>> residual_;
  std::vector<LayerActivations> acts_;  // one per layer, or one shared workspace
  bool prepared_training_ = false;  // the activations are laid out for a backward
  // With recomputation under sequence parallelism: per layer, the sink rows and the memory this
  // rank received in the first run, replayed without communication.
  std::vector<Buffer<T>> kept_sinks_, kept_memory_;
  Buffer<T> final_norm_, logits_, kv_ext_;
  // Sequence parallelism: the memory entering / leaving this rank (or their gradients), and
  // A = (P[:, 0:L])^k of the rank's k compressions, present when it both receives and sends.
  Buffer<T> memory_in_, memory_out_, memory_transfer_;
  Buffer<Acc<T>> final_rstd_, losses_, tp_stats_;
  // Backward scratch.
  Buffer<T> d_residual_, d_final_norm_, d_norm_, d_q_, d_kv_rows_, d_kv_ext_, d_att_, d_swiglu_,
      d_gate_, d_up_, d_lora_xa_;
};

}  // namespace freqkv
