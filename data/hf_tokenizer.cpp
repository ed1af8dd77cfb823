#include "data/hf_tokenizer.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <variant>

#include <nlohmann/json.hpp>

#include "data/bpe_model.h"
#include "data/pretokenizer.h"
#include "data/string_util.h"
#include "data/token_decoder.h"
#include "data/unicode_class.h"
#include "data/utf8.h"

namespace freqkv {

namespace {

using json = nlohmann::json;

// ---- reading JSON with errors that name the file and the place in it ----------------------------

class JsonFile {
 public:
  explicit JsonFile(std::string path) : path_(std::move(path)) {}

  const std::string& path() const { return path_; }

  // where: the JSON path of the value at fault ("model.merges[3]"), empty for the whole file.
  [[noreturn]] void fail(const std::string& where, const std::string& problem) const {
    throw std::runtime_error("tokenizer file '" + path_ +
                             "': " + (where.empty() ? "" : where + ": ") + problem);
  }

  json parse() const {
    std::ifstream in(path_, std::ios::binary);
    if (!in) {
      throw std::runtime_error("cannot open tokenizer file '" + path_ +
                               "': " + std::strerror(errno));
    }
    std::ostringstream text;
    text << in.rdbuf();
    try {
      return json::parse(text.str());
    } catch (const json::parse_error& e) {
      throw std::runtime_error("tokenizer file '" + path_ + "' is not valid JSON: " + e.what());
    }
  }

  void require_object(const json& node, const std::string& where) const {
    if (!node.is_object())
      fail(where, "expected an object, found " + std::string(node.type_name()));
  }

  const json& member(const json& object, const std::string& key, const std::string& where) const {
    require_object(object, where);
    const auto it = object.find(key);
    if (it == object.end()) fail(where, "missing \"" + key + "\"");
    return *it;
  }

  // An optional member: nullptr when absent or null.
  const json* optional_member(const json& object, const std::string& key) const {
    const auto it = object.find(key);
    return it == object.end() || it->is_null() ? nullptr : &*it;
  }

  std::string string_member(const json& object, const std::string& key,
                            const std::string& where) const {
    const json& value = member(object, key, where);
    if (!value.is_string()) fail(where + "." + key, "expected a string");
    return value.get<std::string>();
  }

  bool bool_member(const json& object, const std::string& key, const std::string& where,
                   bool default_value) const {
    const json* value = optional_member(object, key);
    if (value == nullptr) return default_value;
    if (!value->is_boolean()) fail(where + "." + key, "expected true or false");
    return value->get<bool>();
  }

  int64_t int_member(const json& object, const std::string& key, const std::string& where,
                     int64_t min, int64_t max) const {
    const json& value = member(object, key, where);
    if (!value.is_number_integer()) fail(where + "." + key, "expected an integer");
    const int64_t n = value.get<int64_t>();
    if (n < min || n > max) {
      fail(where + "." + key, std::to_string(n) + " is outside [" + std::to_string(min) + ", " +
                                  std::to_string(max) + "]");
    }
    return n;
  }

  const json& array_member(const json& object, const std::string& key,
                           const std::string& where) const {
    const json& value = member(object, key, where);
    if (!value.is_array()) fail(where + "." + key, "expected an array");
    return value;
  }

  // The "type" of a component object (normalizer, pre-tokenizer, model, decoder, ...).
  std::string type_of(const json& node, const std::string& where) const {
    return string_member(node, "type", where);
  }

