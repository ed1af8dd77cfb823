#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>

// The format stores little-endian values and the conversions below reinterpret bytes directly.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "freqkv's safetensors I/O assumes a little-endian host"
#endif

namespace freqkv {

namespace {

// The reference implementation refuses headers above 100 MB; a larger length means corruption.
constexpr uint64_t kMaxHeaderBytes = 100u * 1000u * 1000u;

// Element sizes of every dtype the safetensors format defines.
int64_t dtype_itemsize(const std::string& dtype) {
  static const std::map<std::string, int64_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

bool is_float_readable(const std::string& dtype) {
  return dtype == "F32" || dtype == "F16" || dtype == "BF16" || dtype == "F64";
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

std::string file_context(const std::string& path) { return "safetensors file '" + path + "'"; }

std::string tensor_context(const std::string& path, const std::string& name) {
  return file_context(path) + ", tensor '" + name + "'";
}

// IEEE half -> float, exact for every half value: subnormals are scaled explicitly, inf and nan
// keep their sign and (for nan) their payload bits.
float half_bits_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;  // signed zero
    } else {
      // Subnormal: mantissa * 2^-24, which is a normal float.
      const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
      return sign ? -magnitude : magnitude;
    }
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf (mantissa 0) or nan
  } else {
    bits = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// bfloat16 is the upper half of a float32.
float bf16_bits_to_float(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// The bytes may sit at any alignment inside the mapping, so elements are copied out with memcpy.
template <typename Element>
Element load_unaligned(const unsigned char* bytes, int64_t index) {
  Element value;
  std::memcpy(&value, bytes + index * static_cast<int64_t>(sizeof(Element)), sizeof(Element));
  return value;
}

// The number of elements of shape, or -1 when the product overflows int64.
int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(count, dim, &count)) return -1;
  }
  return count;
}

void write_file_atomically(const std::string& path, const std::string& header,
                           const std::vector<const std::vector<float>*>& payloads) {
  const std::string tmp_path = path + ".tmp";
  {
    std::ofstream out(tmp_path, std::ios::binary | std::ios::trunc);
    if (!out) {
      throw std::runtime_error("cannot create '" + tmp_path + "' to write safetensors file '" +
                               path + "': " + std::strerror(errno));
    }
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const std::vector<float>* values : payloads) {
      out.write(reinterpret_cast<const char*>(values->data()),
                static_cast<std::streamsize>(values->size() * sizeof(float)));
    }
    out.flush();
    if (!out) {
      std::remove(tmp_path.c_str());
      throw std::runtime_error("failed writing '" + tmp_path + "' (for safetensors file '" + path +
                               "'): disk full or I/O error");
    }
  }
  if (std::rename(tmp_path.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    std::remove(tmp_path.c_str());
    throw std::runtime_error("cannot rename '" + tmp_path + "' to '" + path + "': " + reason);
  }
}

}  // namespace

// ---- the memory mapping --------------------------------------------------------------------

struct SafetensorsReader::MappedFile {
  std::string path;
  const unsigned char* data = nullptr;
  uint64_t size = 0;

  explicit MappedFile(const std::string& file_path) : path(file_path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      throw std::runtime_error("cannot open " + file_context(path) + ": " + std::strerror(errno));
    }
    struct stat info;
    if (::fstat(fd, &info) != 0) {
      const std::string reason = std::strerror(errno);
      ::close(fd);
      throw std::runtime_error("cannot stat " + file_context(path) + ": " + reason);
    }
    if (!S_ISREG(info.st_mode)) {
      ::close(fd);
      throw std::runtime_error(file_context(path) + " is not a regular file");
    }
    size = static_cast<uint64_t>(info.st_size);
    if (size < 8) {
      ::close(fd);
      throw std::runtime_error(file_context(path) + " is " + std::to_string(size) +
                               " bytes, too small to hold the 8-byte header length");
    }
    void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const std::string reason = std::strerror(errno);
    ::close(fd);  // the mapping stays valid after the descriptor is closed
    if (mapping == MAP_FAILED) {
      throw std::runtime_error("cannot mmap " + file_context(path) + ": " + reason);
    }
    data = static_cast<const unsigned char*>(mapping);
  }
  ~MappedFile() {
    if (data) ::munmap(const_cast<unsigned char*>(data), size);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
};

// ---- reader --------------------------------------------------------------------------------

