// The FreqKV chunk schedule against FREQKV.md's "Schedule" section, worked out by hand.
#include <gtest/gtest.h>

#include "model/freqkv_schedule.h"
#include "tests/test_support.h"

namespace freqkv {
namespace {

TEST(FreqKVSchedule, PaperDefaultsAt8K) {
  // C = 4096, S = 4, r = 0.5: F = 4092, L = 2046, step = 2046.
  const FreqKVSchedule s = FreqKVSchedule::build(8192, freqkv_config(4096, 4, 0.5));
  ASSERT_EQ(s.chunks.size(), 4u);  // [0,4096) [4096,6142) [6142,8188) [8188,8192)
  EXPECT_EQ(s.chunks[0].token_start, 0);
  EXPECT_EQ(s.chunks[0].n_tokens, 4096);
  EXPECT_EQ(s.chunks[1].token_start, 4096);
  EXPECT_EQ(s.chunks[1].n_tokens, 2046);
  EXPECT_EQ(s.chunks[2].token_start, 6142);
  EXPECT_EQ(s.chunks[3].token_start, 8188);
  EXPECT_EQ(s.chunks[3].n_tokens, 4);
  EXPECT_EQ(s.chunks[1].kv_len, 4 + 2046 + 2046);  // a full chunk attends over exactly C keys
  EXPECT_EQ(s.chunks[3].kv_len, 4 + 2046 + 4);
  ASSERT_EQ(s.compressions.size(), 3u);
  EXPECT_EQ(s.compressions[0].src_row, 4);  // rows [S, C) of chunk 0
  EXPECT_EQ(s.compressions[0].n_src, 4092);
  EXPECT_EQ(s.compressions[0].dst_row, 4096 + 4);
  EXPECT_EQ(s.compressions[0].n_dst, 2046);
  EXPECT_EQ(s.compressions[1].src_row, s.chunks[1].kv_start + 4);  // [M_1 ; X_1]
  EXPECT_EQ(s.compressions[1].dst_row, s.chunks[2].kv_start + 4);
  EXPECT_EQ(s.kv_rows, 4096 + 3 * (4 + 2046) + 2046 + 2046 + 4);
}

TEST(FreqKVSchedule, RowsPositionsAndSourcesOfAChunk) {
  // C = 6, S = 1, r = 0.5: F = 5, L = 2, step = 3; T = 13 -> chunks of 6, 3, 3, 1 tokens.
  const FreqKVSchedule s = FreqKVSchedule::build(13, freqkv_config(6, 1, 0.5));
  ASSERT_EQ(s.chunks.size(), 4u);
  const FreqKVChunk& c1 = s.chunks[1];
  EXPECT_EQ(c1.token_start, 6);
  EXPECT_EQ(c1.kv_start, 6);
  EXPECT_EQ(c1.kv_len, 1 + 2 + 3);
  // Rows of chunk 1: sink token 0, two memory rows, tokens 6, 7, 8.
  const std::vector<int64_t> sources = {0, -1, -1, 6, 7, 8};
  const std::vector<int32_t> positions = {0, 1, 2, 3, 4, 5};
  for (int64_t r = 0; r < c1.kv_len; ++r) {
    EXPECT_EQ(s.kv_source[c1.kv_start + r], sources[r]) << "row " << r;
    EXPECT_EQ(s.kv_positions[c1.kv_start + r], positions[r]) << "row " << r;
  }
  // Queries of chunk g >= 1 sit after sink and memory: positions S + L ...
  EXPECT_EQ(s.query_positions[6], 3);
  EXPECT_EQ(s.query_positions[8], 5);
  EXPECT_EQ(s.query_positions[12], 3);  // the last, one-token chunk
  EXPECT_EQ(s.query_positions[5], 5);   // chunk 0 is plain
  EXPECT_EQ(s.chunks[3].kv_len, 1 + 2 + 1);
  EXPECT_EQ(s.kv_rows, 6 + 6 + 6 + 4);
  ASSERT_EQ(s.compressions.size(), 3u);
  EXPECT_EQ(s.compressions[2].src_row, s.chunks[2].kv_start + 1);
  EXPECT_EQ(s.compressions[2].n_src, 5);
}

TEST(FreqKVSchedule, ShortOrDisabledIsOneCausalChunk) {
  for (const FreqKVSchedule& s :
       {FreqKVSchedule::build(6, freqkv_config(6, 1, 0.5)),
        FreqKVSchedule::build(3, freqkv_config(6, 1, 0.5))}) {
    ASSERT_EQ(s.chunks.size(), 1u);
    EXPECT_EQ(s.chunks[0].kv_len, s.seq_len);
    EXPECT_TRUE(s.compressions.empty());
    for (int64_t t = 0; t < s.seq_len; ++t) {
      EXPECT_EQ(s.kv_source[t], t);
      EXPECT_EQ(s.kv_positions[t], t);
      EXPECT_EQ(s.query_positions[t], t);
    }
  }
  FreqKVConfig off = freqkv_config(6, 1, 0.5);
  off.enabled = false;
  const FreqKVSchedule s = FreqKVSchedule::build(100, off);
  ASSERT_EQ(s.chunks.size(), 1u);
  EXPECT_EQ(s.chunks[0].n_tokens, 100);
}

TEST(FreqKVSchedule, RejectsInvalidConfigurations) {
  const auto rejects = [](const FreqKVConfig& c) {
    EXPECT_THROW(FreqKVSchedule::build(100, c), std::invalid_argument);
  };
  rejects(freqkv_config(6, 6, 0.5));   // S >= C
  rejects(freqkv_config(6, -1, 0.5));  // S < 0
  rejects(freqkv_config(6, 1, 0.1));   // L < 1
  rejects(freqkv_config(6, 1, 1.0));   // step < 1
  EXPECT_THROW(FreqKVSchedule::build(0, freqkv_config(6, 1, 0.5)), std::invalid_argument);
}

}  // namespace
}  // namespace freqkv