 private:
  std::string path_;
};

std::string element(const std::string& where, const std::string& key, size_t index) {
  return where + "." + key + "[" + std::to_string(index) + "]";
}

// {"String": "..."} patterns of Replace; Hugging Face's {"Regex": ...} form is refused as unsupported.
std::string string_pattern(const JsonFile& file, const json& node, const std::string& where) {
  const json& pattern = file.member(node, "pattern", where);
  file.require_object(pattern, where + ".pattern");
  if (const json* text = file.optional_member(pattern, "String"); text && text->is_string()) {
    return text->get<std::string>();
  }
  if (pattern.contains("Regex")) {
    file.fail(where + ".pattern", "a Regex pattern is not supported here, only {\"String\": ...}");
  }
  file.fail(where + ".pattern", "expected {\"String\": ...}");
}

// prepend_scheme ("always" | "first" | "never") of newer files, add_prefix_space of older ones.
PrependScheme prepend_scheme(const JsonFile& file, const json& node, const std::string& where) {
  if (const json* scheme = file.optional_member(node, "prepend_scheme")) {
    const std::string name = scheme->is_string() ? scheme->get<std::string>() : "";
    if (name == "always") return PrependScheme::Always;
    if (name == "first") return PrependScheme::First;
    if (name == "never") return PrependScheme::Never;
    file.fail(where + ".prepend_scheme", "expected \"always\", \"first\" or \"never\"");
  }
  return file.bool_member(node, "add_prefix_space", where, true) ? PrependScheme::Always
                                                                 : PrependScheme::Never;
}

// ---- normalizers --------------------------------------------------------------------------------

struct PrependNormalizer {  // prefix in front of non-empty text
  std::string prefix;
};
struct ReplaceNormalizer {  // every occurrence of pattern -> content
  std::string pattern, content;
};
using NormalizerStep = std::variant<PrependNormalizer, ReplaceNormalizer>;

void parse_normalizer(const JsonFile& file, const json& node, const std::string& where,
                      std::vector<NormalizerStep>& steps) {
  if (node.is_null()) return;
  const std::string type = file.type_of(node, where);
  if (type == "Sequence") {
    const json& children = file.array_member(node, "normalizers", where);
    for (size_t i = 0; i < children.size(); ++i) {
      parse_normalizer(file, children[i], element(where, "normalizers", i), steps);
    }
  } else if (type == "Prepend") {
    steps.push_back(PrependNormalizer{file.string_member(node, "prepend", where)});
  } else if (type == "Replace") {
    steps.push_back(ReplaceNormalizer{string_pattern(file, node, where),
                                      file.string_member(node, "content", where)});
  } else {
    file.fail(where, "normalizer type '" + type +
                         "' is not supported (supported: Sequence, Prepend, Replace)");
  }
}

std::string normalize(std::string text, const std::vector<NormalizerStep>& steps) {
  for (const NormalizerStep& step : steps) {
    if (const auto* prepend = std::get_if<PrependNormalizer>(&step)) {
      if (!text.empty()) text.insert(0, prepend->prefix);
    } else {
      const auto& replace = std::get<ReplaceNormalizer>(step);
      text = replace_all(text, replace.pattern, replace.content);
    }
  }
  return text;
}

// ---- pre-tokenizers -----------------------------------------------------------------------------

void parse_pre_tokenizer(const JsonFile& file, const json& node, const std::string& where,
                         std::vector<PreTokenizerStep>& steps) {
  if (node.is_null()) return;
  const std::string type = file.type_of(node, where);
  if (type == "Sequence") {
    const json& children = file.array_member(node, "pretokenizers", where);
    for (size_t i = 0; i < children.size(); ++i) {
      parse_pre_tokenizer(file, children[i], element(where, "pretokenizers", i), steps);
    }
  } else if (type == "Split") {
    const json& pattern = file.member(node, "pattern", where);
    file.require_object(pattern, where + ".pattern");
    const json* regex = file.optional_member(pattern, "Regex");
    if (regex == nullptr || !regex->is_string()) {
      file.fail(where + ".pattern",
                "only {\"Regex\": ...} Split patterns are supported, found " + pattern.dump());
    }
    const std::optional<SplitPattern> known = find_split_pattern(regex->get<std::string>());
    if (!known) {
      file.fail(where + ".pattern",
                "unknown Split regex " + regex->dump() +
                    "; the implemented ones are GPT-2's, LLaMA-3's and Qwen2's, matched exactly "
                    "(std::regex has no \\p{L}, so each is a hand-written scanner)");
    }
    const std::string behavior = file.string_member(node, "behavior", where);
    if (behavior != "Isolated") {
      file.fail(where + ".behavior", "'" + behavior + "' is not supported, only 'Isolated'");
    }
    if (file.bool_member(node, "invert", where, false)) {
      file.fail(where + ".invert", "an inverted Split is not supported");
    }
    steps.push_back(SplitStep{*known});
  } else if (type == "ByteLevel") {
    // Hugging Face's defaults for absent fields: add_prefix_space and use_regex both true.
    steps.push_back(ByteLevelStep{file.bool_member(node, "add_prefix_space", where, true),
                                  file.bool_member(node, "use_regex", where, true)});
  } else if (type == "Metaspace") {
    const json* replacement = file.optional_member(node, "replacement");
    steps.push_back(MetaspaceStep{
        replacement && replacement->is_string() ? replacement->get<std::string>()
                                                : std::string("\u2581"),
        prepend_scheme(file, node, where), file.bool_member(node, "split", where, true)});
  } else {
    file.fail(where, "pre-tokenizer type '" + type +
                         "' is not supported (supported: Sequence, Split, ByteLevel, Metaspace)");
  }
}

// ---- decoders -----------------------------------------------------------------------------------

void parse_decoder(const JsonFile& file, const json& node, const std::string& where,
                   std::vector<DecoderStep>& steps) {
  const std::string type = file.type_of(node, where);
  if (type == "Sequence") {
    const json& children = file.array_member(node, "decoders", where);
    for (size_t i = 0; i < children.size(); ++i) {
      parse_decoder(file, children[i], element(where, "decoders", i), steps);
    }
  } else if (type == "ByteLevel") {
    steps.push_back(ByteLevelDecoder{});
  } else if (type == "Replace") {
    steps.push_back(ReplaceDecoder{string_pattern(file, node, where),
                                   file.string_member(node, "content", where)});
  } else if (type == "ByteFallback") {
    steps.push_back(ByteFallbackDecoder{});
  } else if (type == "Fuse") {
    steps.push_back(FuseDecoder{});
  } else if (type == "Strip") {
    const int64_t max = std::numeric_limits<int32_t>::max();
    steps.push_back(
        StripDecoder{file.string_member(node, "content", where),
                     static_cast<size_t>(file.int_member(node, "start", where, 0, max)),
                     static_cast<size_t>(file.int_member(node, "stop", where, 0, max))});
  } else if (type == "Metaspace") {
    const json* replacement = file.optional_member(node, "replacement");
    steps.push_back(MetaspaceDecoder{replacement && replacement->is_string()
                                         ? replacement->get<std::string>()
                                         : std::string("\u2581"),
                                     prepend_scheme(file, node, where)});
  } else {
    file.fail(where, "decoder type '" + type +
                         "' is not supported (supported: Sequence, ByteLevel, Replace, "
                         "ByteFallback, Fuse, Strip, Metaspace)");
  }
}

// ---- the model ----------------------------------------------------------------------------------

BpeModel parse_model(const JsonFile& file, const json& node) {
  const std::string where = "model";
  file.require_object(node, where);
  // Files written by old versions of the library leave out the type of a BPE model.
  const std::string type =
      node.contains("type") ? file.type_of(node, where) : (node.contains("merges") ? "BPE" : "");
  if (type != "BPE") {
    file.fail(where + ".type", "model type '" + type +
                                   "' is not supported (only BPE: byte-level as in LLaMA-3 / "
                                   "GPT-2, or with byte_fallback as in LLaMA-2)");
  }
  if (const json* dropout = file.optional_member(node, "dropout");
      dropout && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    file.fail(where + ".dropout", "BPE dropout is not supported (it makes encoding random)");
  }
  for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json* value = file.optional_member(node, affix);
    if (value && !(value->is_string() && value->get<std::string>().empty())) {
      file.fail(where + "." + affix, "word prefixes/suffixes are not supported");
    }
  }

