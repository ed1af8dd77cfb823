// Tokenizers: UTF-8 decoding and character classes, the GPT-2 byte alphabet, the hand-written
// pre-tokenization scanners, byte-level BPE (LLaMA-3 / GPT-2 style) and SentencePiece-style BPE
// with byte fallback (LLaMA-2 style) read from tokenizer.json files the tests write, the byte
// vocabulary, and the errors of load_tokenizer.
#include "tests/test_support.h"
#include "data/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/byte_level.h"
#include "data/pretokenizer.h"
#include "data/unicode_class.h"
#include "data/utf8.h"

namespace freqkv {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Ids = std::vector<int32_t>;
using Words = std::vector<std::string>;

const std::string kLlama3Regex =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
const std::string kGpt2Regex =
    R"re('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)re";

// Texts every tokenizer must give back unchanged: ASCII, multi-byte UTF-8 (2, 3 and 4 bytes),
// whitespace runs, newlines, digits, contractions, tabs, control bytes.
const std::vector<std::string> kRoundTripTexts = {
    "hello world",
    "Hello, World! How are you?",
    "caf\u00e9 na\u00efve \u00e9t\u00e9",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u65e5\u672c",
    "emoji \U0001F600\U0001F680 and \U0001F44D\U0001F3FD",
    "  leading, inner   runs,\ttabs and trailing   ",
    "line one\nline two\r\n\n\nafter blank lines\n",
    "12345 1234567 3.14159 2024-06-01",
    "it's I'm we're they've he'll she'd DON'T",
    "\x01\x02\x7f control bytes",
    "",
};

fs::path make_test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir =
      fs::path(::testing::TempDir()) / ("freqkv_tokenizer_" + std::string(info->test_suite_name()) +
                                        "_" + info->name() + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

fs::path write_json(const fs::path& path, const json& value) {
  write_text(path, value.dump(2));
  return path;
}

// GPT-2's bytes_to_unicode, written out independently of data/byte_level.cpp: printable Latin-1
// bytes stand for themselves, the other 68 take U+0100, U+0101, ... in byte order.
std::string gpt2_char(int byte) {
  const auto printable = [](int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  };
  int code_point = byte;
  if (!printable(byte)) {
    code_point = 256;
    for (int b = 0; b < byte; ++b) code_point += printable(b) ? 0 : 1;
  }
  std::string out;  // every code point here is below U+0800: one or two UTF-8 bytes
  if (code_point < 0x80) {
    out.push_back(static_cast<char>(code_point));
  } else {
    out.push_back(static_cast<char>(0xC0 | (code_point >> 6)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  }
  return out;
}

json added_token(int id, const std::string& content, bool special = true) {
  return {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", special}};
}

// ---- the byte-level BPE fixture -----------------------------------------------------------------
// Tokens 0..255 are the bytes (spelled in the GPT-2 alphabet: "Ġ" is byte 32, id 32), then the
// results of the merges below, in rank order, then "Ġxyz" (reachable by no merge: only
// ignore_merges finds it), then ids 273..299 unused, then the added tokens 300 and 301.
const std::vector<std::pair<std::string, std::string>> kByteLevelMerges = {
    {"h", "e"},      // rank 0  -> "he"     256
    {"l", "l"},      // rank 1  -> "ll"     257
    {"he", "ll"},    // rank 2  -> "hell"   258
    {"hell", "o"},   // rank 3  -> "hello"  259
    {"Ġ", "w"},      // rank 4  -> "Ġw"     260
    {"o", "r"},      // rank 5  -> "or"     261
    {"Ġw", "or"},    // rank 6  -> "Ġwor"   262
    {"l", "d"},      // rank 7  -> "ld"     263
    {"Ġwor", "ld"},  // rank 8  -> "Ġworld" 264
    {"1", "2"},      // rank 9  -> "12"     265
    {"3", "4"},      // rank 10 -> "34"     266
    {"12", "3"},     // rank 11 -> "123"    267
    {"4", "5"},      // rank 12 -> "45"     268
    {"'", "s"},      // rank 13 -> "'s"     269
    {"Ġ", "Ġ"},      // rank 14 -> "ĠĠ"     270
    {"Ċ", "Ċ"},      // rank 15 -> "ĊĊ"     271
};
constexpr int32_t kHello = 259, kSpaceWorld = 264, kOr = 261, kLd = 263, k12 = 265, k34 = 266,
                  k123 = 267, k45 = 268, kHe = 256, kApostropheS = 269, kSpaceXyz = 272,
                  kBeginOfText = 300, kEndOfText = 301;

json byte_level_model(bool ignore_merges, bool merges_as_pairs) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[gpt2_char(b)] = b;
  json merges = json::array();
  int id = 256;
  for (const auto& [left, right] : kByteLevelMerges) {
    vocab[left + right] = id++;
    merges.push_back(merges_as_pairs ? json::array({left, right}) : json(left + " " + right));
  }
  vocab["Ġxyz"] = kSpaceXyz;
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", nullptr},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", false},
          {"byte_fallback", false},
          {"ignore_merges", ignore_merges},
          {"vocab", vocab},
          {"merges", merges}};
}

// LLaMA-3's layout: Split with its regex, then ByteLevel without a regex of its own; BOS from the
// post-processor's template; merges as [left, right] pairs.
json llama3_style_json() {
  const json begin_of_text = {{"id", "<|begin_of_text|>"}, {"type_id", 0}};
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", json::array({added_token(kBeginOfText, "<|begin_of_text|>"),
                                    added_token(kEndOfText, "<|end_of_text|>")})},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers", json::array({{{"type", "Split"},
                                        {"pattern", {{"Regex", kLlama3Regex}}},
                                        {"behavior", "Isolated"},
                                        {"invert", false}},
                                       {{"type", "ByteLevel"},
                                        {"add_prefix_space", false},
                                        {"trim_offsets", true},
                                        {"use_regex", false}}})}}},
      {"post_processor",
       {{"type", "Sequence"},
        {"processors",
         json::array({{{"type", "ByteLevel"},
                       {"add_prefix_space", true},
                       {"trim_offsets", false},
                       {"use_regex", true}},
                      {{"type", "TemplateProcessing"},
                       {"single", json::array({{{"SpecialToken", begin_of_text}},
                                               {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                       {"pair", json::array({{{"SpecialToken", begin_of_text}},
                                             {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                             {{"SpecialToken", begin_of_text}},
                                             {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
                       {"special_tokens",
                        {{"<|begin_of_text|>",
                          {{"id", "<|begin_of_text|>"},
                           {"ids", json::array({kBeginOfText})},
                           {"tokens", json::array({"<|begin_of_text|>"})}}}}}}})}}},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", true},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"model", byte_level_model(/*ignore_merges=*/true, /*merges_as_pairs=*/true)},
  };
}

// GPT-2's layout: ByteLevel with its built-in regex, no post-processor, "<|endoftext|>", merges as
// "left right" strings.
json gpt2_style_json() {
  return {
      {"version", "1.0"},
      {"added_tokens", json::array({added_token(kBeginOfText, "<|endoftext|>")})},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "ByteLevel"},
        {"add_prefix_space", false},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", true},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"model", byte_level_model(/*ignore_merges=*/false, /*merges_as_pairs=*/false)},
  };
}

// ---- the SentencePiece-style fixture ------------------------------------------------------------
// "<unk>" 0, "<s>" 1, "</s>" 2, "<0x00>".."<0xFF>" 3..258, then single characters, then the
// merge results. Letters other than h e l o w r d é exist only as byte fallback.
const std::vector<std::pair<std::string, std::string>> kSentencePieceMerges = {
    {"l", "l"},      // rank 0 -> "ll"      268
    {"▁", "h"},      // rank 1 -> "▁h"      269
    {"e", "ll"},     // rank 2 -> "ell"     270
    {"▁h", "ell"},   // rank 3 -> "▁hell"   271
    {"▁hell", "o"},  // rank 4 -> "▁hello"  272
    {"o", "r"},      // rank 5 -> "or"      273
    {"▁", "w"},      // rank 6 -> "▁w"      274
    {"▁w", "or"},    // rank 7 -> "▁wor"    275
    {"▁", "▁"},      // rank 8 -> "▁▁"      276
};
constexpr int32_t kSpUnk = 0, kSpBos = 1, kSpEos = 2, kSpMeta = 259, kSpL = 262, kSpD = 266,
                  kSpEAcute = 267, kSpMetaH = 269, kSpMetaHello = 272, kSpMetaWor = 275,
                  kSpMetaMeta = 276;
int32_t byte_token(unsigned char b) { return 3 + b; }

json sentencepiece_model() {
  json vocab = {{"<unk>", kSpUnk}, {"<s>", kSpBos}, {"</s>", kSpEos}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = byte_token(static_cast<unsigned char>(b));
  }
  int id = 259;
  for (const char* c : {"▁", "h", "e", "l", "o", "w", "r", "d", "\u00e9"}) vocab[c] = id++;
  json merges = json::array();
  for (const auto& [left, right] : kSentencePieceMerges) {
    vocab[left + right] = id++;
    merges.push_back(left + " " + right);
  }
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", "<unk>"},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", true},
          {"byte_fallback", true},
          {"vocab", vocab},
          {"merges", merges}};
}

// LLaMA-2's layout: normalizer Prepend "▁" + Replace " " -> "▁", no pre-tokenizer, template
// "<s> $A", decoder Replace / ByteFallback / Fuse / Strip.
json llama2_style_json() {
  const json bos = {{"id", "<s>"}, {"type_id", 0}};
  return {
      {"version", "1.0"},
      {"added_tokens", json::array({added_token(kSpUnk, "<unk>"), added_token(kSpBos, "<s>"),
                                    added_token(kSpEos, "</s>")})},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         json::array({{{"type", "Prepend"}, {"prepend", "▁"}},
                      {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}})}}},
      {"pre_tokenizer", nullptr},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         json::array({{{"SpecialToken", bos}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
        {"pair", json::array({{{"SpecialToken", bos}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"SpecialToken", bos}},
                              {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
        {"special_tokens",
         {{"<s>",
           {{"id", "<s>"}, {"ids", json::array({kSpBos})}, {"tokens", json::array({"<s>"})}}}}}}},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         json::array({{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
                      {{"type", "ByteFallback"}},
                      {{"type", "Fuse"}},
                      {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}})}}},
      {"model", sentencepiece_model()},
  };
}

// The older LLaMA-2 conversions: a Metaspace pre-tokenizer instead of the normalizer, and a
// Metaspace decoder.
json metaspace_style_json() {
  json file = llama2_style_json();
  file["normalizer"] = nullptr;
  file["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}, {"add_prefix_space", true}};
  file["decoder"] = {
      {"type", "Sequence"},
      {"decoders",
       json::array({{{"type", "Metaspace"}, {"replacement", "▁"}, {"add_prefix_space", true}},
                    {{"type", "ByteFallback"}},
                    {{"type", "Fuse"}}})}};
  return file;
}

std::unique_ptr<Tokenizer> load_json(const json& file, const std::string& name = "tokenizer.json") {
  return load_tokenizer(write_json(make_test_dir() / name, file).string());
}

std::string all_bytes() {
  std::string text;
  for (int b = 0; b < 256; ++b) text.push_back(static_cast<char>(b));
  return text;
}

// ---- UTF-8, character classes, the byte alphabet ------------------------------------------------

TEST(Utf8, DecodesWellFormedAndMalformedBytes) {
  const std::string text = "a\u00e9\u65e5\U0001F600";
  const std::vector<utf8::Char> chars = utf8::decode(text);
  ASSERT_EQ(chars.size(), 4u);
  EXPECT_EQ(chars[0].value, U'a');
  EXPECT_EQ(chars[1].value, U'\u00e9');
  EXPECT_EQ(chars[1].size, 2u);
  EXPECT_EQ(chars[2].value, U'\u65e5');
  EXPECT_EQ(chars[2].size, 3u);
  EXPECT_EQ(chars[3].value, U'\U0001F600');
  EXPECT_EQ(chars[3].offset, 6u);
  EXPECT_EQ(utf8::encode(U'\U0001F600'), "\U0001F600");

  // A stray continuation byte, a truncated sequence, an overlong '/', an encoded surrogate: each
  // byte is one malformed character, so nothing is lost.
  for (const std::string bad : {"\x80", "\xE6\x97", "\xC0\xAF", "\xED\xA0\x80"}) {
    const std::vector<utf8::Char> decoded = utf8::decode(bad);
    ASSERT_EQ(decoded.size(), bad.size()) << "input of " << bad.size() << " bytes";
    for (const utf8::Char& c : decoded) {
      EXPECT_EQ(c.value, utf8::kMalformed);
      EXPECT_EQ(c.size, 1u);
    }
  }
  EXPECT_EQ(utf8::describe("\xFF", utf8::decode("\xFF")[0]), "byte 0xFF");
}

TEST(UnicodeClass, LettersNumbersWhitespace) {
  for (char32_t letter :
       {U'a', U'Z', U'\u00e9', U'\u03a9', U'\u0436', U'\u05d0', U'\u0628', U'\u0915', U'\u0e01',
        U'\u3042', U'\u30ab', U'\u65e5', U'\uac00', U'\U00020000'}) {
    EXPECT_EQ(char_class(letter), CharClass::Letter) << std::hex << static_cast<uint32_t>(letter);
  }
  for (char32_t number : {U'0', U'9', U'\u00b2', U'\u0663', U'\u0967', U'\u2167', U'\uff11'}) {
    EXPECT_EQ(char_class(number), CharClass::Number) << std::hex << static_cast<uint32_t>(number);
  }
  for (char32_t space :
       {U' ', U'\t', U'\n', U'\r', U'\v', U'\f', U'\u0085', U'\u00a0', U'\u2003', U'\u3000'}) {
    EXPECT_EQ(char_class(space), CharClass::Whitespace) << std::hex << static_cast<uint32_t>(space);
  }
  for (char32_t other : {U'!', U'\'', U'_', U'\u00b7', U'\u0301', U'\u093e', U'\u3002',
                         U'\U0001F600', utf8::kMalformed}) {
    EXPECT_EQ(char_class(other), CharClass::Other) << std::hex << static_cast<uint32_t>(other);
  }
}

TEST(ByteLevelAlphabet, MatchesGpt2) {
  EXPECT_EQ(byte_level::char_of_byte(' '), "\u0120");   // Ġ
  EXPECT_EQ(byte_level::char_of_byte('\n'), "\u010a");  // Ċ
  EXPECT_EQ(byte_level::char_of_byte('A'), "A");
  EXPECT_EQ(byte_level::char_of_byte(0xAD), "\u0143");  // the soft hyphen is not printable
  for (int b = 0; b < 256; ++b) {
    const std::string spelled = byte_level::char_of_byte(static_cast<unsigned char>(b));
    EXPECT_EQ(spelled, gpt2_char(b)) << "byte " << b;
    EXPECT_EQ(byte_level::decode_token(spelled), std::string(1, static_cast<char>(b)));
  }
  EXPECT_EQ(byte_level::encode("a b\n"), "a\u0120b\u010a");
  // A token outside the alphabet (an added token) is its own bytes.
  EXPECT_EQ(byte_level::decode_token("\u65e5"), "\u65e5");
}

// ---- pre-tokenization scanners ------------------------------------------------------------------

TEST(SplitPattern, RecognisesKnownRegexesOnly) {
  EXPECT_EQ(find_split_pattern(kLlama3Regex), SplitPattern::Llama3);
  EXPECT_EQ(find_split_pattern(kGpt2Regex), SplitPattern::Gpt2);
  EXPECT_FALSE(find_split_pattern("\\s+").has_value());
  EXPECT_FALSE(find_split_pattern(kLlama3Regex + " ").has_value());
}

TEST(SplitPattern, Llama3Pieces) {
  // "!" and "," are not letters, so they do not join the following word unless a letter follows
  // right away; the lone space before digits is left alone (\s+ as the last resort); digits go
  // in groups of three from the left; "'m" is a contraction.
  EXPECT_EQ(split_words("Hello, world! 12345 I'm", SplitPattern::Llama3),
            (Words{"Hello", ",", " world", "!", " ", "123", "45", " I", "'m"}));
  EXPECT_EQ(split_words("1234567", SplitPattern::Llama3), (Words{"123", "456", "7"}));
  // Contractions are case-insensitive.
  EXPECT_EQ(split_words("HE'S", SplitPattern::Llama3), (Words{"HE", "'S"}));
  // \s+(?!\S): a run of spaces keeps its last space for the next word.
  EXPECT_EQ(split_words("a   b", SplitPattern::Llama3), (Words{"a", "  ", " b"}));
  // \s*[\r\n]+: whitespace up to and including the last newline of the run.
  EXPECT_EQ(split_words("a\n\nb", SplitPattern::Llama3), (Words{"a", "\n\n", "b"}));
  EXPECT_EQ(split_words("x \n y", SplitPattern::Llama3), (Words{"x", " \n", " y"}));
  // Punctuation takes the newlines after it.
  EXPECT_EQ(split_words("!!!\n\nok", SplitPattern::Llama3), (Words{"!!!\n\n", "ok"}));
  // Any one non-letter, non-digit, non-newline character may lead a word: a tab, a quote.
  EXPECT_EQ(split_words("\tword \"quoted\"", SplitPattern::Llama3),
            (Words{"\tword", " \"", "quoted", "\""}));
  // Trailing whitespace stays one piece; CJK characters are letters.
  EXPECT_EQ(split_words("end   ", SplitPattern::Llama3), (Words{"end", "   "}));
  EXPECT_EQ(split_words("\u65e5\u672c\u8a9e text", SplitPattern::Llama3),
            (Words{"\u65e5\u672c\u8a9e", " text"}));
  EXPECT_EQ(split_words("caf\u00e9s", SplitPattern::Llama3), (Words{"caf\u00e9s"}));
  EXPECT_TRUE(split_words("", SplitPattern::Llama3).empty());
}

TEST(SplitPattern, Gpt2Pieces) {
  // One optional space before letters, digits (any number of them) or punctuation.
  EXPECT_EQ(split_words("Hello, world! 12345 I'm", SplitPattern::Gpt2),
            (Words{"Hello", ",", " world", "!", " 12345", " I", "'m"}));
  // Contractions are case-sensitive.
  EXPECT_EQ(split_words("HE'S", SplitPattern::Gpt2), (Words{"HE", "'", "S"}));
  EXPECT_EQ(split_words("a   b", SplitPattern::Gpt2), (Words{"a", "  ", " b"}));
  // No newline rule: "\n\n" before a letter keeps its last "\n" for itself (\s+).
  EXPECT_EQ(split_words("a\n\nb", SplitPattern::Gpt2), (Words{"a", "\n", "\n", "b"}));
  EXPECT_EQ(split_words("\tword", SplitPattern::Gpt2), (Words{"\t", "word"}));
}

TEST(SplitPattern, Qwen2SingleDigits) {
  EXPECT_EQ(split_words("12345", SplitPattern::Qwen2), (Words{"1", "2", "3", "4", "5"}));
  EXPECT_EQ(split_words("I'm 42", SplitPattern::Qwen2), (Words{"I", "'m", " ", "4", "2"}));
}

// ---- byte-level BPE -----------------------------------------------------------------------------

TEST(ByteLevelBpe, HandWorkedMerges) {
  const auto tokenizer = load_json(llama3_style_json());
  // "hello world" -> words "hello", " world" -> in the byte alphabet "hello", "Ġworld".
  // "hello":  h e l l o  -(rank 0 h+e)-> he l l o  -(1 l+l)-> he ll o  -(2)-> hell o  -(3)-> hello
  // "Ġworld": Ġ w o r l d  -(4 Ġ+w)-> Ġw o r l d  -(5 o+r)-> Ġw or l d  -(6)-> Ġwor l d
  //           -(7 l+d)-> Ġwor ld  -(8)-> Ġworld
  EXPECT_EQ(tokenizer->encode("hello world", false), (Ids{kHello, kSpaceWorld}));
  EXPECT_EQ(tokenizer->encode("hello world", true), (Ids{kBeginOfText, kHello, kSpaceWorld}));
  // "world" without its space: w o r l d. Ranks decide, not positions: "o r" (5) merges before
  // "l d" (7), and "Ġw"/"Ġwor" never apply: w, or, ld.
  EXPECT_EQ(tokenizer->encode("world", false), (Ids{'w', kOr, kLd}));
  // "hellohello" is one word: both halves merge the same way.
  EXPECT_EQ(tokenizer->encode("hellohello", false), (Ids{kHello, kHello}));
  // Whitespace: "a   b" -> "a", "  " (Ġ Ġ -> ĠĠ, 270), " b" (Ġ b: no merge).
  EXPECT_EQ(tokenizer->encode("a   b", false), (Ids{'a', 270, ' ', 'b'}));
  // "\n\n" is one word and merges (Ċ Ċ -> ĊĊ, 271).
  EXPECT_EQ(tokenizer->encode("a\n\nb", false), (Ids{'a', 271, 'b'}));
}

TEST(ByteLevelBpe, DigitGroupsOfThree) {
  const auto llama3 = load_json(llama3_style_json());
  // LLaMA-3 splits "12345" into "123" (1 2 3 -(9)-> 12 3 -(11)-> 123) and "45" (-(12)-> 45).
  EXPECT_EQ(llama3->encode("12345", false), (Ids{k123, k45}));
  // "1234567": "123", "456" (4 5 6 -(12)-> 45 6), "7".
  EXPECT_EQ(llama3->encode("1234567", false), (Ids{k123, k45, '6', '7'}));
  // GPT-2 keeps "12345" whole: 1 2 3 4 5 -(9)-> 12 3 4 5; now "3 4" (10) outranks "12 3" (11):
  // 12 34 5, and nothing merges further.
  const auto gpt2 = load_json(gpt2_style_json());
  EXPECT_EQ(gpt2->encode("12345", false), (Ids{k12, k34, '5'}));
}

TEST(ByteLevelBpe, ContractionsAndIgnoreMerges) {
  const auto llama3 = load_json(llama3_style_json());
  // "he's" -> "he" (rank 0) and the contraction "'s" (rank 13).
  EXPECT_EQ(llama3->encode("he's", false), (Ids{kHe, kApostropheS}));
  // LLaMA-3 files set ignore_merges: the word "Ġxyz" is a token, taken whole although no merge
  // builds it. GPT-2 (no ignore_merges) spells it byte by byte.
  EXPECT_EQ(llama3->encode(" xyz", false), (Ids{kSpaceXyz}));
  const auto gpt2 = load_json(gpt2_style_json());
  EXPECT_EQ(gpt2->encode(" xyz", false), (Ids{' ', 'x', 'y', 'z'}));
}

TEST(ByteLevelBpe, SpecialTokensInText) {
  const auto tokenizer = load_json(llama3_style_json());
  const Ids ids = tokenizer->encode("<|begin_of_text|>hello<|end_of_text|> world", false);
  EXPECT_EQ(ids, (Ids{kBeginOfText, kHello, kEndOfText, kSpaceWorld}));
  EXPECT_EQ(tokenizer->decode(ids), "hello world");
  EXPECT_EQ(tokenizer->decode(ids, /*skip_special_tokens=*/false),
            "<|begin_of_text|>hello<|end_of_text|> world");
  // An incomplete special token is plain text.
  EXPECT_EQ(tokenizer->decode(tokenizer->encode("<|begin_of", false)), "<|begin_of");
  EXPECT_EQ(tokenizer->encode("<|begin_of", false).size(), 10u);
  EXPECT_TRUE(tokenizer->is_special(kBeginOfText));
  EXPECT_FALSE(tokenizer->is_special(kHello));
}

TEST(ByteLevelBpe, RoundTrips) {
  for (const json& file : {llama3_style_json(), gpt2_style_json()}) {
    const auto tokenizer = load_json(file);
    for (const std::string& text : kRoundTripTexts) {
      EXPECT_EQ(tokenizer->decode(tokenizer->encode(text, true)), text) << tokenizer->description();
    }
  }
}

TEST(ByteLevelBpe, EveryByteRoundTrips) {
  for (const json& file : {llama3_style_json(), gpt2_style_json()}) {
    const auto tokenizer = load_json(file);
    for (int b = 0; b < 256; ++b) {
      const std::string text(1, static_cast<char>(b));
      const Ids ids = tokenizer->encode(text, false);
      // A single byte is a single word of one character of the alphabet: token id b.
      EXPECT_EQ(ids, (Ids{b})) << "byte " << b;
      EXPECT_EQ(tokenizer->decode(ids), text) << "byte " << b;
    }
    // All bytes at once, malformed UTF-8 included.
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(all_bytes(), false)), all_bytes());
  }
}

TEST(ByteLevelBpe, BosEosFromConfigTemplateAndNames) {
  // Without tokenizer_config.json: BOS from the template, EOS by its usual name.
  const auto llama3 = load_json(llama3_style_json());
  EXPECT_EQ(llama3->bos_id(), kBeginOfText);
  EXPECT_EQ(llama3->eos_id(), kEndOfText);
  EXPECT_EQ(llama3->vocab_size(), 302);

  // tokenizer_config.json beside tokenizer.json decides (strings or {"content": ...} objects).
  const fs::path dir = make_test_dir();
  write_json(dir / "tokenizer.json", llama3_style_json());
  write_json(dir / "tokenizer_config.json",
             {{"bos_token", "<|begin_of_text|>"},
              {"eos_token", {{"content", "hello"}, {"__type", "AddedToken"}}}});
  const auto configured = load_tokenizer(dir.string());
  EXPECT_EQ(configured->bos_id(), kBeginOfText);
  EXPECT_EQ(configured->eos_id(), kHello);
  EXPECT_TRUE(configured->is_special(kHello));  // so decode() drops it like any EOS

  // GPT-2: no template and no BOS name, so no BOS; add_bos then adds nothing.
  const auto gpt2 = load_json(gpt2_style_json());
  EXPECT_EQ(gpt2->bos_id(), -1);
  EXPECT_EQ(gpt2->eos_id(), kBeginOfText);  // "<|endoftext|>" has id 300 in this fixture
  EXPECT_EQ(gpt2->encode("hello", true), (Ids{kHello}));
}

TEST(ByteLevelBpe, TokenTextAndIds) {
  const auto tokenizer = load_json(llama3_style_json());
  EXPECT_EQ(tokenizer->token_text(kSpaceWorld), "\u0120world");
  EXPECT_EQ(tokenizer->token_text(kEndOfText), "<|end_of_text|>");
  EXPECT_EQ(tokenizer->token_id("\u0120world"), kSpaceWorld);
  EXPECT_EQ(tokenizer->token_id("<|begin_of_text|>"), kBeginOfText);
  EXPECT_EQ(tokenizer->token_id("no such token"), -1);
  // Ids 273..299 hold no token; 302 is past the end.
  expect_error<std::out_of_range>([&] { tokenizer->token_text(280); }, {"280", "tokenizer.json"});
  expect_error<std::out_of_range>([&] { tokenizer->decode({kHello, 302}); }, {"302", "position 1"});
}

// ---- SentencePiece-style BPE with byte fallback -------------------------------------------------

TEST(SentencePieceBpe, HandWorkedMerges) {
  const auto tokenizer = load_json(llama2_style_json());
  // "hello world" -> normalized "▁hello▁world", one word: ▁ h e l l o ▁ w o r l d
  //   -(0 l+l)-> ▁ h e ll o ▁ w o r l d  -(1 ▁+h)-> ▁h e ll o ...  -(2 e+ll)-> ▁h ell o ...
  //   -(3)-> ▁hell o ...  -(4)-> ▁hello ▁ w o r l d  -(5 o+r)-> ▁hello ▁ w or l d
  //   -(6 ▁+w)-> ▁hello ▁w or l d  -(7)-> ▁hello ▁wor l d   ("l d" has no merge here)
  EXPECT_EQ(tokenizer->encode("hello world", false), (Ids{kSpMetaHello, kSpMetaWor, kSpL, kSpD}));
  EXPECT_EQ(tokenizer->encode("hello world", true),
            (Ids{kSpBos, kSpMetaHello, kSpMetaWor, kSpL, kSpD}));
  // " hello" -> "▁▁hello": "▁ ▁" (rank 8) loses to "▁ h" (rank 1) on the second ▁, after which
  // the first ▁ has nothing to merge with: ▁ ▁hello.
  EXPECT_EQ(tokenizer->encode(" hello", false), (Ids{kSpMeta, kSpMetaHello}));
  // "  " -> "▁▁▁": the leftmost of the equal-ranked pairs merges first: ▁▁ ▁.
  EXPECT_EQ(tokenizer->encode("  ", false), (Ids{kSpMetaMeta, kSpMeta}));
  // "hé" -> "▁hé": ▁ h é -(1)-> ▁h é; é is in the vocabulary.
  EXPECT_EQ(tokenizer->encode("h\u00e9", false), (Ids{kSpMetaH, kSpEAcute}));
  EXPECT_EQ(tokenizer->bos_id(), kSpBos);
  EXPECT_EQ(tokenizer->eos_id(), kSpEos);
}

TEST(SentencePieceBpe, ByteFallback) {
  const auto tokenizer = load_json(llama2_style_json());
  // "日本" -> "▁日本"; 日 (E6 97 A5) and 本 (E6 9C AC) are not in the vocabulary: their bytes.
  EXPECT_EQ(tokenizer->encode("\u65e5\u672c", false),
            (Ids{kSpMeta, byte_token(0xE6), byte_token(0x97), byte_token(0xA5), byte_token(0xE6),
                 byte_token(0x9C), byte_token(0xAC)}));
  // "a\nb" -> "▁a\nb": a, \n and b are bytes too.
  EXPECT_EQ(tokenizer->encode("a\nb", false),
            (Ids{kSpMeta, byte_token('a'), byte_token('\n'), byte_token('b')}));
  EXPECT_EQ(tokenizer->token_text(byte_token('\n')), "<0x0A>");
}

TEST(SentencePieceBpe, RoundTrips) {
  const auto tokenizer = load_json(llama2_style_json());
  for (const std::string& text : kRoundTripTexts) {
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(text, true)), text);
  }
}

