// Small helpers the GoogleTest suites share: checking an error's type and message, and raw file
// bytes (for hand-built and corrupted files).
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/model_config.h"

// Runs action and expects an Exception whose message contains every fragment.
template <typename Exception = std::runtime_error>
void expect_error(const std::function<void()>& action, const std::vector<std::string>& fragments) {
  try {
    action();
    ADD_FAILURE() << "expected an exception mentioning '" << fragments.front() << "'";
  } catch (const Exception& error) {
    const std::string message = error.what();
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message '" << message << "' lacks '" << fragment << "'";
    }
  }
}

inline void expect_invalid(const std::function<void()>& action,
                           const std::vector<std::string>& fragments) {
  expect_error<std::invalid_argument>(action, fragments);
}

inline std::string read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// FreqKV settings C (cache), S (sink), r (ratio); enabled unless said otherwise.
inline freqkv::FreqKVConfig freqkv_config(int64_t cache, int64_t sink, double ratio,
                                          bool enabled = true) {
  freqkv::FreqKVConfig f;
  f.enabled = enabled;
  f.cache = cache;
  f.sink = sink;
  f.ratio = ratio;
  return f;
}

// n token ids drawn uniformly from [0, vocab), the same for the same seed.
inline std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int32_t& t : tokens) t = pick(rng);
  return tokens;
}