  const json& vocab_node = file.member(node, "vocab", where);
  file.require_object(vocab_node, where + ".vocab");
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(vocab_node.size());
  for (const auto& [token, id] : vocab_node.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      file.fail(where + ".vocab",
                "token '" + token + "' has id " + id.dump() + ", expected an integer in [0, 2^31)");
    }
    vocab.emplace(token, static_cast<int32_t>(id.get<int64_t>()));
  }

  // Merges are "left right" strings (split at the one space) or, in newer files, [left, right].
  std::vector<std::pair<std::string, std::string>> merges;
  if (file.optional_member(node, "merges") != nullptr) {
    const json& merges_node = file.array_member(node, "merges", where);
    merges.reserve(merges_node.size());
    for (size_t i = 0; i < merges_node.size(); ++i) {
      const json& merge = merges_node[i];
      if (merge.is_string()) {
        const std::string text = merge.get<std::string>();
        const size_t space = text.find(' ');
        if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
          file.fail(element(where, "merges", i),
                    "'" + text + "' is not two tokens separated by one space");
        }
        merges.emplace_back(text.substr(0, space), text.substr(space + 1));
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
                 merge[1].is_string()) {
        merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
      } else {
        file.fail(element(where, "merges", i),
                  "expected \"left right\" or [\"left\", \"right\"], found " + merge.dump());
      }
    }
  }

  BpeModel::Options options;
  if (const json* unk = file.optional_member(node, "unk_token")) {
    if (!unk->is_string()) file.fail(where + ".unk_token", "expected a string or null");
    const auto it = vocab.find(unk->get<std::string>());
    if (it == vocab.end()) {
      file.fail(where + ".unk_token", "'" + unk->get<std::string>() + "' is not in model.vocab");
    }
    options.unk_id = it->second;
  }
  options.fuse_unk = file.bool_member(node, "fuse_unk", where, false);
  options.byte_fallback = file.bool_member(node, "byte_fallback", where, false);
  options.ignore_merges = file.bool_member(node, "ignore_merges", where, false);
  return BpeModel(std::move(vocab), merges, options, "tokenizer file '" + file.path() + "'");
}

