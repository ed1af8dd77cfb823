// TokenSampler: windows as a pure function of (seed, step, index), held-out tails kept out of
// training, validation windows, proportional shard choice, errors.
#include "tests/test_support.h"
#include "data/sampler.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace freqkv {
namespace {

namespace fs = std::filesystem;

// Token i of shard s is s * kShardStride + i, so a window's tokens say where it was read from.
constexpr int32_t kShardStride = 1000000;

fs::path test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("freqkv_sampler_" + std::string(info->name()) + "_" +
                        std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

// Shards of the given sizes, written as int32 files and opened.
std::vector<TokenFile> make_shards(const std::vector<int64_t>& sizes) {
  const fs::path dir = test_dir();
  std::vector<TokenFile> shards;
  for (size_t s = 0; s < sizes.size(); ++s) {
    std::vector<int32_t> tokens(static_cast<size_t>(sizes[s]));
    for (int64_t i = 0; i < sizes[s]; ++i) {
      tokens[static_cast<size_t>(i)] = static_cast<int32_t>(s) * kShardStride +
                                       static_cast<int32_t>(i);
    }
    const std::string path = (dir / ("shard" + std::to_string(s) + ".bin")).string();
    write_token_file(path, tokens, TokenDType::I32);
    shards.push_back(TokenFile::open(path, TokenDType::I32));
  }
  return shards;
}

std::vector<int32_t> sample(const TokenSampler& sampler, int64_t step, int64_t index) {
  std::vector<int32_t> window(static_cast<size_t>(sampler.seq_len() + 1));
  sampler.sample(step, index, window.data());
  return window;
}

TEST(TokenSampler, WindowsAreContiguousAndMatchTheirLocation) {
  const TokenSampler sampler(make_shards({500, 800}), 31, 0.0, 7);
  EXPECT_EQ(sampler.window_count(), (500 - 31) + (800 - 31));
  for (int64_t step = 1; step <= 50; ++step) {
    for (int64_t index = 0; index < 4; ++index) {
      const WindowLocation where = sampler.locate(step, index);
      const std::vector<int32_t> window = sample(sampler, step, index);
      ASSERT_EQ(window.size(), 32u);
      for (size_t j = 0; j < window.size(); ++j) {
        ASSERT_EQ(window[j], where.shard * kShardStride + where.start + static_cast<int64_t>(j));
      }
    }
  }
}

TEST(TokenSampler, DeterministicAcrossCallsAndObjects) {
  const std::vector<TokenFile> shards = make_shards({1000, 3000, 2000});
  const TokenSampler first(shards, 63, 0.0, 1234);
  const TokenSampler second(shards, 63, 0.0, 1234);
  for (int64_t step = 1; step <= 20; ++step) {
    for (int64_t index = 0; index < 8; ++index) {
      const std::vector<int32_t> window = sample(first, step, index);
      EXPECT_EQ(window, sample(first, step, index));   // the same object, asked again
      EXPECT_EQ(window, sample(second, step, index));  // a new object (a resumed run)
    }
  }
  // Resuming at step 11 sees what a run going straight through saw at steps 11..20, whatever was
  // asked of the sampler before.
  std::vector<std::vector<int32_t>> straight;
  for (int64_t step = 1; step <= 20; ++step) straight.push_back(sample(first, step, 0));
  const TokenSampler resumed(shards, 63, 0.0, 1234);
  for (int64_t step = 11; step <= 20; ++step) {
    EXPECT_EQ(sample(resumed, step, 0), straight[static_cast<size_t>(step - 1)]);
  }
}

TEST(TokenSampler, StepsIndicesAndSeedsGiveDifferentWindows) {
  const std::vector<TokenFile> shards = make_shards({100000});
  const TokenSampler sampler(shards, 15, 0.0, 1);
  const TokenSampler other_seed(shards, 15, 0.0, 2);
  std::set<int64_t> by_step, by_index;
  int64_t same_across_seeds = 0;
  for (int64_t k = 0; k < 100; ++k) {
    by_step.insert(sampler.locate(k + 1, 0).start);
    by_index.insert(sampler.locate(1, k).start);
    same_across_seeds += sampler.locate(k + 1, 0).start == other_seed.locate(k + 1, 0).start;
  }
  // 100 draws from ~100000 starts: a repeat is rare, many would mean the draws are not mixed.
  EXPECT_GE(by_step.size(), 95u);
  EXPECT_GE(by_index.size(), 95u);
  EXPECT_LE(same_across_seeds, 2);
  EXPECT_NE(sample(sampler, 1, 0), sample(sampler, 2, 0));
  EXPECT_NE(sampler.locate(1, 2).start, sampler.locate(2, 1).start);
}

TEST(TokenSampler, ShardsChosenInProportionToTheirWindows) {
  // Window starts: 1000 and 3000 (sizes minus seq_len), so a quarter of the draws go to shard 0.
  const int64_t seq_len = 100;
  const TokenSampler sampler(make_shards({1000 + seq_len, 3000 + seq_len}), seq_len, 0.0, 99);
  const int64_t draws = 40000;
  int64_t from_first = 0;
  double start_sum = 0.0;
  for (int64_t i = 0; i < draws; ++i) {
    const WindowLocation where = sampler.locate(i / 8 + 1, i % 8);
    if (where.shard == 0) {
      ++from_first;
      start_sum += static_cast<double>(where.start);
    }
    ASSERT_LE(where.start + seq_len + 1, sampler.shards()[static_cast<size_t>(where.shard)].size());
  }
  // Binomial(40000, 0.25): standard deviation ~87 draws; allow 5 of them.
  EXPECT_NEAR(static_cast<double>(from_first), 0.25 * draws, 450.0);
  // Starts uniform over [0, 1000): mean 499.5, standard error ~2.9.
  EXPECT_NEAR(start_sum / static_cast<double>(from_first), 499.5, 15.0);
}

TEST(TokenSampler, ShortestShardHasExactlyOneWindow) {
  const TokenSampler sampler(make_shards({11}), 10, 0.0, 5);
  EXPECT_EQ(sampler.window_count(), 1);
  for (int64_t step = 0; step < 10; ++step) EXPECT_EQ(sampler.locate(step, 0).start, 0);
}

TEST(TokenSampler, HeldOutTailsStayOutOfTrainingAndGiveValidationWindows) {
  const int64_t seq_len = 9;  // windows of 10 tokens
  // Tails: floor(1000 * 0.1) = 100 and floor(555 * 0.1) = 55 tokens -> 10 and 5 windows.
  const TokenSampler sampler(make_shards({1000, 555}), seq_len, 0.1, 3);
  EXPECT_EQ(sampler.train_end(0), 900);
  EXPECT_EQ(sampler.train_end(1), 500);
  for (int64_t step = 1; step <= 2000; ++step) {
    const WindowLocation where = sampler.locate(step, 0);
    ASSERT_LE(where.start + seq_len + 1, sampler.train_end(where.shard)) << "step " << step;
  }

  const ValidationWindows validation = sampler.validation();
  ASSERT_EQ(validation.size(), 15);
  EXPECT_EQ(validation.window_tokens(), 10);
  std::set<std::pair<int64_t, int64_t>> covered;  // (shard, token) pairs of all windows
  for (int64_t i = 0; i < validation.size(); ++i) {
    const WindowLocation where = validation.location(i);
    EXPECT_GE(where.start, sampler.train_end(where.shard));
    EXPECT_LE(where.start + 10, sampler.shards()[static_cast<size_t>(where.shard)].size());
    std::vector<int32_t> window(10);
    validation.window(i, window.data());
    for (int64_t j = 0; j < 10; ++j) {
      EXPECT_EQ(window[static_cast<size_t>(j)], where.shard * kShardStride + where.start + j);
      EXPECT_TRUE(covered.insert({where.shard, where.start + j}).second)
          << "validation windows overlap at shard " << where.shard << " token " << where.start + j;
    }
  }
  // Windows alternate between shards while both have some left.
  EXPECT_EQ(validation.location(0).shard, 0);
  EXPECT_EQ(validation.location(1).shard, 1);
  EXPECT_EQ(validation.location(2).shard, 0);
  EXPECT_EQ(validation.location(2).start, 910);
  // Fixed: the same windows from a new sampler.
  const ValidationWindows again = TokenSampler(make_shards({1000, 555}), seq_len, 0.1, 77)
                                      .validation();
  for (int64_t i = 0; i < validation.size(); ++i) {
    EXPECT_EQ(again.location(i).shard, validation.location(i).shard);
    EXPECT_EQ(again.location(i).start, validation.location(i).start);
  }
  EXPECT_THROW(validation.location(15), std::out_of_range);
}

TEST(TokenSampler, ValidationFiles) {
  const std::vector<TokenFile> files = make_shards({25, 12});
  const ValidationWindows validation = TokenSampler::validation(files, 4);  // 5-token windows
  ASSERT_EQ(validation.size(), 5 + 2);
  const std::vector<std::pair<int64_t, int64_t>> expected = {{0, 0},  {1, 0},  {0, 5}, {1, 5},
                                                             {0, 10}, {0, 15}, {0, 20}};
  for (int64_t i = 0; i < validation.size(); ++i) {
    EXPECT_EQ(validation.location(i).shard, expected[static_cast<size_t>(i)].first);
    EXPECT_EQ(validation.location(i).start, expected[static_cast<size_t>(i)].second);
  }
  std::vector<int32_t> window(5);
  validation.window(6, window.data());
  EXPECT_EQ(window, (std::vector<int32_t>{20, 21, 22, 23, 24}));
}

TEST(TokenSampler, Errors) {
  expect_invalid([] { TokenSampler({}, 8, 0.0, 1); }, {"no token files"});
  const std::vector<TokenFile> shards = make_shards({100, 20});
  expect_invalid([&] { TokenSampler(shards, 32, 0.0, 1); },
                 {shards[1].path(), "holds 20 tokens", "seq_len + 1 = 33"});
  // The fraction leaves 100 - 50 = 50 tokens of shard 0 for training, fewer than 65.
  expect_invalid([&] { TokenSampler({shards[0]}, 64, 0.5, 1); },
                 {shards[0].path(), "holding out 50", "leaves 50 for training", "65",
                  "lower the fraction"});
  expect_invalid([&] { TokenSampler(shards, 8, 1.0, 1); }, {"fraction", "[0, 1)"});
  expect_invalid([&] { TokenSampler(shards, 8, -0.1, 1); }, {"fraction"});
  expect_invalid([&] { TokenSampler(shards, 0, 0.0, 1); }, {"seq_len", ">= 1"});
  // Tails of floor(100 * 0.05) = 5 and 1 tokens hold no 9-token window.
  expect_invalid([&] { TokenSampler(shards, 8, 0.05, 1).validation(); },
                 {"no validation window", "seq_len + 1 = 9", "holds 5", "holds 1"});
  expect_invalid([&] { TokenSampler(shards, 8, 0.0, 1).validation(); }, {"no validation window"});
  expect_invalid([&] { TokenSampler::validation({}, 8); }, {"no validation token files"});
  expect_invalid([&] { TokenSampler::validation(shards, 32); },
                 {"validation token file", shards[1].path(), "20 tokens", "33"});
  const TokenSampler sampler(shards, 8, 0.0, 1);
  expect_invalid([&] { sampler.locate(-1, 0); }, {"step", "-1"});
  expect_invalid([&] { sampler.locate(0, -3); }, {"index", "-3"});
}

TEST(TokenSampler, OpenReadsTheFiles) {
  const std::vector<TokenFile> shards = make_shards({300});
  const TokenSampler opened =
      TokenSampler::open({shards[0].path()}, TokenDType::I32, 16, 0.0, 11);
  const TokenSampler built(shards, 16, 0.0, 11);
  EXPECT_EQ(sample(opened, 3, 1), sample(built, 3, 1));
  EXPECT_THROW(TokenSampler::open({"/nonexistent/tokens.bin"}, TokenDType::U16, 16, 0.0, 1),
               std::runtime_error);
}

}  // namespace
}  // namespace freqkv
