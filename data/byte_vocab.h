// The byte-level vocabulary for tiny models: one token per byte value, then BOS and EOS.
// (Real tokenizers, Hugging Face tokenizer.json, come with the tokenizer work.)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace freqkv {

struct ByteVocab {
  static constexpr int32_t kBos = 256;
  static constexpr int32_t kEos = 257;
  static constexpr int32_t kSize = 258;

  static std::vector<int32_t> encode(const std::string& text);  // byte b -> token b
  // Bytes of the tokens; BOS/EOS are dropped, other ids outside the vocabulary are an error.
  static std::string decode(const std::vector<int32_t>& tokens);
};

}  // namespace freqkv
