// Vocabulary-parallel cross-entropy: the vocabulary split in parts, each part's statistics
// combined, gives the loss and gradient of the whole-vocabulary kernel; the host fallback of the
// interface equals the CPU kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/cpu/cpu_kernels.h"

namespace freqkv {
namespace {

template <typename T>
void check_split(bool use_fallback) {
  CpuKernels<T> k;
  const int64_t rows = 5, vocab = 23;
  const std::vector<int64_t> bounds = {0, 7, 16, 23};  // three uneven parts
  std::mt19937 rng(3);
  std::normal_distribution<double> normal(0.0, 2.0);
  std::vector<T> logits(static_cast<size_t>(rows * vocab));
  for (T& v : logits) v = static_cast<T>(normal(rng));
  const std::vector<int32_t> targets = {3, 22, -1, 7, 16};
  const double scale = 0.25;

  std::vector<T> full = logits;
  std::vector<Acc<T>> full_loss(static_cast<size_t>(rows));
  k.cross_entropy(full_loss.data(), full.data(), vocab, targets.data(), rows, vocab, scale);

  // Each part in its own buffer [rows, part], as a rank holds it.
  std::vector<double> lse_sum(static_cast<size_t>(rows), 0.0), target(static_cast<size_t>(rows), 0.0);
  std::vector<std::vector<T>> parts;
  for (size_t p = 0; p + 1 < bounds.size(); ++p) {
    const int64_t v0 = bounds[p], n = bounds[p + 1] - v0;
    std::vector<T> part(static_cast<size_t>(rows * n));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < n; ++c) part[r * n + c] = logits[r * vocab + v0 + c];
    std::vector<Acc<T>> lse(static_cast<size_t>(rows)), tl(static_cast<size_t>(rows));
    if (use_fallback)
      k.Kernels<T>::cross_entropy_stats(lse.data(), tl.data(), part.data(), n, targets.data(), rows, n, v0);
    else
      k.cross_entropy_stats(lse.data(), tl.data(), part.data(), n, targets.data(), rows, n, v0);
    for (int64_t r = 0; r < rows; ++r) {
      lse_sum[r] += std::exp(static_cast<double>(lse[r]));
      target[r] += static_cast<double>(tl[r]);
    }
    parts.push_back(part);
  }
  std::vector<Acc<T>> global_lse(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    global_lse[r] = static_cast<Acc<T>>(std::log(lse_sum[r]));
    const double loss = targets[r] < 0 ? 0.0 : std::log(lse_sum[r]) - target[r];
    EXPECT_NEAR(loss, static_cast<double>(full_loss[r]), 1e-5 * (1 + std::abs(loss))) << "row " << r;
  }
  for (size_t p = 0; p + 1 < bounds.size(); ++p) {
    const int64_t v0 = bounds[p], n = bounds[p + 1] - v0;
    if (use_fallback)
      k.Kernels<T>::cross_entropy_grad(parts[p].data(), n, global_lse.data(), targets.data(), rows, n, v0, scale);
    else
      k.cross_entropy_grad(parts[p].data(), n, global_lse.data(), targets.data(), rows, n, v0, scale);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < n; ++c)
        EXPECT_NEAR(static_cast<double>(parts[p][r * n + c]),
                    static_cast<double>(full[r * vocab + v0 + c]), 1e-6)
            << "row " << r << " id " << v0 + c;
  }
}

TEST(VocabParallelCrossEntropy, SplitMatchesWholeVocabularyFloat) { check_split<float>(false); }
TEST(VocabParallelCrossEntropy, SplitMatchesWholeVocabularyDouble) { check_split<double>(false); }
TEST(VocabParallelCrossEntropy, HostFallbackMatches) { check_split<double>(true); }

}  // namespace
}  // namespace freqkv
