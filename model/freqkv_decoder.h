// Incremental decoding with the FreqKV cache (../shared/docs/FREQKV.md, "Generation"): the
// schedule of training, token by token or chunk by chunk, over the weights of a LlamaModel.
//
// Per layer the cache holds at most C rows of PRE-RoPE keys and of values. Tokens are appended
// until the cache holds C rows; before the next token is appended, rows [S, C) are compressed to
// L rows (kernels.freqkv_compress, the P_{F->L} of training) and appending continues. So the
// cache after t tokens has exactly the rows training's chunk holding token t attends over
// ([sink ; memory ; chunk], chunk 0: its tokens alone), and the rows' RoPE positions are their
// row indices, as in training: keys are rotated with their cache-row positions when attending and
// a new token's query with its own row. The logits at every position therefore equal those of
// LlamaModel::forward over the whole sequence (tests/test_decoder.cpp checks this in double).
//
// Rotated keys are kept beside the pre-RoPE ones (a row's position never changes while it stays
// in the cache: sink rows keep 0..S-1, memory rows are re-rotated once after each compression,
// new rows are rotated when appended), so per layer the cache costs 3·C·(Hkv·D) elements: keys,
// rotated keys and values. With FreqKV disabled the cache is plain causal attention's: it grows
// by one row per token without bound (memory grows linearly with the sequence; only the rotated
// keys and the values are kept, 2 rows of Hkv·D per token and layer).
//
// Work is done in chunks of new tokens (a whole prompt at once in prefill, one token in step):
// every chunk is one pass through the layers with GEMMs over its rows and one attention block
// whose n_q new queries see the n_kv cache rows bottom-right causally. A prompt is cut at every
// point where the cache is full (where training's chunks end), and into pieces of at most
// max_chunk_tokens rows to bound the scratch memory; either cut leaves the result exact.
//
// Tensor parallelism (a model built with ModelParallel::tp over tp ranks; every rank of the group
// makes the same calls): each rank holds the cache of its Hkv/tp key/value heads and attends with
// its Hq/tp query heads; q/k/v and gate/up are column-parallel on its shard, o and down
// row-parallel followed by the tp all-reduce, the embedding vocabulary-parallel. prefill/step
// all-gather the logits slices, so every rank returns all vocab_size logits; score() combines the
// ranks' log-sum-exps and never gathers the logits. The layer math is LlamaModel's own
// (linear_forward with LoRA, row_parallel_forward, embedding_lookup, vocab_parallel_losses): only
// the cache-aware attention is the decoder's. Sequence parallelism is refused: it splits a
// sequence's chunks over ranks, and a decoder holds one cache and appends one chunk at a time.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/kernels.h"
#include "model/llama_model.h"

namespace freqkv {

template <typename T>
class FreqKVDecoder {
 public:
  // Decodes with the model's FreqKV settings (model.freqkv_config()).
  explicit FreqKVDecoder(LlamaModel<T>& model);
  // Decodes with `freqkv` (validated when enabled), whatever the model was built with: only its
  // weights are used. The model must outlive the decoder; its weights are read, never copied, so
  // a later change of them shows in the next call (reset() then, or the cache mixes both).
  FreqKVDecoder(LlamaModel<T>& model, const FreqKVConfig& freqkv,
                int64_t max_chunk_tokens = 1024);

  // Empties the cache: the next token is position 0 of a new sequence.
  void reset();
  // Appends the tokens of a prompt and returns the next-token logits after the last of them
  // (vocab_size floats). Continues the current sequence (reset() first for a new one). Throws
  // std::invalid_argument for an empty prompt and std::out_of_range for a token outside the
  // vocabulary, naming its index.
  std::vector<float> prefill(const std::vector<int32_t>& tokens);
  // Appends one token and returns its next-token logits.
  std::vector<float> step(int32_t token);
  // Appends tokens and returns, for each, -log p(targets[i] | the sequence up to tokens[i]): the
  // per-position losses of LlamaModel::forward, without its sums. Positions with targets[i] < 0
  // are not scored (loss 0, and their rows skip the LM head). Sizes must match.
  std::vector<double> score(const std::vector<int32_t>& tokens,
                            const std::vector<int32_t>& targets);
  // The logits of the last prefill/step in double (exact comparisons in tests; T = double keeps
  // every digit).
  std::vector<double> last_logits_double();