TEST(SentencePieceBpe, EveryByteRoundTrips) {
  const auto tokenizer = load_json(llama2_style_json());
  for (int b = 0; b < 256; ++b) {
    const std::string text(1, static_cast<char>(b));
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(text, false)), text) << "byte " << b;
  }
  EXPECT_EQ(tokenizer->encode(std::string(1, '\xFF'), false), (Ids{kSpMeta, byte_token(0xFF)}));
  EXPECT_EQ(tokenizer->decode(tokenizer->encode(all_bytes(), false)), all_bytes());
}

TEST(SentencePieceBpe, SpecialTokensInText) {
  const auto tokenizer = load_json(llama2_style_json());
  // Special tokens are cut out first; the text between them is normalized on its own, so it
  // gains its own "▁" (as in Hugging Face's LLaMA-2 tokenizer).
  const Ids ids = tokenizer->encode("<s>hello</s>", false);
  EXPECT_EQ(ids, (Ids{kSpBos, kSpMetaHello, kSpEos}));
  EXPECT_EQ(tokenizer->decode(ids), "hello");
  // Kept, "<s>" leads the fused text, so Strip has no leading space to take: the "▁" added to
  // "hello" shows (Hugging Face decodes this to the same text).
  EXPECT_EQ(tokenizer->decode(ids, /*skip_special_tokens=*/false), "<s> hello</s>");
}

