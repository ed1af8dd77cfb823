#include "data/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <stdexcept>

// Tokens are stored little-endian and copied out of the mapping without byte swapping.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "freqkv's token files assume a little-endian host"
#endif

namespace freqkv {

TokenDType parse_token_dtype(const std::string& name) {
  if (name == "uint16") return TokenDType::U16;
  if (name == "uint32") return TokenDType::U32;
  if (name == "int32") return TokenDType::I32;
  throw std::invalid_argument("unknown token dtype '" + name +
                              "'; valid: uint16, uint32, int32");
}

const char* token_dtype_name(TokenDType dtype) {
  switch (dtype) {
    case TokenDType::U16: return "uint16";
    case TokenDType::U32: return "uint32";
    case TokenDType::I32: return "int32";
  }
  return "unknown";
}

int64_t token_dtype_size(TokenDType dtype) { return dtype == TokenDType::U16 ? 2 : 4; }

struct TokenFile::Mapping {
  std::string path;
  const unsigned char* data = nullptr;  // null for an empty file (mmap rejects length 0)
  uint64_t size = 0;

  Mapping(const std::string& file_path, uint64_t byte_count, int fd)
      : path(file_path), size(byte_count) {
    if (size == 0) return;
    void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapping == MAP_FAILED) {
      throw std::runtime_error("cannot mmap token file '" + path + "': " + std::strerror(errno));
    }
    data = static_cast<const unsigned char*>(mapping);
  }
  ~Mapping() {
    if (data) ::munmap(const_cast<unsigned char*>(data), size);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

TokenFile TokenFile::open(const std::string& path, TokenDType dtype) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw std::runtime_error("cannot open token file '" + path + "': " + std::strerror(errno));
  }
  struct stat info;
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    throw std::runtime_error("token file '" + path + "' is not a readable regular file");
  }
  const uint64_t bytes = static_cast<uint64_t>(info.st_size);
  const int64_t element_size = token_dtype_size(dtype);
  if (bytes % static_cast<uint64_t>(element_size) != 0) {
    ::close(fd);
    throw std::runtime_error("token file '" + path + "' is " + std::to_string(bytes) +
                             " bytes, not a multiple of " + std::to_string(element_size) +
                             " bytes per " + token_dtype_name(dtype) +
                             " token; wrong --dtype or a truncated file?");
  }
  TokenFile file;
  try {
    file.mapping_ = std::make_shared<const Mapping>(path, bytes, fd);
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);  // the mapping stays valid after the descriptor is closed
  file.dtype_ = dtype;
  file.token_count_ = static_cast<int64_t>(bytes) / element_size;
  return file;
}

const std::string& TokenFile::path() const {
  static const std::string no_path;
  return mapping_ ? mapping_->path : no_path;
}

int32_t TokenFile::at(int64_t i) const {
  int32_t token;
  read(i, 1, &token);
  return token;
}

void TokenFile::read(int64_t start, int64_t n, int32_t* out) const {
  if (start < 0 || n < 0 || start > token_count_ || n > token_count_ - start) {
    throw std::out_of_range("token file '" + path() + "': reading tokens [" +
                            std::to_string(start) + ", " + std::to_string(start + n) +
                            ") out of range; it holds " + std::to_string(token_count_) +
                            " tokens");
  }
  if (n == 0) return;
  const unsigned char* bytes = mapping_->data;
  switch (dtype_) {
    case TokenDType::U16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t value;
        std::memcpy(&value, bytes + (start + i) * 2, 2);
        out[i] = value;
      }
      break;
    case TokenDType::U32:
      for (int64_t i = 0; i < n; ++i) {
        uint32_t value;
        std::memcpy(&value, bytes + (start + i) * 4, 4);
        if (value > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
          throw std::runtime_error("token file '" + path() + "': token " +
                                   std::to_string(start + i) + " is " + std::to_string(value) +
                                   ", above INT32_MAX; not a valid token id");
        }
        out[i] = static_cast<int32_t>(value);
      }
      break;
    case TokenDType::I32:
      std::memcpy(out, bytes + start * 4, static_cast<size_t>(n) * 4);
      break;
  }
}

void write_token_file(const std::string& path, const std::vector<int32_t>& tokens,
                      TokenDType dtype) {
  const int64_t element_size = token_dtype_size(dtype);
  std::vector<unsigned char> bytes(tokens.size() * static_cast<size_t>(element_size));
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t token = tokens[i];
    if (dtype != TokenDType::I32 && token < 0) {
      throw std::invalid_argument("write_token_file '" + path + "': token " + std::to_string(i) +
                                  " is " + std::to_string(token) + ", negative, which " +
                                  token_dtype_name(dtype) + " cannot store");
    }
    if (dtype == TokenDType::U16) {
      if (token > std::numeric_limits<uint16_t>::max()) {
        throw std::invalid_argument("write_token_file '" + path + "': token " +
                                    std::to_string(i) + " is " + std::to_string(token) +
                                    ", above 65535, which uint16 cannot store");
      }
      const uint16_t value = static_cast<uint16_t>(token);
      std::memcpy(bytes.data() + i * 2, &value, 2);
    } else {
      std::memcpy(bytes.data() + i * 4, &token, 4);  // same bits for uint32 and int32 when >= 0
    }
  }

  const std::string tmp_path = path + ".tmp";
  {
    std::ofstream out(tmp_path, std::ios::binary | std::ios::trunc);
    if (!out) {
      throw std::runtime_error("cannot create '" + tmp_path + "' to write token file '" + path +
                               "': " + std::strerror(errno));
    }
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      std::remove(tmp_path.c_str());
      throw std::runtime_error("failed writing '" + tmp_path + "' (for token file '" + path +
                               "')");
    }
  }
  if (std::rename(tmp_path.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    std::remove(tmp_path.c_str());
    throw std::runtime_error("cannot rename '" + tmp_path + "' to '" + path + "': " + reason);
  }
}

}  // namespace freqkv