// ---- added tokens and the post-processor --------------------------------------------------------

struct AddedToken {
  std::string content;
  int32_t id;
  bool special;      // dropped by decode() unless asked for
  bool single_word;  // only matched with no letter, digit or '_' right before or after it
  bool lstrip;       // takes the whitespace before it
  bool rstrip;       // takes the whitespace after it
};

std::vector<AddedToken> parse_added_tokens(const JsonFile& file, const json& root) {
  std::vector<AddedToken> tokens;
  const json* list = file.optional_member(root, "added_tokens");
  if (list == nullptr) return tokens;
  if (!list->is_array()) file.fail("added_tokens", "expected an array");
  for (size_t i = 0; i < list->size(); ++i) {
    const json& node = (*list)[i];
    const std::string where = "added_tokens[" + std::to_string(i) + "]";
    AddedToken token;
    token.content = file.string_member(node, "content", where);
    if (token.content.empty()) file.fail(where + ".content", "an added token cannot be empty");
    token.id = static_cast<int32_t>(
        file.int_member(node, "id", where, 0, std::numeric_limits<int32_t>::max()));
    token.special = file.bool_member(node, "special", where, false);
    token.single_word = file.bool_member(node, "single_word", where, false);
    token.lstrip = file.bool_member(node, "lstrip", where, false);
    token.rstrip = file.bool_member(node, "rstrip", where, false);
    tokens.push_back(std::move(token));
  }
  return tokens;
}

// The special tokens a TemplateProcessing puts before and after a single sequence.
struct TemplateSpecials {
  int32_t leading_id = -1;
  int32_t trailing_id = -1;
};

// The id of the SpecialToken item at single[index] of the TemplateProcessing at where.
int32_t template_token_id(const JsonFile& file, const json& processor, size_t index,
                          const std::string& where) {
  const std::string item_where = where + ".single[" + std::to_string(index) + "]";
  const json& item = processor["single"][index];
  const std::string name = file.string_member(file.member(item, "SpecialToken", item_where), "id",
                                              item_where + ".SpecialToken");
  const json& entry = file.member(file.member(processor, "special_tokens", where), name,
                                  where + ".special_tokens");
  const std::string entry_where = where + ".special_tokens." + name;
  const json& ids = file.array_member(entry, "ids", entry_where);
  if (ids.size() != 1 || !ids[0].is_number_integer()) {
    file.fail(entry_where + ".ids", "expected exactly one integer id");
  }
  return ids[0].get<int32_t>();
}

