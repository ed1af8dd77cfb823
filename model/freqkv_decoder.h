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
// Single rank only: a model built with tensor or sequence parallelism is refused.
#pragma once

#include <array>
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
  // Bytes of the cache as allocated now (all layers): the fixed 3·C rows with FreqKV, the
  // current capacity (which doubles as the sequence grows) without.
  int64_t cache_bytes() const;

 private:
  enum LinearId { kQ, kK, kV, kO, kGate, kUp, kDown, kLinearCount };
  struct Linear {
    int64_t weight = -1, lora_a = -1, lora_b = -1;  // parameter indices (-1: no adapter)
    int64_t in = 0, out = 0;
  };
  struct LayerWeights {
    int64_t input_norm = -1, post_norm = -1;
    std::array<Linear, kLinearCount> linear;
  };
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
  void compress_cache();                // rows [S, C) -> L rows, per layer
  void ensure_capacity(int64_t rows);   // without FreqKV: grow the cache geometrically
  void ensure_scratch(int64_t n);
  // y = beta * y + x W^T (+ LoRA), for n rows.
  void linear(const Linear& lin, const T* x, int64_t ld_x, T* y, int64_t ld_y, double beta,
              int64_t n);
  std::vector<float> logits_to_host();

  LlamaModel<T>& model_;
  Kernels<T>& kernels_;
  ModelConfig config_;
  FreqKVConfig freqkv_;
  double lora_scaling_ = 0;
  int64_t lora_rank_ = 0;
  int64_t max_chunk_tokens_;
  int64_t embed_index_ = -1, final_norm_index_ = -1, lm_head_index_ = -1;
  std::vector<LayerWeights> layers_;
  int64_t q_width_ = 0, kv_width_ = 0;  // Hq·D and Hkv·D (one of K or V)

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
  Buffer<T> hidden_, normed_, q_, att_, gate_, up_, swiglu_, lora_xa_;
  Buffer<Acc<T>> rstd_, lse_;
  Buffer<int32_t> tokens_dev_, targets_dev_, positions_dev_;
  // The classifier, in blocks of rows.
  static constexpr int64_t kClassifierRows = 128;
  Buffer<T> logits_;
  Buffer<Acc<T>> losses_dev_;
};

}  // namespace freqkv
