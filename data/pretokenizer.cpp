#include "data/pretokenizer.h"

#include "data/byte_level.h"
#include "data/string_util.h"
#include "data/unicode_class.h"
#include "data/utf8.h"

namespace freqkv {

namespace {

const std::string kGpt2Regex =
    R"re('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)re";
const std::string kLlama3Regex =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
const std::string kQwen2Regex =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";

// The alternatives of the patterns over UTF-8 text, decoded as they go (no copy of the text, so a
// long document costs no more memory than its bytes). Positions are byte offsets at character
// boundaries; each alternative returns where its match starting at i ends (i: no match).
class Scanner {
 public:
  explicit Scanner(std::string_view text) : text_(text) {}

  size_t size() const { return text_.size(); }

  // 's|'t|'re|'ve|'m|'ll|'d, case-insensitively for (?i:...). Only the ASCII apostrophe counts.
  size_t contraction(size_t i, bool ignore_case) const {
    if (text_[i] != '\'') return i;
    static const char* const kSuffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    for (const char* suffix : kSuffixes) {
      size_t j = i + 1;
      const char* s = suffix;
      for (; *s != '\0' && j < size(); ++s) {
        const Next c = at(j);
        if (!same_letter(c.cp, *s, ignore_case)) break;
        j = c.end;
      }
      if (*s == '\0') return j;
    }
    return i;
  }

  // One or more characters of class cls, greedily, preceded by one optional ' ' ( ?X+).
  size_t optional_space_then_run(size_t i, CharClass cls) const {
    const Next first = at(i);
    if (first.cls == cls) return run_end(i, cls);
    if (first.cp == ' ' && first.end < size() && at(first.end).cls == cls) {
      return run_end(first.end, cls);
    }
    return i;
  }

  // [^\r\n\p{L}\p{N}]?\p{L}+
  size_t optional_non_newline_then_letters(size_t i) const {
    const Next first = at(i);
    if (first.cls == CharClass::Letter) return run_end(i, CharClass::Letter);
    const bool prefix_allowed =
        first.cp != '\r' && first.cp != '\n' && first.cls != CharClass::Number;
    if (prefix_allowed && first.end < size() && at(first.end).cls == CharClass::Letter) {
      return run_end(first.end, CharClass::Letter);
    }
    return i;
  }

  // \p{N}{1,max_digits}
  size_t numbers(size_t i, size_t max_digits) const {
    for (size_t count = 0; count < max_digits && i < size(); ++count) {
      const Next c = at(i);
      if (c.cls != CharClass::Number) break;
      i = c.end;
    }
    return i;
  }

  // ' ?[^\s\p{L}\p{N}]+' followed by [\r\n]* when newlines_after
  size_t optional_space_then_others(size_t i, bool newlines_after) const {
    size_t j = optional_space_then_run(i, CharClass::Other);
    if (j == i || !newlines_after) return j;
    while (j < size() && (text_[j] == '\r' || text_[j] == '\n')) ++j;
    return j;
  }

  // \s*[\r\n]+ : the greedy \s* backs off to the last newline of the whitespace run, and [\r\n]+
  // then takes that newline (no newline follows it inside the run).
  size_t whitespace_through_last_newline(size_t i) const {
    size_t after_last_newline = i;
    for (size_t j = i; j < size();) {
      const Next c = at(j);
      if (c.cls != CharClass::Whitespace) break;
      if (c.cp == '\r' || c.cp == '\n') after_last_newline = c.end;
      j = c.end;
    }
    return after_last_newline;
  }

  // \s+(?!\S)|\s+ : the whole whitespace run at the end of the text; before a non-space, all
  // of it but its last character (which then leads the next word), unless that is all of it.
  size_t whitespace(size_t i) const {
    size_t end = i, last_start = i, count = 0;
    while (end < size()) {
      const Next c = at(end);
      if (c.cls != CharClass::Whitespace) break;
      last_start = end;
      end = c.end;
      ++count;
    }
    return end == size() || count < 2 ? end : last_start;
  }

 private:
  struct Next {
    char32_t cp;
    CharClass cls;
    size_t end;  // byte offset just after the character
  };

  Next at(size_t i) const {
    const utf8::Char c = utf8::decode_at(text_, i);
    return {c.value, char_class(c.value), i + c.size};
  }

  size_t run_end(size_t i, CharClass cls) const {
    while (i < size()) {
      const Next c = at(i);
      if (c.cls != cls) break;
      i = c.end;
    }
    return i;
  }

  static bool same_letter(char32_t c, char lower_ascii, bool ignore_case) {
    if (c == static_cast<char32_t>(lower_ascii)) return true;
    if (!ignore_case) return false;
    if (c == static_cast<char32_t>(lower_ascii - 'a' + 'A')) return true;
    // Unicode simple case folding maps LATIN SMALL LETTER LONG S (U+017F) to 's'.
    return lower_ascii == 's' && c == 0x17F;
  }

