#include "data/tokenizer.h"

#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include "data/byte_vocab.h"
#include "data/hf_tokenizer.h"

namespace freqkv {

namespace {

// data/byte_vocab.h behind the Tokenizer interface: token b is byte b, then BOS and EOS.
class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(const std::string& text, bool add_bos) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() + 1);
    if (add_bos) ids.push_back(ByteVocab::kBos);
    const std::vector<int32_t> bytes = ByteVocab::encode(text);
    ids.insert(ids.end(), bytes.begin(), bytes.end());
    return ids;
  }

  int32_t bos_id() const override { return ByteVocab::kBos; }
  int32_t eos_id() const override { return ByteVocab::kEos; }
  int64_t vocab_size() const override { return ByteVocab::kSize; }

  // Printable ASCII as itself, other bytes as "<0xXX>" (SentencePiece's spelling), so the text of
  // a token is always readable.
  std::string token_text(int32_t id) const override {
    check_id(id, -1);
    if (id == ByteVocab::kBos) return "<bos>";
    if (id == ByteVocab::kEos) return "<eos>";
    if (id >= 0x20 && id <= 0x7E) return std::string(1, static_cast<char>(id));
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", static_cast<unsigned>(id));
    return name;
  }

  int32_t token_id(const std::string& text) const override {
    for (int32_t id = 0; id < ByteVocab::kSize; ++id) {
      if (token_text(id) == text) return id;
    }
    return -1;
  }

  bool is_special(int32_t id) const override {
    return id == ByteVocab::kBos || id == ByteVocab::kEos;
  }

  std::string description() const override {
    return "byte-level vocabulary 'bytes' (bytes 0-255, BOS 256, EOS 257)";
  }

 protected:
  std::string decode_ids(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::string text;
    text.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      check_id(ids[i], static_cast<int64_t>(i));
      if (is_special(ids[i])) {
        if (!skip_special_tokens) text += token_text(ids[i]);
      } else {
        text.push_back(static_cast<char>(ids[i]));
      }
    }
    return text;
  }

 private:
  // position: index in the decoded ids, -1 for a single id.
  void check_id(int32_t id, int64_t position) const {
    if (id >= 0 && id < ByteVocab::kSize) return;
    throw std::out_of_range(description() + ": token id " + std::to_string(id) +
                            (position >= 0 ? " at position " + std::to_string(position) : "") +
                            " is outside [0, " + std::to_string(ByteVocab::kSize) + ")");
  }
};

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& source) {
  namespace fs = std::filesystem;
  if (source == "bytes") return std::make_unique<ByteTokenizer>();
  const fs::path path(source);
  std::error_code error;
  if (fs::is_directory(path, error)) {
    const fs::path json_path = path / "tokenizer.json";
    if (!fs::exists(json_path, error)) {
      const bool has_sentencepiece_model = fs::exists(path / "tokenizer.model", error);
      throw std::runtime_error(
          "tokenizer directory '" + source + "' has no tokenizer.json" +
          (has_sentencepiece_model
               ? " (it has a SentencePiece tokenizer.model, which is not read: convert it with "
                 "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(...))"
               : ""));
    }
    return load_hf_tokenizer(json_path.string());
  }
  if (!fs::exists(path, error)) {
    throw std::runtime_error("tokenizer '" + source +
                             "' does not exist; give a directory holding tokenizer.json, the path "
                             "of a tokenizer.json, or 'bytes'");
  }
  return load_hf_tokenizer(source);
}

}  // namespace freqkv
