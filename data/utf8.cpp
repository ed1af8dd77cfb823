#include "data/utf8.h"

#include <cstdio>
#include <stdexcept>

namespace freqkv::utf8 {

namespace {

bool is_continuation(unsigned char byte, unsigned char low = 0x80, unsigned char high = 0xBF) {
  return byte >= low && byte <= high;
}

}  // namespace

// Well-formed sequences exactly as the Unicode standard's table 3-7 lists them, so overlong forms
// and surrogates are malformed too (they would otherwise decode to characters that were never in
// the text).
Char decode_at(std::string_view text, size_t offset) {
  const size_t left = text.size() - offset;
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[offset + i]); };
  const unsigned char lead = byte(0);
  const Char malformed{kMalformed, offset, 1};
  if (lead < 0x80) return {lead, offset, 1};
  if (lead >= 0xC2 && lead <= 0xDF) {
    if (left < 2 || !is_continuation(byte(1))) return malformed;
    return {static_cast<char32_t>(((lead & 0x1F) << 6) | (byte(1) & 0x3F)), offset, 2};
  }
  if (lead >= 0xE0 && lead <= 0xEF) {
    const unsigned char low = lead == 0xE0 ? 0xA0 : 0x80;
    const unsigned char high = lead == 0xED ? 0x9F : 0xBF;
    if (left < 3 || !is_continuation(byte(1), low, high) || !is_continuation(byte(2))) {
      return malformed;
    }
    return {
        static_cast<char32_t>(((lead & 0x0F) << 12) | ((byte(1) & 0x3F) << 6) | (byte(2) & 0x3F)),
        offset, 3};
  }
  if (lead >= 0xF0 && lead <= 0xF4) {
    const unsigned char low = lead == 0xF0 ? 0x90 : 0x80;
    const unsigned char high = lead == 0xF4 ? 0x8F : 0xBF;
    if (left < 4 || !is_continuation(byte(1), low, high) || !is_continuation(byte(2)) ||
        !is_continuation(byte(3))) {
      return malformed;
    }
    return {static_cast<char32_t>(((lead & 0x07) << 18) | ((byte(1) & 0x3F) << 12) |
                                  ((byte(2) & 0x3F) << 6) | (byte(3) & 0x3F)),
            offset, 4};
  }
  return malformed;
}

std::vector<Char> decode(std::string_view text) {
  std::vector<Char> chars;
  chars.reserve(text.size());
  for (size_t offset = 0; offset < text.size();) {
    chars.push_back(decode_at(text, offset));
    offset += chars.back().size;
  }
  return chars;
}

void append(std::string& out, char32_t cp) {
  if (cp > 0x10FFFF) {
    throw std::invalid_argument("utf8::append: " + std::to_string(cp) +
                                " is not a Unicode code point");
  }
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string encode(char32_t cp) {
  std::string out;
  append(out, cp);
  return out;
}

std::string describe(std::string_view text, const Char& c) {
  char name[32];
  if (c.value == kMalformed) {
    std::snprintf(name, sizeof(name), "byte 0x%02X", static_cast<unsigned char>(text[c.offset]));
  } else {
    std::snprintf(name, sizeof(name), "U+%04X", static_cast<unsigned>(c.value));
  }
  return name;
}

}  // namespace freqkv::utf8