TEST(SentencePieceBpe, LegacyMetaspacePreTokenizer) {
  const auto legacy = load_json(metaspace_style_json());
  // Words "▁hello" and "▁world": the same ids as the normalizer form for this text.
  EXPECT_EQ(legacy->encode("hello world", false), (Ids{kSpMetaHello, kSpMetaWor, kSpL, kSpD}));
  for (const std::string text : {"hello world", "caf\u00e9 \u65e5\u672c", "a\nb  c"}) {
    EXPECT_EQ(legacy->decode(legacy->encode(text, true)), text);
  }
}

// ---- the byte vocabulary ------------------------------------------------------------------------

TEST(ByteVocabulary, WrapsByteVocab) {
  const auto tokenizer = load_tokenizer("bytes");
  EXPECT_EQ(tokenizer->bos_id(), 256);
  EXPECT_EQ(tokenizer->eos_id(), 257);
  EXPECT_EQ(tokenizer->vocab_size(), 258);
  EXPECT_EQ(tokenizer->encode("hi", true), (Ids{256, 'h', 'i'}));
  EXPECT_EQ(tokenizer->encode("hi", false), (Ids{'h', 'i'}));
  EXPECT_EQ(tokenizer->decode({256, 'h', 'i', 257}), "hi");
  EXPECT_EQ(tokenizer->decode({256, 'h', 'i', 257}, false), "<bos>hi<eos>");
  EXPECT_EQ(tokenizer->token_text('A'), "A");
  EXPECT_EQ(tokenizer->token_text('\n'), "<0x0A>");
  EXPECT_EQ(tokenizer->token_id("<eos>"), 257);
  EXPECT_EQ(tokenizer->token_id("<0xFF>"), 255);
  for (const std::string& text : kRoundTripTexts) {
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(text, true)), text);
  }
  EXPECT_EQ(tokenizer->decode(tokenizer->encode(all_bytes(), false)), all_bytes());
  expect_error<std::out_of_range>([&] { tokenizer->decode({'a', 258}); }, {"258", "position 1"});
}

