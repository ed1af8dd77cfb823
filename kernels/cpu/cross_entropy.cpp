// Cross-entropy over the vocabulary with the gradient written over the logits (llm.c style).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cpu/cpu_kernels.h"

namespace freqkv::cpu {

template <typename T>
void cross_entropy(Acc<T>* losses, T* logits, int64_t ld_logits, const int32_t* targets,
                   int64_t n_rows, int64_t vocab, double grad_scale) {
  using A = Acc<T>;
  if (vocab < 1 || ld_logits < vocab) {
    throw std::invalid_argument(
        "cross_entropy: need vocab >= 1 and ld_logits >= vocab, got vocab = " +
        std::to_string(vocab) + ", ld_logits = " + std::to_string(ld_logits));
  }
  // Checked before the parallel loop: an exception cannot leave an OpenMP region.
  for (int64_t r = 0; r < n_rows; ++r) {
    if (targets[r] >= vocab) {
      throw std::out_of_range("cross_entropy: target of row " + std::to_string(r) + " is " +
                              std::to_string(targets[r]) + ", outside the vocabulary of " +
                              std::to_string(vocab));
    }
  }

#pragma omp parallel for if (n_rows > 1 && n_rows * vocab >= (int64_t{1} << 15))
  for (int64_t r = 0; r < n_rows; ++r) {
    T* row = logits + r * ld_logits;
    const int32_t target = targets[r];
    if (target < 0) {  // ignored position (padding, or no next token)
      losses[r] = A(0);
      if (grad_scale != 0.0) std::fill(row, row + vocab, T(0));
      continue;
    }
    // Stable log-sum-exp in double: subtract the maximum, so exp never overflows and the largest
    // term is exactly 1.
    double max_logit = static_cast<double>(row[0]);
    for (int64_t c = 1; c < vocab; ++c)
      max_logit = std::max(max_logit, static_cast<double>(row[c]));
    double sum = 0.0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(static_cast<double>(row[c]) - max_logit);
    const double lse = max_logit + std::log(sum);
    losses[r] = static_cast<A>(lse - static_cast<double>(row[target]));
    if (grad_scale != 0.0) {
      for (int64_t c = 0; c < vocab; ++c) {
        const double prob = std::exp(static_cast<double>(row[c]) - lse);
        row[c] = static_cast<T>(grad_scale * (prob - (c == target ? 1.0 : 0.0)));
      }
    }
  }
}

template <typename T>
void cross_entropy_stats(Acc<T>* lse, Acc<T>* target_logit, const T* logits, int64_t ld_logits,
                         const int32_t* targets, int64_t n_rows, int64_t vocab,
                         int64_t vocab_begin) {
  using A = Acc<T>;
  if (vocab < 1 || ld_logits < vocab)
    throw std::invalid_argument("cross_entropy_stats: need vocab >= 1 and ld_logits >= vocab, got "
                                "vocab = " + std::to_string(vocab) + ", ld_logits = " +
                                std::to_string(ld_logits));
#pragma omp parallel for if (n_rows > 1 && n_rows * vocab >= (int64_t{1} << 15))
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* row = logits + r * ld_logits;
    double max_logit = static_cast<double>(row[0]);
    for (int64_t c = 1; c < vocab; ++c) max_logit = std::max(max_logit, static_cast<double>(row[c]));
    double sum = 0.0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(static_cast<double>(row[c]) - max_logit);
    lse[r] = static_cast<A>(max_logit + std::log(sum));
    const int64_t local = static_cast<int64_t>(targets[r]) - vocab_begin;
    target_logit[r] =
        targets[r] >= 0 && local >= 0 && local < vocab ? static_cast<A>(row[local]) : A(0);
  }
}

template <typename T>
void cross_entropy_grad(T* logits, int64_t ld_logits, const Acc<T>* lse, const int32_t* targets,
                        int64_t n_rows, int64_t vocab, int64_t vocab_begin, double grad_scale) {
#pragma omp parallel for if (n_rows > 1 && n_rows * vocab >= (int64_t{1} << 15))
  for (int64_t r = 0; r < n_rows; ++r) {
    T* row = logits + r * ld_logits;
    if (targets[r] < 0) {
      std::fill(row, row + vocab, T(0));
      continue;
    }
    const double row_lse = static_cast<double>(lse[r]);
    const int64_t local = static_cast<int64_t>(targets[r]) - vocab_begin;
    for (int64_t c = 0; c < vocab; ++c) {
      const double prob = std::exp(static_cast<double>(row[c]) - row_lse);
      row[c] = static_cast<T>(grad_scale * (prob - (c == local ? 1.0 : 0.0)));
    }
  }
}

template void cross_entropy_stats<float>(float*, float*, const float*, int64_t, const int32_t*,
                                         int64_t, int64_t, int64_t);
template void cross_entropy_stats<double>(double*, double*, const double*, int64_t,
                                          const int32_t*, int64_t, int64_t, int64_t);
template void cross_entropy_grad<float>(float*, int64_t, const float*, const int32_t*, int64_t,
                                        int64_t, int64_t, double);
template void cross_entropy_grad<double>(double*, int64_t, const double*, const int32_t*, int64_t,
                                         int64_t, int64_t, double);

template void cross_entropy<float>(float*, float*, int64_t, const int32_t*, int64_t, int64_t,
                                   double);
template void cross_entropy<double>(double*, double*, int64_t, const int32_t*, int64_t, int64_t,
                                    double);

}  // namespace freqkv::cpu