SafetensorsReader SafetensorsReader::open_file(const std::string& path) {
  SafetensorsReader reader;
  reader.source_ = path;
  reader.add_file(path);
  return reader;
}

SafetensorsReader SafetensorsReader::open_model_dir(const std::string& dir) {
  const std::string single_path = dir + "/model.safetensors";
  const std::string index_path = dir + "/model.safetensors.index.json";
  struct stat info;
  if (::stat(single_path.c_str(), &info) == 0) {
    SafetensorsReader reader = open_file(single_path);
    reader.source_ = dir;
    return reader;
  }
  if (::stat(index_path.c_str(), &info) != 0) {
    throw std::runtime_error("model directory '" + dir + "' has neither '" + single_path +
                             "' nor '" + index_path + "'");
  }

  std::ifstream index_stream(index_path);
  if (!index_stream) {
    throw std::runtime_error("cannot open safetensors index '" + index_path +
                             "': " + std::strerror(errno));
  }
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(index_stream);
  } catch (const nlohmann::json::exception& error) {
    throw std::runtime_error("safetensors index '" + index_path +
                             "' is not valid JSON: " + error.what());
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    throw std::runtime_error("safetensors index '" + index_path +
                             "' has no \"weight_map\" object mapping tensor names to shard files");
  }

  // Shards in first-mentioned order; the tensor that first names a shard is kept for messages.
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> first_tensor_of_shard;
  const nlohmann::json& weight_map = index["weight_map"];
  for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
    if (!it.value().is_string()) {
      throw std::runtime_error("safetensors index '" + index_path + "': tensor '" + it.key() +
                               "' maps to " + it.value().dump() + ", expected a shard file name");
    }
    const std::string shard = it.value().get<std::string>();
    if (first_tensor_of_shard.emplace(shard, it.key()).second) shard_names.push_back(shard);
  }

  SafetensorsReader reader;
  reader.source_ = dir;
  for (const std::string& shard : shard_names) {
    const std::string shard_path = dir + "/" + shard;
    if (::stat(shard_path.c_str(), &info) != 0) {
      throw std::runtime_error("safetensors index '" + index_path + "' names shard '" + shard +
                               "' (for tensor '" + first_tensor_of_shard[shard] +
                               "'), but '" + shard_path + "' does not exist");
    }
    reader.add_file(shard_path);
  }
  // Every tensor the index promises must be in the shard it names.
  for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
    const std::string shard_path = dir + "/" + it.value().get<std::string>();
    auto found = reader.tensors_.find(it.key());
    if (found == reader.tensors_.end()) {
      throw std::runtime_error("safetensors index '" + index_path + "' maps tensor '" + it.key() +
                               "' to '" + shard_path + "', which does not contain it");
    }
    if (found->second.file->path != shard_path) {
      throw std::runtime_error("safetensors index '" + index_path + "' maps tensor '" + it.key() +
                               "' to '" + shard_path + "', but it is stored in '" +
                               found->second.file->path + "'");
    }
  }
  return reader;
}