  std::string_view text_;
};

// End of the match at byte i; every character is a letter, number, whitespace or other, so some
// alternative always matches and the end is past i.
size_t gpt2_match_end(const Scanner& s, size_t i) {
  size_t end = s.contraction(i, /*ignore_case=*/false);
  if (end == i) end = s.optional_space_then_run(i, CharClass::Letter);
  if (end == i) end = s.optional_space_then_run(i, CharClass::Number);
  if (end == i) end = s.optional_space_then_others(i, /*newlines_after=*/false);
  if (end == i) end = s.whitespace(i);
  return end;
}

size_t llama3_match_end(const Scanner& s, size_t i, size_t max_digits) {
  size_t end = s.contraction(i, /*ignore_case=*/true);
  if (end == i) end = s.optional_non_newline_then_letters(i);
  if (end == i) end = s.numbers(i, max_digits);
  if (end == i) end = s.optional_space_then_others(i, /*newlines_after=*/true);
  if (end == i) end = s.whitespace_through_last_newline(i);
  if (end == i) end = s.whitespace(i);
  return end;
}

// Passes text through steps[index], steps[index + 1], ... and the words that come out of the last
// one to emit. at_text_start: text begins at offset 0 of what is being encoded.
void run_steps(const std::vector<PreTokenizerStep>& steps, size_t index, std::string_view text,
               bool at_text_start, const WordSink& emit) {
  if (text.empty()) return;
  if (index == steps.size()) {
    emit(text);
    return;
  }
  bool first = true;  // only the first piece of a piece at the text's start is at its start
  const auto next = [&](std::string_view piece) {
    run_steps(steps, index + 1, piece, at_text_start && first, emit);
    first = false;
  };
  const PreTokenizerStep& step = steps[index];
  if (const auto* split = std::get_if<SplitStep>(&step)) {
    for_each_word(text, split->pattern, next);
  } else if (const auto* byte_step = std::get_if<ByteLevelStep>(&step)) {
    std::string prefixed;
    if (byte_step->add_prefix_space && !starts_with(text, " ")) {
      prefixed = " " + std::string(text);
      text = prefixed;
    }
    const auto to_alphabet = [&](std::string_view word) { next(byte_level::encode(word)); };
    if (byte_step->use_regex) {
      for_each_word(text, SplitPattern::Gpt2, to_alphabet);
    } else {
      to_alphabet(text);
    }
  } else {
    const auto& metaspace = std::get<MetaspaceStep>(step);
    std::string replaced = replace_all(text, " ", metaspace.replacement);
    const bool prepend = metaspace.prepend == PrependScheme::Always ||
                         (metaspace.prepend == PrependScheme::First && at_text_start);
    if (prepend && !starts_with(replaced, metaspace.replacement)) {
      replaced.insert(0, metaspace.replacement);
    }
    const std::string_view whole = replaced;
    if (!metaspace.split) {
      next(whole);
      return;
    }
    // Hugging Face's MergedWithNext: each replacement character begins a new piece.
    size_t start = 0;
    for (size_t hit = whole.find(metaspace.replacement, 1); hit != std::string_view::npos;
         hit = whole.find(metaspace.replacement, hit + metaspace.replacement.size())) {
      next(whole.substr(start, hit - start));
      start = hit;
    }
    next(whole.substr(start));
  }
}

}  // namespace

std::optional<SplitPattern> find_split_pattern(const std::string& regex) {
  if (regex == kGpt2Regex) return SplitPattern::Gpt2;
  if (regex == kLlama3Regex) return SplitPattern::Llama3;
  if (regex == kQwen2Regex) return SplitPattern::Qwen2;
  return std::nullopt;
}

void for_each_word(std::string_view text, SplitPattern pattern, const WordSink& emit) {
  const Scanner scanner(text);
  for (size_t i = 0; i < scanner.size();) {
    size_t end = i;
    switch (pattern) {
      case SplitPattern::Gpt2: end = gpt2_match_end(scanner, i); break;
      case SplitPattern::Llama3: end = llama3_match_end(scanner, i, 3); break;
      case SplitPattern::Qwen2: end = llama3_match_end(scanner, i, 1); break;
    }
    emit(text.substr(i, end - i));
    i = end;
  }
}

std::vector<std::string> split_words(std::string_view text, SplitPattern pattern) {
  std::vector<std::string> words;
  for_each_word(text, pattern, [&](std::string_view word) { words.emplace_back(word); });
  return words;
}

void pre_tokenize(std::string_view text, bool at_text_start,
                  const std::vector<PreTokenizerStep>& steps, const WordSink& emit) {
  run_steps(steps, 0, text, at_text_start, emit);
}

}  // namespace freqkv