void parse_post_processor(const JsonFile& file, const json& node, const std::string& where,
                          TemplateSpecials& specials) {
  if (node.is_null()) return;
  const std::string type = file.type_of(node, where);
  if (type == "Sequence") {
    const json& children = file.array_member(node, "processors", where);
    for (size_t i = 0; i < children.size(); ++i) {
      parse_post_processor(file, children[i], element(where, "processors", i), specials);
    }
  } else if (type == "TemplateProcessing") {
    const json& single = file.array_member(node, "single", where);
    if (!single.empty() && single.front().contains("SpecialToken")) {
      specials.leading_id = template_token_id(file, node, 0, where);
    }
    if (single.size() > 1 && single.back().contains("SpecialToken")) {
      specials.trailing_id = template_token_id(file, node, single.size() - 1, where);
    }
  } else if (type != "ByteLevel") {  // ByteLevel only adjusts offsets, which ids do not carry
    file.fail(where, "post-processor type '" + type +
                         "' is not supported (supported: Sequence, TemplateProcessing, ByteLevel)");
  }
}

// bos_token / eos_token of a tokenizer_config.json: a string, {"content": ...} or null.
std::optional<std::string> config_token(const JsonFile& file, const json& config,
                                        const std::string& key) {
  const json* value = file.optional_member(config, key);
  if (value == nullptr) return std::nullopt;
  if (value->is_string()) return value->get<std::string>();
  if (value->is_object()) return file.string_member(*value, "content", key);
  file.fail(key, "expected a string, {\"content\": ...} or null");
}

// ---- the tokenizer ------------------------------------------------------------------------------