// ---- loading and errors -------------------------------------------------------------------------

TEST(LoadTokenizer, DirectoryOrFile) {
  const fs::path dir = make_test_dir();
  const fs::path file = write_json(dir / "tokenizer.json", llama2_style_json());
  const auto from_dir = load_tokenizer(dir.string());
  const auto from_file = load_tokenizer(file.string());
  EXPECT_EQ(from_dir->encode("hello", true), from_file->encode("hello", true));
  EXPECT_NE(from_file->description().find(file.string()), std::string::npos);
}

TEST(TokenizerErrors, MissingFiles) {
  const fs::path dir = make_test_dir();
  expect_error<std::runtime_error>([&] { load_tokenizer((dir / "nowhere").string()); },
                                   {(dir / "nowhere").string(), "does not exist", "bytes"});
  write_text(dir / "tokenizer.model", "not read");
  expect_error<std::runtime_error>([&] { load_tokenizer(dir.string()); },
                                   {dir.string(), "no tokenizer.json", "tokenizer.model"});
}

TEST(TokenizerErrors, BadJson) {
  const fs::path dir = make_test_dir();
  write_text(dir / "tokenizer.json", "{\"model\": {\"type\": \"BPE\",");
  expect_error<std::runtime_error>([&] { load_tokenizer(dir.string()); },
                                   {(dir / "tokenizer.json").string(), "not valid JSON"});
  write_text(dir / "tokenizer.json", "[1, 2]");
  expect_error<std::runtime_error>([&] { load_tokenizer(dir.string()); },
                                   {"tokenizer.json", "expected an object"});
}

