// Perplexity of a model over long windows of a token file, by two protocols, with the loss of
// every position kept so that it can be reported by position in the window.
//
//   freqkv  (the FreqKV / LongLoRA authors' protocol): windows of T tokens start every K tokens
//           (K = 256) as long as the window lies in the file; each window is one pass over its
//           tokens scored on all its T - 1 next-token predictions; PPL = exp(mean over windows of
//           the window's mean loss). (LongLoRA's get_as_batch starts windows at
//           range(0, N - T, K) and drops the last; here every window that fits is used.)
//   sliding (the usual sliding-window protocol): the same windows, but each scores only its
//           last K predictions, so consecutive windows score consecutive, disjoint tokens, each
//           with at least T - K tokens of context (the first T - K tokens of the file are only
//           context). Needs K <= T - 1.
//
// Positions: input position j (0 <= j < T - 1) of a window predicts token j + 1 from j + 1
// tokens of context. Bucket b of B holds the positions j with floor(j * B / (T - 1)) = b, i.e.
// [ceil(b (T-1) / B), ceil((b+1) (T-1) / B)): B equal slices of the window.
//
// The losses come from FreqKVDecoder::score: the window's tokens pass through the decoder in
// the chunks of the training schedule (compressing where training compresses), which is the
// computation of LlamaModel::forward over the window at the same cost, but keeps the loss of
// every position instead of only their sum (tests/test_decoder.cpp checks the two agree).
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "model/freqkv_decoder.h"

namespace freqkv {

enum class PerplexityProtocol { kFreqKV, kSliding };

// "freqkv" or "sliding"; anything else throws std::invalid_argument listing both.
PerplexityProtocol parse_perplexity_protocol(const std::string& name);
const char* perplexity_protocol_name(PerplexityProtocol protocol);

// The windows of one length and which of their positions are scored.
struct PerplexityPlan {
  PerplexityProtocol protocol = PerplexityProtocol::kFreqKV;
  int64_t seq_len = 0;        // T, tokens per window
  int64_t stride = 0;         // K, tokens between window starts
  int64_t first_scored = 0;   // input positions [first_scored, T - 1) are scored
  int64_t windows_in_file = 0;           // windows that fit, before max_windows
  std::vector<int64_t> window_starts;    // the windows evaluated (token offsets)

  int64_t scored_per_window() const { return seq_len - 1 - first_scored; }
};

// Throws std::invalid_argument naming the value for T < 2, K < 1, K > T - 1 under the sliding
// protocol, max_windows < 0, or a file too short for one window. max_windows > 0 evaluates that
// many windows spread evenly over the file (window floor(i * W / max_windows) for i <
// max_windows, W = windows_in_file) instead of all.
PerplexityPlan plan_perplexity(PerplexityProtocol protocol, int64_t file_tokens, int64_t seq_len,
                               int64_t stride, int64_t max_windows);

// The bucket of input position j, and the positions [first, last) of bucket b.
int64_t position_bucket(int64_t position, int64_t seq_len, int64_t buckets);
std::pair<int64_t, int64_t> bucket_positions(int64_t bucket, int64_t seq_len, int64_t buckets);

struct PerplexityResult {
  int64_t seq_len = 0;
  int64_t windows = 0;
  int64_t tokens = 0;             // scored predictions over all windows
  double mean_window_loss = 0;    // mean over windows of each window's mean loss
  std::vector<double> bucket_loss_sum;
  std::vector<int64_t> bucket_tokens;
  int64_t compressions_per_window = 0;  // of the last window (the same for every window)
  int64_t peak_cache_rows = 0;          // over all windows
  double seconds = 0;

  double ppl() const { return std::exp(mean_window_loss); }
  // exp(mean loss of the bucket); NaN when the protocol scores none of its positions.
  double bucket_ppl(size_t bucket) const;
};

// Reads count tokens starting at start into out.
using TokenReader = std::function<void(int64_t start, int64_t count, int32_t* out)>;

// Runs the plan through the decoder (reset before each window); on_window(done) is called after
// each window (progress). Throws std::invalid_argument for buckets < 1 or > T - 1.
template <typename T>
PerplexityResult evaluate_perplexity(FreqKVDecoder<T>& decoder, const TokenReader& read_tokens,
                                     const PerplexityPlan& plan, int64_t buckets,
                                     const std::function<void(int64_t)>& on_window = {});

}  // namespace freqkv
