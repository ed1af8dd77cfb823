#include "data/byte_vocab.h"

#include <stdexcept>

namespace freqkv {

std::vector<int32_t> ByteVocab::encode(const std::string& text) {
  std::vector<int32_t> tokens;
  tokens.reserve(text.size());
  for (unsigned char c : text) tokens.push_back(static_cast<int32_t>(c));
  return tokens;
}

std::string ByteVocab::decode(const std::vector<int32_t>& tokens) {
  std::string text;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t t = tokens[i];
    if (t == kBos || t == kEos) continue;
    if (t < 0 || t >= kSize)
      throw std::out_of_range("byte vocabulary: token " + std::to_string(t) + " at position " +
                              std::to_string(i) + " is outside [0, " + std::to_string(kSize) + ")");
    text.push_back(static_cast<char>(t));
  }
  return text;
}

}  // namespace freqkv