TEST(TokenizerErrors, UnsupportedModelType) {
  json file = llama2_style_json();
  file["model"] = {{"type", "Unigram"}, {"unk_id", 0}, {"vocab", json::array()}};
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"tokenizer.json", "model.type", "'Unigram' is not supported"});
  file["model"] = {{"type", "WordPiece"}, {"vocab", json::object()}};
  expect_error<std::runtime_error>([&] { load_json(file); }, {"'WordPiece' is not supported"});
}

TEST(TokenizerErrors, UnknownSplitPattern) {
  json file = llama3_style_json();
  file["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+|\\s+";
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"tokenizer.json", "pre_tokenizer.pretokenizers[0].pattern",
                                    "unknown Split regex", "\\\\w+|\\\\s+", "LLaMA-3"});
  file = llama3_style_json();
  file["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
  expect_error<std::runtime_error>([&] { load_json(file); }, {"behavior", "'Removed'"});
}

TEST(TokenizerErrors, UnsupportedComponents) {
  json file = llama2_style_json();
  file["normalizer"] = {{"type", "NFKC"}};
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"tokenizer.json", "normalizer", "'NFKC' is not supported"});
  file = llama2_style_json();
  file["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"pre-tokenizer type 'Whitespace' is not supported"});
  file = llama2_style_json();
  file["decoder"] = {{"type", "WordPiece"}, {"prefix", "##"}};
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"decoder type 'WordPiece' is not supported"});
  file = llama2_style_json();
  file["post_processor"] = {{"type", "BertProcessing"}};
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"post-processor type 'BertProcessing' is not supported"});
  file = llama2_style_json();
  file["model"]["dropout"] = 0.1;
  expect_error<std::runtime_error>([&] { load_json(file); }, {"model.dropout"});
}

