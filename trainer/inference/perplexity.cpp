#include "trainer/inference/perplexity.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>

namespace freqkv {

PerplexityProtocol parse_perplexity_protocol(const std::string& name) {
  if (name == "freqkv") return PerplexityProtocol::kFreqKV;
  if (name == "sliding") return PerplexityProtocol::kSliding;
  throw std::invalid_argument("unknown perplexity protocol '" + name +
                              "': use freqkv (the authors' windows) or sliding");
}

const char* perplexity_protocol_name(PerplexityProtocol protocol) {
  return protocol == PerplexityProtocol::kFreqKV ? "freqkv" : "sliding";
}

PerplexityPlan plan_perplexity(PerplexityProtocol protocol, int64_t file_tokens, int64_t seq_len,
                               int64_t stride, int64_t max_windows) {
  const std::string context = std::string("perplexity (") + perplexity_protocol_name(protocol) +
                              " protocol, length " + std::to_string(seq_len) + ", stride " +
                              std::to_string(stride) + "): ";
  if (seq_len < 2)
    throw std::invalid_argument(context + "the window length must be >= 2 (one prediction)");
  if (stride < 1) throw std::invalid_argument(context + "the stride must be >= 1");
  if (protocol == PerplexityProtocol::kSliding && stride > seq_len - 1)
    throw std::invalid_argument(context + "the sliding protocol scores the last stride "
                                          "predictions of each window, so the stride must be <= "
                                          "length - 1 = " + std::to_string(seq_len - 1));
  if (max_windows < 0) throw std::invalid_argument(context + "max windows must be >= 0");
  if (file_tokens < seq_len)
    throw std::invalid_argument(context + "the token file holds " + std::to_string(file_tokens) +
                                " tokens, fewer than one window");
  PerplexityPlan plan;
  plan.protocol = protocol;
  plan.seq_len = seq_len;
  plan.stride = stride;
  plan.first_scored = protocol == PerplexityProtocol::kFreqKV ? 0 : seq_len - 1 - stride;
  plan.windows_in_file = (file_tokens - seq_len) / stride + 1;
  const int64_t W = plan.windows_in_file;
  const int64_t n = max_windows > 0 ? std::min(max_windows, W) : W;
  for (int64_t i = 0; i < n; ++i) plan.window_starts.push_back(i * W / n * stride);
  return plan;
}

int64_t position_bucket(int64_t position, int64_t seq_len, int64_t buckets) {
  return position * buckets / (seq_len - 1);
}

std::pair<int64_t, int64_t> bucket_positions(int64_t bucket, int64_t seq_len, int64_t buckets) {
  const int64_t predictions = seq_len - 1;
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  return {ceil_div(bucket * predictions, buckets), ceil_div((bucket + 1) * predictions, buckets)};
}

double PerplexityResult::bucket_ppl(size_t bucket) const {
  if (bucket_tokens[bucket] == 0) return std::numeric_limits<double>::quiet_NaN();
  return std::exp(bucket_loss_sum[bucket] / static_cast<double>(bucket_tokens[bucket]));
}

template <typename T>
PerplexityResult evaluate_perplexity(FreqKVDecoder<T>& decoder, const TokenReader& read_tokens,
                                     const PerplexityPlan& plan, int64_t buckets,
                                     const std::function<void(int64_t)>& on_window) {
  const int64_t L = plan.seq_len;
  if (buckets < 1 || buckets > L - 1)
    throw std::invalid_argument("perplexity: buckets must be in [1, length - 1 = " +
                                std::to_string(L - 1) + "], got " + std::to_string(buckets));
  PerplexityResult result;
  result.seq_len = L;
  result.bucket_loss_sum.assign(static_cast<size_t>(buckets), 0.0);
  result.bucket_tokens.assign(static_cast<size_t>(buckets), 0);
  const auto start = std::chrono::steady_clock::now();
  std::vector<int32_t> window(static_cast<size_t>(L));
  // The window's last token is only a target: the inputs are its first L - 1 tokens.
  std::vector<int32_t> inputs(static_cast<size_t>(L - 1)), targets(static_cast<size_t>(L - 1));
  double window_loss_sum = 0;
  for (size_t w = 0; w < plan.window_starts.size(); ++w) {
    read_tokens(plan.window_starts[w], L, window.data());
    for (int64_t j = 0; j < L - 1; ++j) {
      inputs[j] = window[j];
      targets[j] = j >= plan.first_scored ? window[j + 1] : -1;
    }
    decoder.reset();
    const std::vector<double> losses = decoder.score(inputs, targets);
    double sum = 0;
    for (int64_t j = plan.first_scored; j < L - 1; ++j) {
      sum += losses[j];
      const int64_t b = position_bucket(j, L, buckets);
      result.bucket_loss_sum[b] += losses[j];
      ++result.bucket_tokens[b];
    }
    window_loss_sum += sum / static_cast<double>(plan.scored_per_window());
    result.tokens += plan.scored_per_window();
    result.compressions_per_window = decoder.compressions();
    result.peak_cache_rows = std::max(result.peak_cache_rows, decoder.peak_cache_rows());
    ++result.windows;
    if (on_window) on_window(result.windows);
  }
  result.mean_window_loss = result.windows > 0
                                ? window_loss_sum / static_cast<double>(result.windows)
                                : std::numeric_limits<double>::quiet_NaN();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

#define FREQKV_INSTANTIATE_PERPLEXITY(T)                                                        \
  template PerplexityResult evaluate_perplexity<T>(FreqKVDecoder<T>&, const TokenReader&,       \
                                                   const PerplexityPlan&, int64_t,              \
                                                   const std::function<void(int64_t)>&);
FREQKV_INSTANTIATE_PERPLEXITY(float)
FREQKV_INSTANTIATE_PERPLEXITY(double)
#if defined(FREQKV_HAVE_CUDA)
FREQKV_INSTANTIATE_PERPLEXITY(bf16)
#endif
#undef FREQKV_INSTANTIATE_PERPLEXITY

}  // namespace freqkv
