// Flat little-endian token arrays without a header (as llm.c-style and FreqKV data tools write
// them), memory-mapped for random access.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace freqkv {

enum class TokenDType { U16, U32, I32 };

// "uint16", "uint32" or "int32"; anything else throws std::invalid_argument listing those.
TokenDType parse_token_dtype(const std::string& name);
const char* token_dtype_name(TokenDType dtype);  // the name parse_token_dtype accepts
int64_t token_dtype_size(TokenDType dtype);      // bytes per token

class TokenFile {
 public:
  // Throws std::runtime_error for a missing/unreadable file or a size that is not a whole number of
  // tokens. An empty file is a valid file of zero tokens.
  static TokenFile open(const std::string& path, TokenDType dtype);

  int64_t size() const { return token_count_; }  // in tokens
  TokenDType dtype() const { return dtype_; }
  const std::string& path() const;

  // Token i; throws std::out_of_range outside [0, size()) and std::runtime_error for a uint32
  // value above INT32_MAX.
  int32_t at(int64_t i) const;
  // Tokens [start, start + n) into out, with the same checks as at().
  void read(int64_t start, int64_t n, int32_t* out) const;

 private:
  struct Mapping;  // the mmap, shared by copies of this TokenFile

  TokenFile() = default;

  std::shared_ptr<const Mapping> mapping_;
  TokenDType dtype_ = TokenDType::U16;
  int64_t token_count_ = 0;
};

// Writes tokens as a flat array of dtype (path + ".tmp", then rename). Throws
// std::invalid_argument naming the index and value of a token that does not fit the dtype.
void write_token_file(const std::string& path, const std::vector<int32_t>& tokens,
                      TokenDType dtype);

}  // namespace freqkv