bool is_word_char(char32_t cp) {
  const CharClass cls = char_class(cp);
  return cls == CharClass::Letter || cls == CharClass::Number || cp == '_';
}

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(std::string path, BpeModel model, std::vector<NormalizerStep> normalizers,
              std::vector<PreTokenizerStep> pre_tokenizers,
              std::optional<std::vector<DecoderStep>> decoder, std::vector<AddedToken> added)
      : path_(std::move(path)),
        model_(std::move(model)),
        normalizers_(std::move(normalizers)),
        pre_tokenizers_(std::move(pre_tokenizers)),
        decoder_(std::move(decoder)),
        added_(std::move(added)) {
    int64_t size = 0;
    for (const auto& [token, id] : model_.vocab()) size = std::max<int64_t>(size, id + 1);
    for (const AddedToken& token : added_) size = std::max<int64_t>(size, token.id + 1);
    id_to_token_.resize(static_cast<size_t>(size));
    has_token_.assign(static_cast<size_t>(size), 0);
    special_.assign(static_cast<size_t>(size), 0);
    for (const auto& [token, id] : model_.vocab()) {
      id_to_token_[id] = token;
      has_token_[id] = 1;
    }
    for (size_t i = 0; i < added_.size(); ++i) {
      const AddedToken& token = added_[i];
      id_to_token_[token.id] = token.content;
      has_token_[token.id] = 1;
      special_[token.id] = token.special;
      added_ids_[token.content] = token.id;
      added_by_first_byte_[static_cast<unsigned char>(token.content[0])].push_back(i);
    }
    // Longest first, so that of two added tokens matching at one place the longer one wins.
    for (std::vector<size_t>& candidates : added_by_first_byte_) {
      std::stable_sort(candidates.begin(), candidates.end(), [&](size_t a, size_t b) {
        return added_[a].content.size() > added_[b].content.size();
      });
    }

    kind_ = "BPE";
    for (const PreTokenizerStep& step : pre_tokenizers_) {
      if (std::holds_alternative<ByteLevelStep>(step)) kind_ = "byte-level BPE";
      if (std::holds_alternative<MetaspaceStep>(step)) kind_ = "SentencePiece-style BPE";
    }
    if (!normalizers_.empty() && kind_ == "BPE") kind_ = "SentencePiece-style BPE";
  }

  // BOS and EOS are special whatever added_tokens says, so decode() drops them.
  void set_bos_eos(int32_t bos, int32_t eos) {
    bos_ = bos;
    eos_ = eos;
    if (bos >= 0) special_[bos] = 1;
    if (eos >= 0) special_[eos] = 1;
  }

  std::vector<int32_t> encode(const std::string& text, bool add_bos) const override {
    std::vector<int32_t> ids;
    if (add_bos && bos_ >= 0) ids.push_back(bos_);
    size_t from = 0;
    while (const std::optional<AddedTokenMatch> match = find_added_token(text, from)) {
      encode_segment(text, from, match->begin, ids);
      ids.push_back(match->id);
      from = match->end;
    }
    encode_segment(text, from, text.size(), ids);
    return ids;
  }

  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }
  bool has_id(int32_t id) const { return id >= 0 && id < vocab_size() && has_token_[id] != 0; }

  std::string token_text(int32_t id) const override {
    check_id(id, -1);
    return id_to_token_[id];
  }

  int32_t token_id(const std::string& text) const override {
    const auto added = added_ids_.find(text);
    return added != added_ids_.end() ? added->second : model_.token_id(text);
  }

  bool is_special(int32_t id) const override {
    return id >= 0 && id < vocab_size() && special_[id] != 0;
  }

  std::string description() const override { return kind_ + " tokenizer '" + path_ + "'"; }

 protected:
  std::string decode_ids(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      check_id(ids[i], static_cast<int64_t>(i));
      if (skip_special_tokens && special_[ids[i]]) continue;
      tokens.push_back(id_to_token_[ids[i]]);
    }
    return decode_tokens(std::move(tokens), decoder_);
  }

 private:
  struct AddedTokenMatch {
    size_t begin, end;  // bytes of the text the token replaces, stripped whitespace included
    int32_t id;
  };

  // The first added token in text at or after byte from (the longest where several start at the
  // same place). Added tokens are matched in the raw text, before normalization, which is where
  // Hugging Face matches the ones marked normalized: false (all special tokens of LLaMA-2/3).
  std::optional<AddedTokenMatch> find_added_token(const std::string& text, size_t from) const {
    for (size_t i = from; i < text.size(); ++i) {
      for (size_t index : added_by_first_byte_[static_cast<unsigned char>(text[i])]) {
        const AddedToken& token = added_[index];
        if (text.compare(i, token.content.size(), token.content) != 0) continue;
        size_t begin = i;
        size_t end = i + token.content.size();
        if (token.single_word && (word_char_before(text, begin) || word_char_at(text, end))) {
          continue;
        }
        if (token.lstrip) begin = whitespace_run_start(text, from, begin);
        if (token.rstrip) end = whitespace_run_end(text, end);
        return AddedTokenMatch{begin, end, token.id};
      }
    }
    return std::nullopt;
  }

  static bool word_char_at(const std::string& text, size_t offset) {
    return offset < text.size() && is_word_char(utf8::decode_at(text, offset).value);
  }

  static bool word_char_before(const std::string& text, size_t offset) {
    if (offset == 0) return false;
    size_t start = offset - 1;  // back over continuation bytes to the character's first byte
    while (start > 0 && offset - start < 4 &&
           (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) {
      --start;
    }
    const utf8::Char c = utf8::decode_at(text, start);
    return start + c.size == offset && is_word_char(c.value);
  }

  // Start of the whitespace run that ends at byte end (end itself when there is none), not
  // before byte from.
  static size_t whitespace_run_start(const std::string& text, size_t from, size_t end) {
    size_t run_start = from;
    for (size_t offset = from; offset < end;) {
      const utf8::Char c = utf8::decode_at(text, offset);
      offset += c.size;
      if (!is_whitespace(c.value)) run_start = offset;
    }
    return run_start;
  }

  static size_t whitespace_run_end(const std::string& text, size_t offset) {
    while (offset < text.size()) {
      const utf8::Char c = utf8::decode_at(text, offset);
      if (!is_whitespace(c.value)) break;
      offset += c.size;
    }
    return offset;
  }

  // Text between added tokens: normalized, pre-tokenized, and each word through the BPE model.
  void encode_segment(const std::string& text, size_t begin, size_t end,
                      std::vector<int32_t>& ids) const {
    if (begin >= end) return;
    const std::string normalized = normalize(text.substr(begin, end - begin), normalizers_);
    pre_tokenize(normalized, /*at_text_start=*/begin == 0, pre_tokenizers_,
                 [&](std::string_view word) { model_.encode_word(word, ids); });
  }

  // position: index in the decoded ids, -1 for a single id.
  void check_id(int32_t id, int64_t position) const {
    if (has_id(id)) return;
    throw std::out_of_range(description() + ": token id " + std::to_string(id) +
                            (position >= 0 ? " at position " + std::to_string(position) : "") +
                            " is not in the vocabulary (size " + std::to_string(vocab_size()) +
                            ")");
  }

  std::string path_, kind_;
  BpeModel model_;
  std::vector<NormalizerStep> normalizers_;
  std::vector<PreTokenizerStep> pre_tokenizers_;
  std::optional<std::vector<DecoderStep>> decoder_;
  std::vector<AddedToken> added_;
  std::array<std::vector<size_t>, 256> added_by_first_byte_;  // indices into added_
  std::unordered_map<std::string, int32_t> added_ids_;
  std::vector<std::string> id_to_token_;
  std::vector<char> has_token_;  // ids may skip numbers
  std::vector<char> special_;
  int32_t bos_ = -1, eos_ = -1;
};

}  // namespace

