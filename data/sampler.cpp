#include "data/sampler.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace freqkv {

namespace {

// splitmix64's finaliser: a bijection on 64 bits whose outputs pass BigCrush for counter inputs.
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// One 64-bit draw per (seed, step, index); chaining the mix keeps (step, index) and
// (index, step) apart.
uint64_t window_hash(uint64_t seed, int64_t step, int64_t index) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<uint64_t>(step));
  return splitmix64(h ^ static_cast<uint64_t>(index));
}

// The held-out tail of a shard of `tokens` tokens.
int64_t heldout_tokens(int64_t tokens, double fraction) {
  return static_cast<int64_t>(std::floor(static_cast<double>(tokens) * fraction));
}

void require_seq_len(int64_t seq_len, const char* who) {
  if (seq_len < 1) {
    throw std::invalid_argument(std::string(who) + ": seq_len must be >= 1, got " +
                                std::to_string(seq_len));
  }
}

// Non-overlapping windows of window_tokens tokens in [begin_s, end_s) of each file, taken in
// turn from each file.
std::vector<WindowLocation> interleaved_windows(const std::vector<int64_t>& begins,
                                                const std::vector<int64_t>& ends,
                                                int64_t window_tokens) {
  std::vector<int64_t> counts(begins.size());
  int64_t most = 0;
  for (size_t s = 0; s < begins.size(); ++s) {
    counts[s] = (ends[s] - begins[s]) / window_tokens;
    most = std::max(most, counts[s]);
  }
  std::vector<WindowLocation> windows;
  for (int64_t k = 0; k < most; ++k) {
    for (size_t s = 0; s < begins.size(); ++s) {
      if (k < counts[s]) {
        windows.push_back({static_cast<int64_t>(s), begins[s] + k * window_tokens});
      }
    }
  }
  return windows;
}

}  // namespace

WindowLocation ValidationWindows::location(int64_t i) const {
  if (i < 0 || i >= size()) {
    throw std::out_of_range("validation window " + std::to_string(i) + " out of range; there are " +
                            std::to_string(size()));
  }
  return windows_[static_cast<size_t>(i)];
}

void ValidationWindows::window(int64_t i, int32_t* out) const {
  const WindowLocation where = location(i);
  files_[static_cast<size_t>(where.shard)].read(where.start, window_tokens_, out);
}

TokenSampler::TokenSampler(std::vector<TokenFile> shards, int64_t seq_len,
                           double heldout_fraction, uint64_t seed)
    : shards_(std::move(shards)),
      seq_len_(seq_len),
      heldout_fraction_(heldout_fraction),
      seed_(seed) {
  require_seq_len(seq_len, "TokenSampler");
  if (shards_.empty()) {
    throw std::invalid_argument("TokenSampler: no token files to sample from");
  }
  if (!(heldout_fraction >= 0.0 && heldout_fraction < 1.0)) {
    std::ostringstream message;
    message << "TokenSampler: the held-out fraction must be in [0, 1), got " << heldout_fraction;
    throw std::invalid_argument(message.str());
  }
  const int64_t window_tokens = seq_len + 1;
  window_offsets_.push_back(0);
  for (const TokenFile& shard : shards_) {
    const int64_t held = heldout_tokens(shard.size(), heldout_fraction);
    const int64_t train_end = shard.size() - held;
    if (train_end < window_tokens) {
      std::string message = "token file '" + shard.path() + "' holds " +
                            std::to_string(shard.size()) + " tokens";
      if (held > 0) {
        std::ostringstream fraction;
        fraction << heldout_fraction;
        message += "; holding out " + std::to_string(held) + " (fraction " + fraction.str() +
                   ") leaves " + std::to_string(train_end) + " for training";
      }
      throw std::invalid_argument(message + ", fewer than one window of seq_len + 1 = " +
                                  std::to_string(window_tokens) + " tokens" +
                                  (held > 0 ? "; lower the fraction, " : "; ") +
                                  "use a shorter seq_len or drop the file");
    }
    train_ends_.push_back(train_end);
    window_offsets_.push_back(window_offsets_.back() + train_end - seq_len);
  }
}

