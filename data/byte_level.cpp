#include "data/byte_level.h"

#include <array>

#include "data/utf8.h"

namespace freqkv::byte_level {

namespace {

// bytes_to_unicode() of GPT-2's encoder.py: printable Latin-1 bytes ('!'..'~', '¡'..'¬',
// '®'..'ÿ') stand for themselves; the other 68 bytes, in increasing order, take the code points
// 256, 257, ... so no byte is spelled with whitespace or a control character.
struct Alphabet {
  static constexpr char32_t kCodePointEnd = 256 + 68;  // one past the last code point used

  std::array<std::string, 256> spelling{};
  std::array<int, kCodePointEnd> byte_of_code_point{};  // -1: not in the alphabet

  Alphabet() {
    byte_of_code_point.fill(-1);
    char32_t next_extra = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp = printable ? static_cast<char32_t>(b) : next_extra++;
      spelling[b] = utf8::encode(cp);
      byte_of_code_point[cp] = b;
    }
  }
};

const Alphabet& alphabet() {
  static const Alphabet instance;
  return instance;
}

}  // namespace

const std::string& char_of_byte(unsigned char b) { return alphabet().spelling[b]; }

std::string encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) out += alphabet().spelling[b];
  return out;
}

int byte_of_char(char32_t cp) {
  return cp < Alphabet::kCodePointEnd ? alphabet().byte_of_code_point[cp] : -1;
}

std::string decode_token(std::string_view token) {
  std::string bytes;
  bytes.reserve(token.size());
  for (size_t offset = 0; offset < token.size();) {
    const utf8::Char c = utf8::decode_at(token, offset);
    const int b = c.value == utf8::kMalformed ? -1 : byte_of_char(c.value);
    if (b < 0) return std::string(token);
    bytes.push_back(static_cast<char>(b));
    offset += c.size;
  }
  return bytes;
}

}  // namespace freqkv::byte_level