  int64_t cache_rows() const { return rows_; }             // <= C with FreqKV
  int64_t peak_cache_rows() const { return peak_rows_; }   // the most since reset()
  int64_t tokens_seen() const { return tokens_seen_; }     // since reset()
  int64_t compressions() const { return compressions_; }  // since reset()
  const FreqKVConfig& freqkv_config() const { return freqkv_; }
  // Bytes of the cache as allocated now (all layers, this rank's heads): the fixed 3·C rows with
  // FreqKV, the current capacity (which doubles as the sequence grows) without.
  int64_t cache_bytes() const;
  // Under tensor parallelism: the token of tp rank 0, on every rank. Generation samples on every
  // rank from identical logits, and appends rank 0's choice everywhere so that the ranks' caches
  // can never diverge (one broadcast of one id per token). Without: `token`.
  int32_t agree_on_token(int32_t token);
  int tp_size() const { return tp_size_; }

 private:
  struct LayerCache {
    Buffer<T> keys;          // pre-RoPE keys [capacity, Hkv·D] (FreqKV only: compression input)
    Buffer<T> rotated_keys;  // keys rotated with their row positions [capacity, Hkv·D]
    Buffer<T> values;        // [capacity, Hkv·D]
  };

  // Appends tokens [0, n) of `tokens` through every cut; targets (may be null) select rows to
  // score into losses; the logits after the last token are kept in logits_.
  void append(const int32_t* tokens, const int32_t* targets, int64_t n, double* losses);
  // One pass of n new tokens that fit in the cache without a compression.
  void run_chunk(const int32_t* tokens, const int32_t* targets, int64_t n, double* losses,
                 bool keep_last_logits);
  void run_layer(size_t l, int64_t n);  // hidden_ (x) -> hidden_, through mid_
  void score_rows(const int32_t* targets, int64_t n, double* losses);
  void last_row_logits(int64_t n);    // -> logits_ (the whole vocabulary, on every rank)
  void compress_cache();                // rows [S, C) -> L rows, per layer
  void ensure_capacity(int64_t rows);   // without FreqKV: grow the cache geometrically
  void ensure_scratch(int64_t n);
  std::vector<float> logits_to_host();

  LlamaModel<T>& model_;
  Kernels<T>& kernels_;
  ModelConfig config_;
  FreqKVConfig freqkv_;
  int64_t max_chunk_tokens_;
  Communicator* tp_ = nullptr;  // the model's tp group (nullptr: one rank)
  int tp_size_ = 1;
  // This rank's share: Hq/tp and Hkv/tp heads, I/tp FFN columns, V/tp vocabulary rows.
  int64_t q_heads_ = 0, kv_heads_ = 0, ffn_width_ = 0, vocab_local_ = 0;
  int64_t q_width_ = 0, kv_width_ = 0;  // q_heads·D and kv_heads·D (one of K or V)

  std::vector<LayerCache> cache_;
  int64_t capacity_ = 0;  // rows allocated per layer
  int64_t rows_ = 0;      // rows in use
  int64_t peak_rows_ = 0;
  int64_t tokens_seen_ = 0, compressions_ = 0;
  Buffer<T> compressed_;                  // L rows of one compression's output
  Buffer<int32_t> memory_positions_;      // S .. S+L-1: the memory rows' RoPE positions
  bool have_logits_ = false;

  // Scratch of one chunk (sized for the largest chunk so far).
  int64_t scratch_rows_ = 0;
  Buffer<T> hidden_, mid_, normed_, q_, att_, gate_, up_, swiglu_, lora_xa_;
  Buffer<Acc<T>> rstd_, lse_;
  Buffer<int32_t> tokens_dev_, targets_dev_, positions_dev_;
  Buffer<int64_t> embed_rows_;  // vocabulary-parallel lookup: each token's local row or -1
  Buffer<int32_t> token_dev_;   // agree_on_token's one id
  // The classifier, in blocks of rows of this rank's vocabulary slice.
  static constexpr int64_t kClassifierRows = 128;
  Buffer<T> local_logits_;     // [kClassifierRows, V/tp]
  Buffer<T> logits_;           // [V]: the last prefill/step's logits, gathered over tp
  Buffer<Acc<T>> loss_stats_;  // vocab_parallel_losses' scratch
};

}  // namespace freqkv