TokenSampler TokenSampler::open(const std::vector<std::string>& paths, TokenDType dtype,
                                int64_t seq_len, double heldout_fraction, uint64_t seed) {
  std::vector<TokenFile> shards;
  shards.reserve(paths.size());
  for (const std::string& path : paths) shards.push_back(TokenFile::open(path, dtype));
  return TokenSampler(std::move(shards), seq_len, heldout_fraction, seed);
}

ValidationWindows TokenSampler::validation(const std::vector<TokenFile>& files, int64_t seq_len) {
  require_seq_len(seq_len, "validation windows");
  if (files.empty()) {
    throw std::invalid_argument("validation windows: no validation token files given");
  }
  const int64_t window_tokens = seq_len + 1;
  std::vector<int64_t> begins, ends;
  for (const TokenFile& file : files) {
    if (file.size() < window_tokens) {
      throw std::invalid_argument("validation token file '" + file.path() + "' holds " +
                                  std::to_string(file.size()) +
                                  " tokens, fewer than one window of seq_len + 1 = " +
                                  std::to_string(window_tokens));
    }
    begins.push_back(0);
    ends.push_back(file.size());
  }
  ValidationWindows windows;
  windows.files_ = files;
  windows.window_tokens_ = window_tokens;
  windows.windows_ = interleaved_windows(begins, ends, window_tokens);
  return windows;
}

ValidationWindows TokenSampler::validation() const {
  const int64_t window_tokens = seq_len_ + 1;
  std::vector<int64_t> begins, ends;
  for (size_t s = 0; s < shards_.size(); ++s) {
    begins.push_back(train_ends_[s]);
    ends.push_back(shards_[s].size());
  }
  ValidationWindows windows;
  windows.files_ = shards_;
  windows.window_tokens_ = window_tokens;
  windows.windows_ = interleaved_windows(begins, ends, window_tokens);
  if (windows.windows_.empty()) {
    std::ostringstream message;
    message << "no validation window of seq_len + 1 = " << window_tokens
            << " tokens fits in the held-out tails (fraction " << heldout_fraction_
            << ") of the train shards:";
    for (size_t s = 0; s < shards_.size(); ++s) {
      message << (s ? "," : "") << " '" << shards_[s].path() << "' holds "
              << ends[s] - begins[s];
    }
    message << " held-out tokens; raise the fraction or use validation files";
    throw std::invalid_argument(message.str());
  }
  return windows;
}

WindowLocation TokenSampler::locate(int64_t step, int64_t index) const {
  if (step < 0 || index < 0) {
    throw std::invalid_argument("TokenSampler: step and index must be >= 0, got step " +
                                std::to_string(step) + ", index " + std::to_string(index));
  }
  // Map the 64-bit draw onto [0, window_count) by a multiply-high: uniform up to a bias below
  // window_count / 2^64, and one draw picks both the shard and the start.
  const uint64_t draw = window_hash(seed_, step, index);
  const int64_t window = static_cast<int64_t>(
      (static_cast<unsigned __int128>(draw) * static_cast<uint64_t>(window_count())) >> 64);
  const auto owner = std::upper_bound(window_offsets_.begin(), window_offsets_.end(), window);
  const int64_t shard = static_cast<int64_t>(owner - window_offsets_.begin()) - 1;
  return {shard, window - window_offsets_[static_cast<size_t>(shard)]};
}

void TokenSampler::sample(int64_t step, int64_t index, int32_t* out_seq_len_plus_1) const {
  const WindowLocation where = locate(step, index);
  shards_[static_cast<size_t>(where.shard)].read(where.start, seq_len_ + 1, out_seq_len_plus_1);
}

}  // namespace freqkv