void SafetensorsReader::add_file(const std::string& path) {
  auto file = std::make_shared<const MappedFile>(path);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, file->data, 8);
  const uint64_t available = file->size - 8;
  if (header_bytes > available) {
    throw std::runtime_error(file_context(path) + ": header length " +
                             std::to_string(header_bytes) + " exceeds the " +
                             std::to_string(available) + " bytes after the length field (file is " +
                             std::to_string(file->size) + " bytes)");
  }
  if (header_bytes > kMaxHeaderBytes) {
    throw std::runtime_error(file_context(path) + ": header length " +
                             std::to_string(header_bytes) + " is implausibly large (limit " +
                             std::to_string(kMaxHeaderBytes) + ")");
  }
  const char* header_begin = reinterpret_cast<const char*>(file->data + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_bytes);
  } catch (const nlohmann::json::exception& error) {
    throw std::runtime_error(file_context(path) + ": header is not valid JSON: " + error.what());
  }
  if (!header.is_object()) {
    throw std::runtime_error(file_context(path) + ": header is " + header.type_name() +
                             ", expected a JSON object");
  }

  const unsigned char* data_section = file->data + 8 + header_bytes;
  const uint64_t data_bytes = available - header_bytes;
  // [begin, end, name] of every non-empty tensor of this file, to detect overlapping bytes.
  std::vector<std::tuple<uint64_t, uint64_t, std::string>> ranges;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object()) {
        throw std::runtime_error(file_context(path) + ": \"__metadata__\" is " + value.type_name() +
                                 ", expected an object of strings");
      }
      for (auto meta = value.begin(); meta != value.end(); ++meta) {
        const std::string text =
            meta.value().is_string() ? meta.value().get<std::string>() : meta.value().dump();
        metadata_.emplace(meta.key(), text);
      }
      continue;
    }
    const std::string context = tensor_context(path, name);
    if (!value.is_object()) {
      throw std::runtime_error(context + ": header entry is " + std::string(value.type_name()) +
                               ", expected an object with dtype, shape and data_offsets");
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(field)) {
        throw std::runtime_error(context + ": missing \"" + field + "\"");
      }
    }

    TensorEntry entry;
    entry.file = file;
    const nlohmann::json& dtype = value["dtype"];
    if (!dtype.is_string()) {
      throw std::runtime_error(context + ": \"dtype\" is " + dtype.dump() + ", expected a string");
    }
    entry.dtype = dtype.get<std::string>();
    const int64_t itemsize = dtype_itemsize(entry.dtype);
    if (itemsize == 0) {
      throw std::runtime_error(context + ": unsupported dtype '" + entry.dtype +
                               "' (known: BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, "
                               "I32, U32, F32, I64, U64, F64)");
    }

    const nlohmann::json& shape = value["shape"];
    if (!shape.is_array()) {
      throw std::runtime_error(context + ": \"shape\" is " + shape.dump() +
                               ", expected an array of non-negative integers");
    }
    for (const nlohmann::json& dim : shape) {
      if (!dim.is_number_integer() || dim.get<int64_t>() < 0) {
        throw std::runtime_error(context + ": \"shape\" is " + shape.dump() +
                                 ", expected an array of non-negative integers");
      }
      entry.shape.push_back(dim.get<int64_t>());
    }
    entry.numel = checked_numel(entry.shape);
    int64_t expected_bytes = 0;
    if (entry.numel < 0 || __builtin_mul_overflow(entry.numel, itemsize, &expected_bytes)) {
      throw std::runtime_error(context + ": shape " + shape_string(entry.shape) +
                               " has more elements than fit in 64 bits");
    }

    const nlohmann::json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      throw std::runtime_error(context + ": \"data_offsets\" is " + offsets.dump() +
                               ", expected [begin, end] with non-negative integers");
    }
    const uint64_t begin = offsets[0].get<uint64_t>();
    const uint64_t end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_bytes) {
      throw std::runtime_error(context + ": data_offsets [" + std::to_string(begin) + ", " +
                               std::to_string(end) + "] out of range: the data section is " +
                               std::to_string(data_bytes) + " bytes");
    }
    if (end - begin != static_cast<uint64_t>(expected_bytes)) {
      throw std::runtime_error(context + ": data_offsets [" + std::to_string(begin) + ", " +
                               std::to_string(end) + "] span " + std::to_string(end - begin) +
                               " bytes, but shape " + shape_string(entry.shape) + " of " +
                               entry.dtype + " needs " + std::to_string(expected_bytes) + " (" +
                               std::to_string(entry.numel) + " x " + std::to_string(itemsize) +
                               ")");
    }
    entry.bytes = data_section + begin;
    entry.byte_count = end - begin;
    if (end > begin) ranges.emplace_back(begin, end, name);  // empty tensors own no bytes

    auto existing = tensors_.find(name);
    if (existing != tensors_.end()) {
      throw std::runtime_error("tensor '" + name + "' is stored twice: in '" +
                               existing->second.file->path + "' and in '" + path + "'");
    }
    tensors_.emplace(name, std::move(entry));
  }

  // Sorted by begin, any overlap shows up between neighbours.
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    const auto& [previous_begin, previous_end, previous_name] = ranges[i - 1];
    const auto& [begin, end, name] = ranges[i];
    if (begin < previous_end) {
      throw std::runtime_error(file_context(path) + ": the bytes of tensor '" + name + "' [" +
                               std::to_string(begin) + ", " + std::to_string(end) +
                               ") overlap those of tensor '" + previous_name + "' [" +
                               std::to_string(previous_begin) + ", " +
                               std::to_string(previous_end) + ")");
    }
  }
}

