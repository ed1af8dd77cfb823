// Training checkpoints: one HDF5 file holding logical, unsharded fp32 tensors and scalar
// attributes, so a run can resume with a different number of ranks or a different parallel
// layout (each rank reads the blocks it owns with read_rows or read_block). Tensor names may
// contain '/' to place them in groups, e.g. "model/model.layers.0.self_attn.q_proj.weight" or
// "optimizer/exp_avg/model.norm.weight".
//
// Layout of a file:
//   /                      attributes: format = "freqkv-checkpoint", format_version = 1, the
//                          caller's attributes, and complete = 1 (written last by commit())
//   /<group>/.../<tensor>  contiguous H5T_IEEE_F32LE datasets of the tensor's logical shape
//
// Writes are atomic: a CheckpointWriter fills "<path>.tmp" and commit() renames it onto <path>
// after flushing and fsyncing, so <path> is either absent, the previous file, or a complete new one.
//
// A writer is serial (one process writes the file) or collective: the ranks of an MPI
// communicator write the one file together through MPI-IO (parallel HDF5), each rank writing its
// own blocks of the logical tensors, so tensor-parallel shards and ZeRO-sharded optimizer states
// reach the file without being gathered onto one rank. The file is the same either way.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace freqkv {

// The values of the root attributes that identify a checkpoint.
inline constexpr const char* kCheckpointFormat = "freqkv-checkpoint";
inline constexpr int64_t kCheckpointFormatVersion = 1;

// Writes one checkpoint file. Every element of every tensor created must be written before
// commit(); blocks may be written any number of times per tensor, in any order, disjoint or
// overlapping. Every failure throws std::runtime_error naming the file and the tensor.
// Destroying a writer that was not committed removes its tmp file and leaves <path> untouched.
//
// Collective mode (the MPI_Comm constructor with two or more ranks):
// - Every rank of the communicator makes the same calls in the same order: the constructor,
//   create_tensor / write_tensor with the same name and shape, set_attribute with the same key
//   and value, one write_rows / write_block per write of a tensor (with that rank's own block; a
//   rank with nothing to write passes an empty one, e.g. write_rows(name, 0, 0, nullptr)), and
//   commit(). Each call first checks, with one all-reduce of a hash of the call and its agreed
//   arguments, that every rank is making the same call; a mismatch or any rank's invalid
//   argument becomes the same std::runtime_error on every rank (naming the ranks and what each
//   called, or the first failing rank and its problem) instead of a hang in HDF5's collectives.
//   A second all-reduce after the call's HDF5 step raises an HDF5 failure on any rank everywhere.
//   Ranks that enter other collectives instead of the writer's call still hang: no check can
//   reach them.
// - Tensor data is written with collective MPI-IO transfers (H5FD_MPIO_COLLECTIVE); ranks
//   writing the same element must write the same value (which rank's write lands is unspecified).
// - The first error of any call (raised on every rank alike) ends the writer: the file is closed
//   on every rank, rank 0 removes the tmp file, and later calls are refused.
// - Destroying an uncommitted writer closes the file on every rank (collectively) and rank 0
//   removes the tmp file, so every rank must destroy it, as they do when leaving a scope
//   together. A writer destroyed while its rank unwinds an exception that the writer did not
//   raise (which may have happened on this rank alone) makes no collective call, which would
//   wait forever for ranks that never come: rank 0 removes the tmp file and the open HDF5 file
//   is left for HDF5 to close when MPI finalises. Either way <path> never appears.
class CheckpointWriter {
 public:
  // Serial: creates final_path + ".tmp" (replacing a stale one) and any missing parent
  // directories. Needs no MPI.
  explicit CheckpointWriter(const std::string& final_path);
  // Collective over comm (duplicated for the writer's lifetime) when it has two or more ranks;
  // every rank passes the same final_path. MPI_COMM_NULL or a one-rank communicator gives a
  // serial writer. Rank 0 creates the parent directories, then all ranks create the tmp file
  // through MPI-IO (H5Pset_fapl_mpio). A communicator other than MPI_COMM_NULL needs MPI to be
  // initialised and not finalised.
  CheckpointWriter(const std::string& final_path, MPI_Comm comm);
  ~CheckpointWriter();
  CheckpointWriter(CheckpointWriter&&) noexcept;
  CheckpointWriter& operator=(CheckpointWriter&&) noexcept;
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // An fp32 tensor of the given shape (an empty shape is a scalar). Groups named by '/' in the
  // name are created as needed. A name already used is an error.
  void create_tensor(const std::string& name, const std::vector<int64_t>& shape);
  // The block of the tensor starting at `offset` with `count` elements along each dimension (both
  // of the tensor's rank; a scalar's are empty), from data laid out row-major in the block's
  // shape `count`. A block with a zero count writes nothing (data may then be null). Tensor
  // parallelism splits some weights along dim 1: each rank writes its columns here.
  void write_block(const std::string& name, const std::vector<int64_t>& offset,
                   const std::vector<int64_t>& count, const float* data);
  // Rows [row_offset, row_offset + n_rows) along dim 0, from data laid out row-major; a 1-D
  // tensor's rows are its elements. n_rows == 0 writes nothing (data may then be null). The
  // block of the whole rows: write_block({row_offset, 0, ...}, {n_rows, dims 1...}).
  void write_rows(const std::string& name, int64_t row_offset, int64_t n_rows, const float* data);
  // create_tensor + writing all of it (data holds the product of shape elements). In collective
  // mode the tensor is taken to be replicated: rank 0's data is written and the other ranks'
  // data is not read (it may be null).
  void write_tensor(const std::string& name, const std::vector<int64_t>& shape, const float* data);

  // Attributes of the root group; setting a key again replaces its value. The keys "format",
  // "format_version" and "complete" are reserved for commit().
  void set_attribute(const std::string& key, const std::string& value);
  void set_attribute(const std::string& key, int64_t value);

  // Checks that every element of every tensor was written (see below), writes the format
  // attributes and the completion marker, flushes, closes and fsyncs the file, renames it onto
  // the final path (replacing an older file there) and fsyncs the directory. The writer is
  // unusable afterwards.
  //
  // The check: for each tensor with elements, the union of the blocks written to it (by all
  // ranks, in collective mode) must be the whole tensor; blocks were already checked to lie
  // inside it when written. Collectively, each rank sends the coordinates of its blocks of
  // tensor t (one record per block, its blocks merged where they abut) to rank t mod size, which
  // computes the uncovered boxes exactly, so overlapping writes never hide a gap. A failure
  // names the first incomplete tensor (by name), its shape and its first uncovered boxes, on
  // every rank; serially the writer stays usable (write the missing blocks and commit again),
  // collectively it ends the writer.
  //
  // Collectively: the file is closed by all ranks (MPI-IO syncs every rank's data first); rank 0
  // then fsyncs, renames and fsyncs the directory, and no rank returns before rank 0's rename is
  // done, so after commit() every rank sees the final file. A failure there is raised on every
  // rank.
  void commit();

  const std::string& final_path() const;
  const std::string& tmp_path() const;
  // Whether the ranks of a communicator write the file together (false for a serial writer).
  bool collective() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Read access to a committed checkpoint file; see open() for what is validated. Reading is serial
// and independent: any rank may open the file and read any block, whatever wrote it.
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
  // The block starting at `offset` with `count` elements along each dimension (both of the
  // tensor's rank) into out, row-major in the block's shape `count` (product of count floats).
  void read_block(const std::string& name, const std::vector<int64_t>& offset,
                  const std::vector<int64_t>& count, float* out) const;
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
