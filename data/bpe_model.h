// The BPE model of a Hugging Face tokenizer.json: a vocabulary, merges applied by rank, and what
// becomes of characters outside the vocabulary (their bytes' <0xXX> tokens, or an unknown token).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace freqkv {

class BpeModel {
 public:
  struct Options {
    int32_t unk_id = -1;         // id of model.unk_token; -1: none
    bool fuse_unk = false;       // a run of unknown characters becomes one unknown token
    bool byte_fallback = false;  // unknown characters become their UTF-8 bytes' <0xXX> tokens
    bool ignore_merges = false;  // a word that is a token of its own is taken whole (LLaMA-3)
  };

  // merges in rank order (the first merges first). source names the file in error messages.
  // Throws std::runtime_error naming the merge when one of its tokens or their concatenation is
  // not in the vocabulary.
  BpeModel(std::unordered_map<std::string, int32_t> vocab,
           const std::vector<std::pair<std::string, std::string>>& merges, Options options,
           std::string source);

  // Appends the ids of one pre-tokenized word: its characters as tokens, then repeatedly the
  // adjacent pair with the lowest-ranked merge (the leftmost among equals) merged, until no pair
  // has a merge. Throws std::runtime_error naming the character when one is not in the
  // vocabulary and neither byte fallback nor an unknown token covers it.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  const std::unordered_map<std::string, int32_t>& vocab() const { return vocab_; }
  int32_t token_id(const std::string& token) const;  // -1 if not in the vocabulary

 private:
  struct Merge {
    uint32_t rank;
    int32_t merged_id;
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  const Merge* find_merge(int32_t left, int32_t right) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t byte_token_ids_[256];  // <0xXX> token of each byte value, -1 where absent
  Options options_;
  std::string source_;
};

}  // namespace freqkv
