// GPT-2's byte-level alphabet: each of the 256 byte values is written as one printable Unicode
// character, so byte-level BPE vocabularies hold readable strings ("Ġ" for a space, "Ċ" for a
// newline) and every byte string has a spelling.
#pragma once

#include <string>
#include <string_view>

namespace freqkv::byte_level {

// The UTF-8 spelling of the character standing for byte value b.
const std::string& char_of_byte(unsigned char b);
// Each byte of bytes replaced by its character.
std::string encode(std::string_view bytes);
// The byte value a code point stands for, or -1 if it is not one of the 256 characters.
int byte_of_char(char32_t code_point);
// Inverse of encode for a token string: its characters as bytes. A token holding a character
// outside the alphabet (an added token such as "<|begin_of_text|>" is spelled in plain text) is
// taken as its own bytes, as the Hugging Face ByteLevel decoder does.
std::string decode_token(std::string_view token);

}  // namespace freqkv::byte_level