TEST(TokenizerErrors, InconsistentVocabulary) {
  json file = llama2_style_json();
  file["model"]["merges"].push_back("▁ zz");
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"tokenizer.json", "merge #9", "'zz'", "not in model.vocab"});
  file = llama2_style_json();
  file["model"]["merges"][0] = "l l l";
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"model.merges[0]", "two tokens separated by one space"});
  file = llama2_style_json();
  file["model"]["unk_token"] = "<unknown>";
  expect_error<std::runtime_error>([&] { load_json(file); },
                                   {"model.unk_token", "'<unknown>' is not in model.vocab"});
  // tokenizer_config.json naming a token the vocabulary does not have.
  const fs::path dir = make_test_dir();
  write_json(dir / "tokenizer.json", llama2_style_json());
  write_json(dir / "tokenizer_config.json", {{"eos_token", "<|eot_id|>"}});
  expect_error<std::runtime_error>([&] { load_tokenizer(dir.string()); },
                                   {"tokenizer_config.json", "eos_token", "'<|eot_id|>'"});
}

TEST(TokenizerErrors, CharacterWithoutToken) {
  // A BPE with neither byte fallback nor an unknown token cannot spell "b".
  const json file = {
      {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}}}, {"merges", json::array()}}}};
  const auto tokenizer = load_json(file);
  EXPECT_EQ(tokenizer->encode("aa", false), (Ids{0, 0}));
  expect_error<std::runtime_error>(
      [&] { tokenizer->encode("ab", false); },
      {"tokenizer.json", "U+0062", "'ab'", "byte_fallback", "unk_token"});
  // With an unknown token (and fuse_unk), a run of unknown characters is one <unk>.
  const json with_unk = {{"model",
                          {{"type", "BPE"},
                           {"vocab", {{"<unk>", 0}, {"a", 1}}},
                           {"merges", json::array()},
                           {"unk_token", "<unk>"},
                           {"fuse_unk", true}}}};
  EXPECT_EQ(load_json(with_unk)->encode("abca", false), (Ids{1, 0, 1}));
}

}  // namespace
}  // namespace freqkv