const SafetensorsReader::TensorEntry& SafetensorsReader::entry(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    throw std::runtime_error("no tensor '" + name + "' in '" + source_ + "' (it holds " +
                             std::to_string(tensors_.size()) + " tensors)");
  }
  return it->second;
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> result;
  result.reserve(tensors_.size());
  for (const auto& [name, entry] : tensors_) result.push_back(name);
  return result;  // std::map iterates in sorted order
}

bool SafetensorsReader::contains(const std::string& name) const {
  return tensors_.count(name) != 0;
}

const std::vector<int64_t>& SafetensorsReader::shape(const std::string& name) const {
  return entry(name).shape;
}

int64_t SafetensorsReader::numel(const std::string& name) const { return entry(name).numel; }

std::string SafetensorsReader::dtype(const std::string& name) const { return entry(name).dtype; }

const std::string& SafetensorsReader::file_of(const std::string& name) const {
  return entry(name).file->path;
}

std::vector<float> SafetensorsReader::read_f32(const std::string& name) const {
  const TensorEntry& tensor = entry(name);
  std::vector<float> values(static_cast<size_t>(tensor.numel));
  read_f32_into(name, values.data(), tensor.numel);
  return values;
}

void SafetensorsReader::read_f32_into(const std::string& name, float* dst, int64_t n) const {
  const TensorEntry& tensor = entry(name);
  const std::string context = tensor_context(tensor.file->path, name);
  if (n != tensor.numel) {
    throw std::runtime_error(context + ": destination holds " + std::to_string(n) +
                             " floats, but the tensor has shape " + shape_string(tensor.shape) +
                             " = " + std::to_string(tensor.numel) + " elements");
  }
  if (!is_float_readable(tensor.dtype)) {
    throw std::runtime_error(context + ": dtype " + tensor.dtype +
                             " cannot be read as float (supported: F32, F16, BF16, F64)");
  }
  const unsigned char* bytes = tensor.bytes;
  if (tensor.dtype == "F32") {
    if (n > 0) std::memcpy(dst, bytes, static_cast<size_t>(n) * sizeof(float));
  } else if (tensor.dtype == "F16") {
    for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(load_unaligned<uint16_t>(bytes, i));
  } else if (tensor.dtype == "BF16") {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(load_unaligned<uint16_t>(bytes, i));
  } else {  // F64
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load_unaligned<double>(bytes, i));
  }
}

// ---- writer --------------------------------------------------------------------------------

void SafetensorsWriter::add(const std::string& name, std::vector<int64_t> shape,
                            const float* data) {
  if (name.empty() || name == "__metadata__") {
    throw std::invalid_argument("safetensors writer: invalid tensor name '" + name + "'");
  }
  if (tensors_.count(name)) {
    throw std::invalid_argument("safetensors writer: tensor '" + name + "' added twice");
  }
  for (int64_t dim : shape) {
    if (dim < 0) {
      throw std::invalid_argument("safetensors writer: tensor '" + name + "' has shape " +
                                  shape_string(shape) + " with a negative dimension");
    }
  }
  const int64_t count = checked_numel(shape);
  if (count < 0) {
    throw std::invalid_argument("safetensors writer: tensor '" + name + "' shape " +
                                shape_string(shape) + " overflows");
  }
  if (count > 0 && data == nullptr) {
    throw std::invalid_argument("safetensors writer: tensor '" + name + "' of shape " +
                                shape_string(shape) + " given a null data pointer");
  }
  PendingTensor tensor;
  tensor.shape = std::move(shape);
  tensor.values.assign(data, data + count);
  tensors_.emplace(name, std::move(tensor));
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

void SafetensorsWriter::write(const std::string& path) const {
  // ordered_json keeps "__metadata__" first and the tensors in sorted-name order, like the
  // Python writer's output.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
  for (const auto& [key, value] : metadata_) metadata[key] = value;
  header["__metadata__"] = metadata;

  std::vector<const std::vector<float>*> payloads;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors_) {
    const uint64_t bytes = tensor.values.size() * sizeof(float);
    header[name] = {{"dtype", "F32"},
                    {"shape", tensor.shape},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    payloads.push_back(&tensor.values);
  }

  std::string header_text = header.dump();
  // Padding keeps the data section 8-byte aligned (the length field is 8 bytes too).
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_length = header_text.size();
  std::string prefix(8, '\0');
  std::memcpy(prefix.data(), &header_length, 8);
  write_file_atomically(path, prefix + header_text, payloads);
}

}  // namespace freqkv