namespace {

std::unique_ptr<Tokenizer> read_hf_tokenizer(const std::string& tokenizer_json_path) {
  const JsonFile file(tokenizer_json_path);
  const json root = file.parse();
  file.require_object(root, "");

  std::vector<NormalizerStep> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  std::optional<std::vector<DecoderStep>> decoder;
  TemplateSpecials template_specials;
  if (const json* node = file.optional_member(root, "normalizer")) {
    parse_normalizer(file, *node, "normalizer", normalizers);
  }
  if (const json* node = file.optional_member(root, "pre_tokenizer")) {
    parse_pre_tokenizer(file, *node, "pre_tokenizer", pre_tokenizers);
  }
  if (const json* node = file.optional_member(root, "decoder")) {
    decoder.emplace();
    parse_decoder(file, *node, "decoder", *decoder);
  }
  if (const json* node = file.optional_member(root, "post_processor")) {
    parse_post_processor(file, *node, "post_processor", template_specials);
  }
  BpeModel model = parse_model(file, file.member(root, "model", ""));
  auto tokenizer = std::make_unique<HfTokenizer>(
      tokenizer_json_path, std::move(model), std::move(normalizers), std::move(pre_tokenizers),
      std::move(decoder), parse_added_tokens(file, root));

  std::optional<std::string> config_bos, config_eos;
  const std::filesystem::path config_path =
      std::filesystem::path(tokenizer_json_path).parent_path() / "tokenizer_config.json";
  std::error_code error;
  const JsonFile config_file(config_path.string());
  if (std::filesystem::exists(config_path, error)) {
    const json config = config_file.parse();
    config_file.require_object(config, "");
    config_bos = config_token(config_file, config, "bos_token");
    config_eos = config_token(config_file, config, "eos_token");
  }
  const auto resolve = [&](const std::optional<std::string>& configured, const char* key,
                           int32_t from_template,
                           std::initializer_list<const char*> usual_names) -> int32_t {
    if (configured) {
      const int32_t id = tokenizer->token_id(*configured);
      if (id < 0) {
        config_file.fail(key,
                         "'" + *configured + "' is not a token of '" + tokenizer_json_path + "'");
      }
      return id;
    }
    if (from_template >= 0) return from_template;
    for (const char* name : usual_names) {
      if (const int32_t id = tokenizer->token_id(name); id >= 0) return id;
    }
    return -1;
  };
  const int32_t bos =
      resolve(config_bos, "bos_token", template_specials.leading_id, {"<|begin_of_text|>", "<s>"});
  const int32_t eos = resolve(config_eos, "eos_token", template_specials.trailing_id,
                              {"<|end_of_text|>", "</s>", "<|endoftext|>"});
  for (const int32_t id : {bos, eos}) {
    if (id >= 0 && !tokenizer->has_id(id)) {
      file.fail("post_processor", "special token id " + std::to_string(id) +
                                      " is not in the vocabulary (size " +
                                      std::to_string(tokenizer->vocab_size()) + ")");
    }
  }
  tokenizer->set_bos_eos(bos, eos);
  return tokenizer;
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& tokenizer_json_path) {
  // The parsers check the shapes they rely on and name what is wrong; this catches the rest of
  // nlohmann's type errors so that they too name the file.
  try {
    return read_hf_tokenizer(tokenizer_json_path);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("tokenizer file '" + tokenizer_json_path +
                             "': unexpected JSON structure: " + e.what());
  }
}

}  // namespace freqkv
