#include "trainer/inference/passkey.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace freqkv {

namespace {

const char* const kTask =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there.";
const char* const kFiller =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const char* const kQuestion = "What is the pass key? The pass key is";

std::string key_line(const std::string& passkey) {
  return "The pass key is " + passkey + ". Remember it. " + passkey + " is the pass key.";
}

struct FillerWords {
  std::vector<std::string> words;           // one cycle of the filler
  std::vector<char> starts_sentence;        // per word of the cycle
};

const FillerWords& filler_words() {
  static const FillerWords filler = [] {
    FillerWords f;
    std::istringstream in(kFiller);
    std::string word;
    bool next_starts = true;
    while (in >> word) {
      f.words.push_back(word);
      f.starts_sentence.push_back(next_starts ? 1 : 0);
      next_starts = word.back() == '.';
    }
    return f;
  }();
  return filler;
}

// Filler words [begin, end) of the endless repetition, joined by spaces.
std::string filler_text(int64_t begin, int64_t end) {
  const FillerWords& f = filler_words();
  const int64_t cycle = static_cast<int64_t>(f.words.size());
  std::string text;
  for (int64_t i = begin; i < end; ++i) {
    if (i > begin) text += ' ';
    text += f.words[static_cast<size_t>(i % cycle)];
  }
  return text;
}

// The sentence boundary (a word index where a sentence starts, or the end) nearest to
// depth * n_words; ties go to the earlier one.
int64_t key_position(int64_t n_words, double depth) {
  const FillerWords& f = filler_words();
  const int64_t cycle = static_cast<int64_t>(f.words.size());
  const double wanted = depth * static_cast<double>(n_words);
  int64_t best = 0;
  for (int64_t i = 0; i <= n_words; ++i) {
    const bool boundary = i == n_words || f.starts_sentence[static_cast<size_t>(i % cycle)];
    if (boundary && std::fabs(static_cast<double>(i) - wanted) <
                        std::fabs(static_cast<double>(best) - wanted))
      best = i;
  }
  return best;
}

// The lines of the prompt, empty filler parts left out, joined by newlines.
std::string assemble(const std::string& passkey, int64_t n_words, int64_t before) {
  std::string text = kTask;
  if (before > 0) text += "\n" + filler_text(0, before);
  text += "\n" + key_line(passkey);
  if (n_words > before) text += "\n" + filler_text(before, n_words);
  return text + "\n" + kQuestion;
}

}  // namespace

PasskeyPrompt build_passkey_prompt(const Tokenizer& tokenizer, int64_t target_tokens,
                                   double depth, const std::string& passkey, bool add_bos) {
  if (!(depth >= 0.0 && depth <= 1.0))
    throw std::invalid_argument("passkey: depth must be in [0, 1], got " + std::to_string(depth));
  const auto length_with = [&](int64_t n_words) {
    return static_cast<int64_t>(
        tokenizer.encode(assemble(passkey, n_words, key_position(n_words, depth)), add_bos)
            .size());
  };
  const int64_t minimum = length_with(0);
  if (minimum > target_tokens)
    throw std::invalid_argument("passkey: a prompt of " + std::to_string(target_tokens) +
                                " tokens is too short: without any filler it already takes " +
                                std::to_string(minimum) + " tokens of the " +
                                tokenizer.description());
  // The most filler words that fit: an upper bound by doubling, then bisection. (Joining text
  // can merge tokens, so the length is not strictly monotone in the words: finish by stepping.)
  int64_t fits = 0, too_many = 1;
  while (length_with(too_many) <= target_tokens) {
    fits = too_many;
    too_many *= 2;
  }
  while (too_many - fits > 1) {
    const int64_t mid = fits + (too_many - fits) / 2;
    (length_with(mid) <= target_tokens ? fits : too_many) = mid;
  }
  while (length_with(fits + 1) <= target_tokens) ++fits;

  PasskeyPrompt prompt;
  prompt.passkey = passkey;
  prompt.filler_words = fits;
  prompt.words_before_key = key_position(fits, depth);
  prompt.text = assemble(passkey, fits, prompt.words_before_key);
  prompt.tokens = tokenizer.encode(prompt.text, add_bos);
  // Depth in tokens: encode the pieces before and after the key line.
  const int64_t before_tokens =
      prompt.words_before_key > 0
          ? static_cast<int64_t>(
                tokenizer.encode(filler_text(0, prompt.words_before_key), false).size())
          : 0;
  const int64_t after_tokens =
      fits > prompt.words_before_key
          ? static_cast<int64_t>(
                tokenizer.encode(filler_text(prompt.words_before_key, fits), false).size())
          : 0;
  prompt.token_depth = before_tokens + after_tokens > 0
                           ? static_cast<double>(before_tokens) /
                                 static_cast<double>(before_tokens + after_tokens)
                           : depth;
  return prompt;
}

std::string make_passkey(uint64_t seed, int64_t length, double depth, int64_t trial) {
  // Mix the arguments into one seed (splitmix64 steps), so that neighbouring cells differ.
  uint64_t state = seed;
  const auto mix = [&state](uint64_t value) {
    state += value + 0x9e3779b97f4a7c15ULL;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    state = z ^ (z >> 31);
  };
  mix(static_cast<uint64_t>(length));
  mix(static_cast<uint64_t>(std::llround(depth * 1e6)));
  mix(static_cast<uint64_t>(trial));
  return std::to_string(10000 + state % 90000);
}

std::string first_digit_run(const std::string& text) {
  size_t begin = 0;
  while (begin < text.size() && !(text[begin] >= '0' && text[begin] <= '9')) ++begin;
  size_t end = begin;
  while (end < text.size() && text[end] >= '0' && text[end] <= '9') ++end;
  return text.substr(begin, end - begin);
}

}  // namespace freqkv
