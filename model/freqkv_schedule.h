// The FreqKV chunk schedule of one sequence (../shared/docs/FREQKV.md, "Schedule"), laid out as
// the rows of one key/value buffer so that one attention launch covers every chunk.
//
// For each chunk g the attention keys/values are [sink ; memory M_g ; chunk tokens] (chunk 0: its
// tokens alone). They sit contiguously in the "kv rows" buffer, chunk after chunk:
//
//   chunk 0 rows:  X[0 : n0]
//   chunk g rows:  X[0 : S] | M_g (L rows) | X[chunk g]        (g >= 1)
//
// Sink and chunk rows are copies of token rows (kv_source gives the token, a gather); memory rows
// are written by compression. Since M_{g+1} = P [M_g ; X_g] and [M_g ; X_g] are rows
// [S, S + F) of chunk g, each compression reads F contiguous rows of chunk g and writes L rows of
// chunk g + 1: one GEMM, and its adjoint in the backward.
#pragma once

#include <cstdint>
#include <vector>

#include "model/model_config.h"

namespace freqkv {

struct FreqKVChunk {
  int64_t token_start;  // first token of the chunk in the sequence
  int64_t n_tokens;     // queries of the chunk
  int64_t kv_start;     // first row of the chunk's keys/values in the kv rows buffer
  int64_t kv_len;       // S + L + n_tokens (g >= 1) or n_tokens (chunk 0)
};

// memory rows [dst_row, dst_row + n_dst) = P_{n_src -> n_dst} rows [src_row, src_row + n_src)
struct FreqKVCompression {
  int64_t src_row;
  int64_t n_src;
  int64_t dst_row;
  int64_t n_dst;
};

struct FreqKVSchedule {
  int64_t seq_len = 0;  // T
  int64_t kv_rows = 0;  // rows of the kv buffer of one sequence
  std::vector<FreqKVChunk> chunks;
  std::vector<FreqKVCompression> compressions;  // in forward order (chunk 0 -> 1, 1 -> 2, ...)
  std::vector<int64_t> kv_source;               // per kv row: the token copied, -1 for memory rows
  std::vector<int32_t> kv_positions;            // RoPE position of each kv row (cache layout)
  std::vector<int32_t> query_positions;         // RoPE position of each token's query

  // The schedule for a sequence of T tokens. With FreqKV disabled, or T <= C, it is one chunk of
  // plain causal attention with positions 0..T-1. Validates the config.
  static FreqKVSchedule build(int64_t seq_len, const FreqKVConfig& config);
};

// Sequence parallelism: splits the chunks among `parts` ranks, contiguous and as even in tokens as
// the chunk sizes allow. Returns parts + 1 boundaries: rank r holds chunks [b[r], b[r + 1]).
// Throws std::invalid_argument when there are fewer chunks than ranks (naming both).
std::vector<int64_t> partition_chunks(const FreqKVSchedule& schedule, int64_t parts);

}  // namespace freqkv
