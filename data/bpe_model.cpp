#include "data/bpe_model.h"

#include <cstdio>
#include <functional>
#include <queue>
#include <stdexcept>

#include "data/utf8.h"

namespace freqkv {

BpeModel::BpeModel(std::unordered_map<std::string, int32_t> vocab,
                   const std::vector<std::pair<std::string, std::string>>& merges, Options options,
                   std::string source)
    : vocab_(std::move(vocab)), options_(options), source_(std::move(source)) {
  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    const auto describe_merge = [&] {
      return source_ + ": merge #" + std::to_string(rank) + " ('" + left + "', '" + right + "')";
    };
    const int32_t left_id = token_id(left);
    const int32_t right_id = token_id(right);
    const int32_t merged_id = token_id(left + right);
    if (left_id < 0 || right_id < 0 || merged_id < 0) {
      const std::string& missing = left_id < 0 ? left : right_id < 0 ? right : left + right;
      throw std::runtime_error(describe_merge() + " uses '" + missing +
                               "', which is not in model.vocab");
    }
    // A pair listed twice keeps its first (lowest) rank.
    merges_.emplace(pair_key(left_id, right_id), Merge{static_cast<uint32_t>(rank), merged_id});
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    byte_token_ids_[b] = token_id(name);
  }
}

int32_t BpeModel::token_id(const std::string& token) const {
  const auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}

const BpeModel::Merge* BpeModel::find_merge(int32_t left, int32_t right) const {
  const auto it = merges_.find(pair_key(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    const auto whole = vocab_.find(std::string(word));
    if (whole != vocab_.end()) {
      out.push_back(whole->second);
      return;
    }
  }

  // The word as a doubly linked list of symbols, so a merge is O(1) wherever it happens.
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // -1 at the ends
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto add_symbol = [&](int32_t id) {
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, true});
    if (index > 0) symbols[index - 1].next = index;
  };
  for (size_t offset = 0; offset < word.size();) {
    const utf8::Char c = utf8::decode_at(word, offset);
    offset += c.size;
    const int32_t id = token_id(std::string(word.substr(c.offset, c.size)));
    if (id >= 0) {
      add_symbol(id);
      continue;
    }
    if (options_.byte_fallback) {
      bool every_byte_has_token = true;
      for (size_t i = c.offset; i < c.offset + c.size; ++i) {
        every_byte_has_token &= byte_token_ids_[static_cast<unsigned char>(word[i])] >= 0;
      }
      if (every_byte_has_token) {
        for (size_t i = c.offset; i < c.offset + c.size; ++i) {
          add_symbol(byte_token_ids_[static_cast<unsigned char>(word[i])]);
        }
        continue;
      }
    }
    if (options_.unk_id >= 0) {
      if (!(options_.fuse_unk && !symbols.empty() && symbols.back().id == options_.unk_id)) {
        add_symbol(options_.unk_id);
      }
      continue;
    }
    throw std::runtime_error(source_ + ": character " + utf8::describe(word, c) + " of word '" +
                             std::string(word) +
                             "' is not in model.vocab, and the model has neither byte_fallback "
                             "(with its <0xXX> tokens) nor an unk_token");
  }

  // Candidate merges ordered by rank, then position. A candidate goes stale when either symbol
  // takes part in another merge first; it is recognised on the way out by the pair no longer
  // being adjacent or no longer having this rank (ranks are unique per pair of ids).
  struct Candidate {
    uint32_t rank;
    int32_t left;
    int32_t right;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : left > other.left;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  const auto push_candidate = [&](int32_t left) {
    if (left < 0 || symbols[left].next < 0) return;
    const int32_t right = symbols[left].next;
    if (const Merge* merge = find_merge(symbols[left].id, symbols[right].id)) {
      queue.push({merge->rank, left, right});
    }
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_candidate(i);
  while (!queue.empty()) {
    const Candidate candidate = queue.top();
    queue.pop();
    Symbol& left = symbols[candidate.left];
    if (!left.alive || left.next != candidate.right) continue;
    Symbol& right = symbols[candidate.right];
    const Merge* merge = find_merge(left.id, right.id);
    if (merge == nullptr || merge->rank != candidate.rank) continue;
    left.id = merge->merged_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = candidate.left;
    push_candidate(left.prev);
    push_candidate(candidate.left);
  }
  for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
    out.push_back(symbols[i].id);
  }
}

}  // namespace freqkv
