#include "model/freqkv_schedule.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace freqkv {

FreqKVSchedule FreqKVSchedule::build(int64_t seq_len, const FreqKVConfig& config) {
  if (seq_len < 1) throw std::invalid_argument("FreqKV schedule: sequence length must be >= 1, got " +
                                               std::to_string(seq_len));
  FreqKVSchedule s;
  s.seq_len = seq_len;
  const bool one_chunk = !config.enabled || seq_len <= config.cache;
  if (config.enabled) config.validate();
  const int64_t C = config.cache, S = config.sink;
  const int64_t L = one_chunk ? 0 : config.compressed();
  const int64_t F = one_chunk ? 0 : config.compressible();
  const int64_t step = one_chunk ? 0 : config.step();

  auto append_token_rows = [&](int64_t token_start, int64_t n, int32_t first_position) {
    for (int64_t i = 0; i < n; ++i) {
      s.kv_source.push_back(token_start + i);
      s.kv_positions.push_back(static_cast<int32_t>(first_position + i));
    }
  };

  // Chunk 0: ordinary causal attention over the first min(C, T) tokens.
  const int64_t n0 = one_chunk ? seq_len : C;
  s.chunks.push_back({0, n0, 0, n0});
  append_token_rows(0, n0, 0);
  for (int64_t t = 0; t < n0; ++t) s.query_positions.push_back(static_cast<int32_t>(t));

  // Chunks g >= 1: [sink ; memory ; chunk], keys at positions 0.., queries at S + L ...
  for (int64_t start = n0; start < seq_len; start += step) {
    const int64_t prev_kv_start = s.chunks.back().kv_start;
    const int64_t n = std::min(step, seq_len - start);
    const int64_t kv_start = static_cast<int64_t>(s.kv_source.size());
    s.chunks.push_back({start, n, kv_start, S + L + n});
    // The memory entering this chunk compresses rows [S, S + F) of the previous chunk.
    s.compressions.push_back({prev_kv_start + S, F, kv_start + S, L});
    append_token_rows(0, S, 0);
    for (int64_t i = 0; i < L; ++i) {
      s.kv_source.push_back(-1);
      s.kv_positions.push_back(static_cast<int32_t>(S + i));
    }
    append_token_rows(start, n, static_cast<int32_t>(S + L));
    for (int64_t i = 0; i < n; ++i) s.query_positions.push_back(static_cast<int32_t>(S + L + i));
  }
  s.kv_rows = static_cast<int64_t>(s.kv_source.size());
  return s;
}

std::vector<int64_t> partition_chunks(const FreqKVSchedule& schedule, int64_t parts) {
  const int64_t n = static_cast<int64_t>(schedule.chunks.size());
  if (parts < 1) throw std::invalid_argument("partition_chunks: parts must be >= 1");
  if (n < parts)
    throw std::invalid_argument(
        "sequence parallelism: a sequence of " + std::to_string(schedule.seq_len) + " tokens has " +
        std::to_string(n) + " FreqKV chunk(s), fewer than sp = " + std::to_string(parts) +
        " ranks (each rank holds whole chunks): raise data.seq_len or lower parallel.sp");
  std::vector<int64_t> bounds = {0};
  int64_t tokens_before = 0;  // tokens of chunks [0, c)
  for (int64_t c = 0; c < n && static_cast<int64_t>(bounds.size()) < parts; ++c) {
    tokens_before += schedule.chunks[c].n_tokens;
    const int64_t parts_done = static_cast<int64_t>(bounds.size());
    const int64_t chunks_left = n - (c + 1), parts_left = parts - parts_done;
    // Close part parts_done - 1 after chunk c once it reached its share of the tokens, or when
    // every remaining part needs one of the remaining chunks.
    if (tokens_before * parts >= schedule.seq_len * parts_done || chunks_left == parts_left)
      bounds.push_back(c + 1);
  }
  bounds.push_back(n);
  return bounds;
}

}  // namespace freqkv
