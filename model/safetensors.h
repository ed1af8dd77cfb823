// Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
//   [u64 little-endian header length N][N bytes of JSON header][data section]
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end)} where the
// offsets are relative to the start of the data section; an optional "__metadata__" entry maps
// strings to strings. Hugging Face checkpoints are either one model.safetensors or several shards
// listed by model.safetensors.index.json.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace freqkv {

// Read-only view of one safetensors file or of a sharded checkpoint. Files are memory-mapped and
// the mappings live as long as the reader (or any copy of it). Every structural problem found while
// opening throws std::runtime_error naming the file, the tensor and what is wrong.
class SafetensorsReader {
 public:
  static SafetensorsReader open_file(const std::string& path);
  // dir/model.safetensors when present, else the shards named by dir/model.safetensors.index.json.
  static SafetensorsReader open_model_dir(const std::string& dir);

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const;
  const std::vector<int64_t>& shape(const std::string& name) const;
  int64_t numel(const std::string& name) const;
  std::string dtype(const std::string& name) const;  // "F32", "F16", "BF16", "F64", "I64", ...
  // The file holding the tensor (the shard, for sharded checkpoints).
  const std::string& file_of(const std::string& name) const;
  // "__metadata__" of every file read, merged (the first file wins on a repeated key).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // What was opened (a file or a model directory), for error messages.
  const std::string& source() const { return source_; }

  // The tensor converted to float; F32, F16 (with subnormals, inf and nan), BF16 and F64 are
  // supported, other dtypes throw.
  std::vector<float> read_f32(const std::string& name) const;
  // Same, into dst; n must equal the tensor's element count.
  void read_f32_into(const std::string& name, float* dst, int64_t n) const;

 private:
  struct MappedFile;  // an mmap of one file, shared by the tensors stored in it

  struct TensorEntry {
    std::string dtype;
    std::vector<int64_t> shape;
    int64_t numel = 0;
    const unsigned char* bytes = nullptr;  // inside file->data
    uint64_t byte_count = 0;
    std::shared_ptr<const MappedFile> file;
  };

  SafetensorsReader() = default;
  // Parses one file's header and adds its tensors; a tensor already present is an error.
  void add_file(const std::string& path);
  const TensorEntry& entry(const std::string& name) const;

  std::string source_;
  std::map<std::string, TensorEntry> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Collects float32 tensors and writes them as one standard safetensors file: the header is padded
// with spaces to a multiple of 8 bytes, tensors are laid out contiguously in sorted-name order, and
// "__metadata__" holds {"format": "pt"} plus whatever set_metadata added.
class SafetensorsWriter {
 public:
  // Copies shape-product floats from data (data may be null only for an empty tensor). Throws on a
  // repeated or empty name, the reserved name "__metadata__", or a negative dimension.
  void add(const std::string& name, std::vector<int64_t> shape, const float* data);
  void set_metadata(const std::string& key, const std::string& value);
  // Writes path + ".tmp" then renames it to path, so readers never see a half-written file.
  void write(const std::string& path) const;

 private:
  struct PendingTensor {
    std::vector<int64_t> shape;
    std::vector<float> values;
  };
  std::map<std::string, PendingTensor> tensors_;
  std::map<std::string, std::string> metadata_{{"format", "pt"}};
};

}  // namespace freqkv
