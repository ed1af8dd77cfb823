// Plain byte-string helpers shared by the tokenizer's normalizers, pre-tokenizers and decoders.
#pragma once

#include <string>
#include <string_view>

namespace freqkv {

// text with every non-overlapping occurrence of from (left to right) replaced by to; text itself
// when from is empty.
inline std::string replace_all(std::string_view text, std::string_view from, std::string_view to) {
  if (from.empty()) return std::string(text);
  std::string out;
  out.reserve(text.size());
  size_t start = 0;
  for (size_t hit; (hit = text.find(from, start)) != std::string_view::npos;
       start = hit + from.size()) {
    out.append(text, start, hit - start);
    out.append(to);
  }
  out.append(text, start, std::string_view::npos);
  return out;
}

inline bool starts_with(std::string_view text, std::string_view prefix) {
  return text.substr(0, prefix.size()) == prefix;
}

}  // namespace freqkv
