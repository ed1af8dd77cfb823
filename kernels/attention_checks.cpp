#include "kernels/attention_checks.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

namespace freqkv {

namespace {

std::string block_text(size_t index, const AttnBlock& b) {
  return "block " + std::to_string(index) + " {q_start " + std::to_string(b.q_start) + ", n_q " +
         std::to_string(b.n_q) + ", kv_start " + std::to_string(b.kv_start) + ", n_kv " +
         std::to_string(b.n_kv) + "}";
}

// Throws std::invalid_argument unless [start_i, start_i + length_i) are pairwise disjoint.
void check_disjoint(std::vector<std::pair<int64_t, int64_t>> ranges, const char* what,
                    const char* where) {
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    const auto& prev = ranges[i - 1];
    if (prev.first + prev.second > ranges[i].first) {
      throw std::invalid_argument(
          std::string(where) + ": the " + what + " row ranges [" + std::to_string(prev.first) +
          ", " + std::to_string(prev.first + prev.second) + ") and [" +
          std::to_string(ranges[i].first) + ", " +
          std::to_string(ranges[i].first + ranges[i].second) + ") of two blocks overlap");
    }
  }
}

}  // namespace

void check_attention_arguments(const std::vector<AttnBlock>& blocks, const AttnShape& shape,
                               int64_t ld_q, int64_t ld_out, int64_t ld_kv, bool kv_disjoint,
                               const char* where) {
  if (shape.n_heads <= 0 || shape.n_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.n_heads % shape.n_kv_heads != 0) {
    throw std::invalid_argument(std::string(where) +
                                ": bad shape n_heads = " + std::to_string(shape.n_heads) +
                                ", n_kv_heads = " + std::to_string(shape.n_kv_heads) +
                                ", head_dim = " + std::to_string(shape.head_dim) +
                                " (need positive sizes and n_kv_heads dividing n_heads)");
  }
  const int64_t q_width = static_cast<int64_t>(shape.n_heads) * shape.head_dim;
  const int64_t kv_width = static_cast<int64_t>(shape.n_kv_heads) * shape.head_dim;
  if (ld_q < q_width || ld_out < q_width || ld_kv < kv_width) {
    throw std::invalid_argument(
        std::string(where) + ": leading dimensions ld_q = " + std::to_string(ld_q) +
        ", ld_out = " + std::to_string(ld_out) + " must be >= " + std::to_string(q_width) +
        " and ld_kv = " + std::to_string(ld_kv) + " >= " + std::to_string(kv_width));
  }
  std::vector<std::pair<int64_t, int64_t>> q_ranges;
  std::vector<std::pair<int64_t, int64_t>> kv_ranges;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const AttnBlock& b = blocks[i];
    // n_kv >= n_q: with bottom-right alignment, query 0 sees keys 0..n_kv-n_q, so every query
    // has at least one key and its softmax is defined.
    if (b.q_start < 0 || b.kv_start < 0 || b.n_q < 0 || b.n_kv < b.n_q) {
      throw std::invalid_argument(std::string(where) + ": " + block_text(i, b) +
                                  " needs non-negative starts and n_kv >= n_q >= 0");
    }
    if (b.n_q > 0) q_ranges.emplace_back(b.q_start, b.n_q);
    if (b.n_kv > 0) kv_ranges.emplace_back(b.kv_start, b.n_kv);
  }
  check_disjoint(q_ranges, "query", where);
  if (kv_disjoint) check_disjoint(kv_ranges, "key/value", where);
}


}  // namespace freqkv
