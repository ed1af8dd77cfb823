// Token embedding lookup and its gradient.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cpu/cpu_kernels.h"

namespace freqkv::cpu {

namespace {

constexpr int64_t kParallelMinElements = int64_t{1} << 15;
// Columns per task of the backward (see scatter_add_rows: repeated tokens add into one row).
constexpr int64_t kColumnTile = 256;

// The interface passes no vocabulary size (the caller checks the upper bound on the host), but a
// negative id would read before the table: refuse it here, before any parallel loop.
void check_tokens(const int32_t* tokens, int64_t n_tokens, const char* where) {
  for (int64_t n = 0; n < n_tokens; ++n) {
    if (tokens[n] < 0) {
      throw std::out_of_range(std::string(where) + ": token " + std::to_string(n) +
                              " has negative id " + std::to_string(tokens[n]));
    }
  }
}

}  // namespace

template <typename T>
void embedding_forward(T* out, const T* table, const int32_t* tokens, int64_t n_tokens,
                       int64_t dim) {
  check_tokens(tokens, n_tokens, "embedding_forward");
  if (dim <= 0) return;
#pragma omp parallel for if (n_tokens * dim >= kParallelMinElements)
  for (int64_t n = 0; n < n_tokens; ++n) {
    std::memcpy(out + n * dim, table + static_cast<int64_t>(tokens[n]) * dim,
                static_cast<size_t>(dim) * sizeof(T));
  }
}

template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n_tokens,
                        int64_t dim) {
  check_tokens(tokens, n_tokens, "embedding_backward");
  const int64_t n_tiles = (dim + kColumnTile - 1) / kColumnTile;
#pragma omp parallel for if (n_tokens * dim >= kParallelMinElements)
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int64_t c0 = tile * kColumnTile;
    const int64_t c1 = std::min(dim, c0 + kColumnTile);
    for (int64_t n = 0; n < n_tokens; ++n) {
      T* row = dtable + static_cast<int64_t>(tokens[n]) * dim;
      const T* grad = dout + n * dim;
      for (int64_t c = c0; c < c1; ++c) row[c] += grad[c];
    }
  }
}

template void embedding_forward<float>(float*, const float*, const int32_t*, int64_t, int64_t);
template void embedding_forward<double>(double*, const double*, const int32_t*, int64_t, int64_t);
template void embedding_backward<float>(float*, const float*, const int32_t*, int64_t, int64_t);
template void embedding_backward<double>(double*, const double*, const int32_t*, int64_t, int64_t);

}  // namespace freqkv::cpu
