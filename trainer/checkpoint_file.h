// Training checkpoints: one HDF5 file holding logical, unsharded fp32 tensors and scalar
// attributes, so a run can resume with a different number of ranks (each rank reads the rows it
// owns with read_rows). Tensor names may contain '/' to place them in groups, e.g.
// "model/model.layers.0.self_attn.q_proj.weight" or "optimizer/exp_avg/model.norm.weight".
//
// Layout of a file:
//   /                      attributes: format = "freqkv-checkpoint", format_version = 1, the
//                          caller's attributes, and complete = 1 (written last by commit())
//   /<group>/.../<tensor>  contiguous H5T_IEEE_F32LE datasets of the tensor's logical shape
//
// Writes are atomic: a CheckpointWriter fills "<path>.tmp" and commit() renames it onto <path>
// after flushing and fsyncing, so <path> is either absent, the previous file, or a complete new one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace freqkv {

// The values of the root attributes that identify a checkpoint.
inline constexpr const char* kCheckpointFormat = "freqkv-checkpoint";
inline constexpr int64_t kCheckpointFormatVersion = 1;

// Writes one checkpoint file. Every tensor created must have all of its rows written before
// commit(); write_rows may be called any number of times per tensor, in any order, with disjoint
// or overlapping slabs. Every failure throws std::runtime_error naming the file and the tensor.
// Destroying a writer that was not committed removes its tmp file and leaves <path> untouched.
class CheckpointWriter {
 public:
  // Creates final_path + ".tmp" (replacing a stale one) and any missing parent directories.
  explicit CheckpointWriter(const std::string& final_path);
  ~CheckpointWriter();
  CheckpointWriter(CheckpointWriter&&) noexcept;
  CheckpointWriter& operator=(CheckpointWriter&&) noexcept;
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // An fp32 tensor of the given shape (an empty shape is a scalar). Groups named by '/' in the
  // name are created as needed. A name already used is an error.
  void create_tensor(const std::string& name, const std::vector<int64_t>& shape);
  // Rows [row_offset, row_offset + n_rows) along dim 0, from data laid out row-major; a 1-D
  // tensor's rows are its elements. n_rows == 0 writes nothing (data may then be null).
  void write_rows(const std::string& name, int64_t row_offset, int64_t n_rows, const float* data);
  // create_tensor + writing all of it (data holds the product of shape elements).
  void write_tensor(const std::string& name, const std::vector<int64_t>& shape, const float* data);

  // Attributes of the root group; setting a key again replaces its value. The keys "format",
  // "format_version" and "complete" are reserved for commit().
  void set_attribute(const std::string& key, const std::string& value);
  void set_attribute(const std::string& key, int64_t value);

  // Checks every tensor was fully written, writes the format attributes and the completion
  // marker, flushes, closes and fsyncs the file, renames it onto the final path (replacing an
  // older file there) and fsyncs the directory. The writer is unusable afterwards.
  void commit();

  const std::string& final_path() const;
  const std::string& tmp_path() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Read access to a committed checkpoint file; see open() for what is validated.
class CheckpointReader {
 public:
  // Opens path read-only after checking that it exists, is an HDF5 file that HDF5 can open (a
  // truncated copy cannot), carries format == "freqkv-checkpoint", a format_version this code
  // reads, and the completion marker. Any failure throws std::runtime_error naming the path and
  // the problem.
  static CheckpointReader open(const std::string& path);
  ~CheckpointReader();
  CheckpointReader(CheckpointReader&&) noexcept;
  CheckpointReader& operator=(CheckpointReader&&) noexcept;
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  // Full names of the tensors under group ("" = the whole file), recursively, sorted. A group
  // that does not exist holds no tensors.
  std::vector<std::string> tensor_names(const std::string& group = "") const;
  bool has_tensor(const std::string& name) const;
  std::vector<int64_t> shape(const std::string& name) const;
  // Rows [row_offset, row_offset + n_rows) along dim 0 into out (n_rows × row size floats).
  void read_rows(const std::string& name, int64_t row_offset, int64_t n_rows, float* out) const;
  std::vector<float> read_tensor(const std::string& name) const;

  bool has_attribute(const std::string& key) const;
  // A missing key, or a value of the other kind, is an error naming the key.
  std::string string_attribute(const std::string& key) const;
  int64_t int_attribute(const std::string& key) const;

  const std::string& path() const;

 private:
  struct Impl;
  explicit CheckpointReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace freqkv
