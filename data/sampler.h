// Training windows sampled from token files, reproducibly: the window of (step, index) is a pure
// function of (seed, step, index) — a counter-based hash, no RNG state — so a run resumed at step k
// sees exactly the data of a run that went straight through (the data cursor is just the step).
// Each shard may keep a tail (a fraction of its tokens) out of training; the validation windows
// come from those tails or from separate validation files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/token_file.h"

namespace freqkv {

// Where a window of window_tokens tokens lies: tokens [start, start + window_tokens) of shard.
struct WindowLocation {
  int64_t shard = 0;  // index into the sampler's shards
  int64_t start = 0;
};

// Fixed, non-overlapping windows for validation, the same on every call. Windows alternate
// between files (window 0 from file 0, window 1 from file 1, ...), so the first few windows cover
// every file.
class ValidationWindows {
 public:
  int64_t size() const { return static_cast<int64_t>(windows_.size()); }
  int64_t window_tokens() const { return window_tokens_; }  // seq_len + 1
  const std::vector<TokenFile>& files() const { return files_; }
  WindowLocation location(int64_t i) const;  // throws std::out_of_range outside [0, size())
  // Tokens of window i into out[0, seq_len + 1).
  void window(int64_t i, int32_t* out) const;

 private:
  friend class TokenSampler;
  std::vector<TokenFile> files_;
  int64_t window_tokens_ = 0;
  std::vector<WindowLocation> windows_;
};

class TokenSampler {
 public:
  // Samples windows of seq_len + 1 tokens from the first (1 - heldout_fraction) of every shard
  // (the held-out tail, floor(size * heldout_fraction) tokens, is never part of a training
  // window). Throws std::invalid_argument for no shards, seq_len < 1, a fraction outside [0, 1),
  // or a shard whose training part is shorter than seq_len + 1 tokens (naming it and the sizes).
  TokenSampler(std::vector<TokenFile> shards, int64_t seq_len, double heldout_fraction,
               uint64_t seed);

  // Opens the shards (TokenFile::open errors propagate) and builds the sampler.
  static TokenSampler open(const std::vector<std::string>& paths, TokenDType dtype,
                           int64_t seq_len, double heldout_fraction, uint64_t seed);

  // Validation windows over whole files (data.validation.files). Throws std::invalid_argument for
  // no files or a file shorter than seq_len + 1 tokens.
  static ValidationWindows validation(const std::vector<TokenFile>& files, int64_t seq_len);
  // Validation windows over the held-out tails of this sampler's shards. A tail shorter than one
  // window gives none; throws std::invalid_argument when no tail holds a window (or the fraction
  // is 0), with the tail sizes.
  ValidationWindows validation() const;

  // The sequence `index` of optimizer step `step` (index counts the sequences of the whole step:
  // all micro-batches and data-parallel ranks, so the data does not depend on how the step is
  // split): seq_len + 1 tokens into out. Shards are chosen in proportion to their number of
  // valid window starts, and the start uniformly among them. Throws std::invalid_argument for a
  // negative step or index.
  void sample(int64_t step, int64_t index, int32_t* out_seq_len_plus_1) const;
  // Where sample(step, index) reads from.
  WindowLocation locate(int64_t step, int64_t index) const;

  int64_t seq_len() const { return seq_len_; }
  uint64_t seed() const { return seed_; }
  const std::vector<TokenFile>& shards() const { return shards_; }
  // Tokens [0, train_end(s)) of shard s are sampled for training; [train_end(s), size) held out.
  int64_t train_end(int64_t shard) const { return train_ends_.at(static_cast<size_t>(shard)); }
  // Valid window starts over all shards (sum over shards of train_end - seq_len).
  int64_t window_count() const { return window_offsets_.back(); }

 private:
  std::vector<TokenFile> shards_;
  int64_t seq_len_ = 0;
  double heldout_fraction_ = 0.0;
  uint64_t seed_ = 0;
  std::vector<int64_t> train_ends_;
  std::vector<int64_t> window_offsets_;  // prefix sums of window starts: shard s owns
                                         // [window_offsets_[s], window_offsets_[s + 1])
};

}  // namespace freqkv
