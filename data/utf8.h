// UTF-8 text as code points: decoding that never fails (tokenizers see arbitrary bytes) and
// encoding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace freqkv::utf8 {

// What a byte decodes to when it does not begin a well-formed UTF-8 sequence (a stray continuation
// byte, a truncated or overlong sequence, a surrogate): one "character" one byte long that is no
// Unicode code point. Text is arbitrary bytes, and every byte still has to reach a byte-level or
// byte-fallback token, so malformed input is carried along instead of rejected or replaced.
constexpr char32_t kMalformed = 0x110000;

struct Char {
  char32_t value;  // the code point, or kMalformed
  size_t offset;   // byte offset in the decoded text
  size_t size;     // bytes: 1..4 (1 for kMalformed)
};

// The character starting at byte offset (offset < text.size()).
Char decode_at(std::string_view text, size_t offset);
// Every character of text, in order; their sizes add up to text.size().
std::vector<Char> decode(std::string_view text);
// Appends the UTF-8 bytes of a code point (value <= 0x10FFFF).
void append(std::string& out, char32_t code_point);
std::string encode(char32_t code_point);
// "U+00E9" style name for messages; "byte 0xNN" for kMalformed with its byte.
std::string describe(std::string_view text, const Char& c);

}  // namespace freqkv::utf8
