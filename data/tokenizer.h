// Tokenizers: text <-> token ids, behind one interface. load_tokenizer() reads a Hugging Face
// tokenizer.json (byte-level BPE as in LLaMA-3 and GPT-2, or SentencePiece-style BPE with byte
// fallback as in LLaMA-2) or gives the byte-level vocabulary of data/byte_vocab.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace freqkv {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // The ids of text (any bytes; normally UTF-8). Special tokens spelled out in the text (such as
  // "<|begin_of_text|>") become their ids. add_bos: bos_id() first, when the tokenizer has one.
  // Throws std::runtime_error when a character cannot be represented at all (a vocabulary without
  // byte fallback or unknown token that lacks it).
  virtual std::vector<int32_t> encode(const std::string& text, bool add_bos) const = 0;

  // The text of ids. Special tokens (BOS, EOS, other special added tokens) are left out unless
  // skip_special_tokens is false. Bytes are returned as they are, so any text survives
  // encode -> decode. Throws std::out_of_range naming an id that is not in the vocabulary.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = true) const {
    return decode_ids(ids, skip_special_tokens);
  }

  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual int32_t eos_id() const = 0;  // -1 if none
  // One past the largest id (ids missing in between count too, as Hugging Face counts them).
  virtual int64_t vocab_size() const = 0;
  // The token as the vocabulary spells it (e.g. "Ġthe", "▁the", "<0x0A>", "<s>"). Throws
  // std::out_of_range for an id that is not in the vocabulary.
  virtual std::string token_text(int32_t id) const = 0;
  // The id of a token spelled exactly so in the vocabulary; -1 if there is none.
  virtual int32_t token_id(const std::string& token_text) const = 0;
  virtual bool is_special(int32_t id) const = 0;  // dropped by decode() by default
  // What was loaded, for messages: e.g. "byte-level BPE tokenizer '/m/tokenizer.json'".
  virtual std::string description() const = 0;

 protected:
  virtual std::string decode_ids(const std::vector<int32_t>& ids,
                                 bool skip_special_tokens) const = 0;
};

// source is "bytes" (the byte-level vocabulary: bytes 0..255, BOS 256, EOS 257), a directory
// holding tokenizer.json, or the path of a tokenizer.json. BOS and EOS of a tokenizer.json come
// from tokenizer_config.json beside it when it names them (bos_token, eos_token), else from the
// post_processor's template (its leading / trailing special token), else from the usual names
// ("<|begin_of_text|>", "<s>"; "<|end_of_text|>", "</s>", "<|endoftext|>").
// Throws std::runtime_error naming the file and the problem: missing file, invalid JSON, or a
// feature outside those implemented (a model other than BPE, an unknown normalizer,
// pre-tokenizer, Split regex, decoder or post-processor).
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& source);

}  // namespace freqkv
