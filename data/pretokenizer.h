// Pre-tokenization: cutting normalized text into the words that BPE merges within, as the
// Hugging Face pre-tokenizers "Split" (for the regexes of GPT-2, LLaMA-3 and Qwen2), "ByteLevel"
// and "Metaspace" do.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace freqkv {

// The Split regexes this code knows. std::regex has no \p{L}, so each is a hand-written scanner
// over code points with the regex's semantics (leftmost alternative first, greedy with
// backtracking); a tokenizer.json with any other regex is rejected rather than split differently.
enum class SplitPattern {
  Gpt2,    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  Llama3,  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
           //  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  Qwen2,   // LLaMA-3's with \p{N} (numbers one digit at a time) instead of \p{N}{1,3}
};

// Receives words one at a time; the view lasts only for the call.
using WordSink = std::function<void(std::string_view word)>;

// The pattern whose regex text is exactly regex, if known.
std::optional<SplitPattern> find_split_pattern(const std::string& regex);
// Cuts text into the regex's consecutive matches, in order; together they are text again.
void for_each_word(std::string_view text, SplitPattern pattern, const WordSink& emit);
std::vector<std::string> split_words(std::string_view text, SplitPattern pattern);

// Where Metaspace puts its replacement character in front of a piece.
enum class PrependScheme { Always, First, Never };

struct SplitStep {  // "Split" with behavior "Isolated": every match is a word
  SplitPattern pattern;
};
struct ByteLevelStep {    // "ByteLevel": optional GPT-2 split, then bytes -> GPT-2 alphabet
  bool add_prefix_space;  // a space in front of each piece not starting with one
  bool use_regex;         // split with the GPT-2 pattern first
};
struct MetaspaceStep {      // "Metaspace": spaces -> replacement, then cut before each replacement
  std::string replacement;  // normally "▁" (U+2581)
  PrependScheme prepend;    // First: only the piece at the very start of the text
  bool split;
};
using PreTokenizerStep = std::variant<SplitStep, ByteLevelStep, MetaspaceStep>;

// Cuts text by each step in turn and passes the non-empty words of the last to emit, one at a time
// (a whole document is never held as words). at_text_start: text begins at offset 0 of what is
// being encoded (where Metaspace's "first" scheme prepends). No steps: text is one word.
void pre_tokenize(std::string_view text, bool at_text_start,
                  const std::vector<PreTokenizerStep>& steps, const WordSink& emit);

}  // namespace freqkv
