// Passkey retrieval (Mohtashami & Jaggi's landmark-attention test, as LongLoRA runs it): a pass
// key hidden at a chosen depth of repetitive filler text, then asked for.
//
//   There is an important info hidden inside a lot of irrelevant text. Find it and memorize
//   them. I will quiz you about the important information there.
//   The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
//   The pass key is 68302. Remember it. 68302 is the pass key.
//   ... (the filler continues where it stopped)
//   What is the pass key? The pass key is
//
// Unlike the original (a random depth, filler counted in characters) the depth is given and the
// length is counted in tokens of the model's tokenizer: the filler is cut at a word so that the
// whole prompt is as long as possible without exceeding the target (so it falls short of the
// target by less than one word's tokens), and the key line goes between two filler sentences,
// at the sentence boundary nearest to depth × the filler's words (depth 0: right after the task
// line; 1: right before the question).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace freqkv {

struct PasskeyPrompt {
  std::string text;
  std::vector<int32_t> tokens;   // text encoded, BOS first when asked for
  std::string passkey;
  int64_t filler_words = 0;      // words of filler in all
  int64_t words_before_key = 0;  // of them before the key line (a sentence boundary)
  // The key line's depth in tokens: tokens of filler before it / all filler tokens, measured on
  // the encoded prompt (the task line, the key line and the question excluded).
  double token_depth = 0;
};

// The prompt for a target length in tokens and a depth in [0, 1]. Throws std::invalid_argument
// for a depth outside [0, 1] or a target shorter than the prompt without filler (naming both).
PasskeyPrompt build_passkey_prompt(const Tokenizer& tokenizer, int64_t target_tokens,
                                   double depth, const std::string& passkey, bool add_bos);

// A 5-digit pass key (10000..99999) that depends only on its arguments.
std::string make_passkey(uint64_t seed, int64_t length, double depth, int64_t trial);

// The first run of ASCII digits in text ("" if none): the model's answer.
std::string first_digit_run(const std::string& text);

}  // namespace freqkv
