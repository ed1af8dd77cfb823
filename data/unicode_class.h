// The three Unicode character classes the pre-tokenization patterns distinguish: letters (\p{L}),
// numbers (\p{N}) and whitespace (\s), everything else being "other".
#pragma once

namespace freqkv {

enum class CharClass { Letter, Number, Whitespace, Other };

// Class of a code point; utf8::kMalformed (a byte that is not UTF-8) is Other.
CharClass char_class(char32_t code_point);

inline bool is_letter(char32_t cp) { return char_class(cp) == CharClass::Letter; }
inline bool is_number(char32_t cp) { return char_class(cp) == CharClass::Number; }
inline bool is_whitespace(char32_t cp) { return char_class(cp) == CharClass::Whitespace; }

}  // namespace freqkv
