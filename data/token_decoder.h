// Decoders of a Hugging Face tokenizer.json: turning the token strings of ids back into text.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "data/pretokenizer.h"

namespace freqkv {

struct ByteLevelDecoder {};  // GPT-2 alphabet characters -> bytes
struct ReplaceDecoder {      // every occurrence of pattern -> content, in each token
  std::string pattern, content;
};
struct ByteFallbackDecoder {};  // a token "<0xXX>" -> the byte 0xXX
struct FuseDecoder {};          // all tokens -> one
struct StripDecoder {           // up to start leading / stop trailing `content` characters off
  std::string content;          // one character
  size_t start, stop;
};
struct MetaspaceDecoder {  // replacement -> ' ', and the first token loses its prepended one
  std::string replacement;
  PrependScheme prepend;
};
using DecoderStep = std::variant<ByteLevelDecoder, ReplaceDecoder, ByteFallbackDecoder, FuseDecoder,
                                 StripDecoder, MetaspaceDecoder>;

// The text of token strings: each step maps the list of tokens to a new list (Hugging Face's
// decode_chain), and the result is their concatenation. Without a decoder (nullopt) the tokens are
// joined with spaces, as Hugging Face does. Unlike Hugging Face, bytes that are not valid UTF-8
// are returned as they are rather than replaced by U+FFFD, so every byte string survives
// encode -> decode.
std::string decode_tokens(std::vector<std::string> tokens,
                          const std::optional<std::vector<DecoderStep>>& decoder);

}  // namespace freqkv
