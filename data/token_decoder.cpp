#include "data/token_decoder.h"

#include "data/byte_level.h"
#include "data/string_util.h"

namespace freqkv {

namespace {

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

struct StepApplier {
  std::vector<std::string>& tokens;

  void operator()(const ByteLevelDecoder&) const {
    std::string bytes;
    for (const std::string& token : tokens) bytes += byte_level::decode_token(token);
    tokens.assign(1, std::move(bytes));
  }

  void operator()(const ReplaceDecoder& step) const {
    for (std::string& token : tokens) token = replace_all(token, step.pattern, step.content);
  }

  void operator()(const ByteFallbackDecoder&) const {
    // Exactly "<0x" two upper-case hex digits ">", the spelling of the byte fallback tokens.
    for (std::string& token : tokens) {
      if (token.size() != 6 || token.compare(0, 3, "<0x") != 0 || token[5] != '>') continue;
      const int high = hex_digit(token[3]);
      const int low = hex_digit(token[4]);
      if (high >= 0 && low >= 0) token.assign(1, static_cast<char>(high * 16 + low));
    }
  }

  void operator()(const FuseDecoder&) const {
    std::string fused;
    for (const std::string& token : tokens) fused += token;
    tokens.assign(1, std::move(fused));
  }

  void operator()(const StripDecoder& step) const {
    const size_t width = step.content.size();
    if (width == 0) return;
    for (std::string& token : tokens) {
      size_t begin = 0;
      for (size_t n = 0; n < step.start && token.compare(begin, width, step.content) == 0; ++n) {
        begin += width;
      }
      size_t end = token.size();
      for (size_t n = 0; n < step.stop && end >= begin + width &&
                         token.compare(end - width, width, step.content) == 0;
           ++n) {
        end -= width;
      }
      token = token.substr(begin, end - begin);
    }
  }

  void operator()(const MetaspaceDecoder& step) const {
    // As Hugging Face: in the first token every replacement character is dropped (it stands for
    // the space the pre-tokenizer prepended), elsewhere each becomes a space.
    for (size_t i = 0; i < tokens.size(); ++i) {
      const bool first = i == 0 && step.prepend != PrependScheme::Never;
      tokens[i] = replace_all(tokens[i], step.replacement, first ? "" : " ");
    }
  }
};

}  // namespace

std::string decode_tokens(std::vector<std::string> tokens,
                          const std::optional<std::vector<DecoderStep>>& decoder) {
  std::string text;
  if (!decoder) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) text += ' ';
      text += tokens[i];
    }
    return text;
  }
  for (const DecoderStep& step : *decoder) std::visit(StepApplier{tokens}, step);
  for (const std::string& token : tokens) text += token;
  return text;
}

}  // namespace freqkv
