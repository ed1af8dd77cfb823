// MPI for host memory: the session that initialises and finalises MPI, and MpiCommunicator, the
// Communicator over one MPI communicator (the world, or a tp/sp/dp group split from it).
//
// Types: f32, f64, i32, i64 are MPI's own (MPI_FLOAT, MPI_DOUBLE, MPI_INT32_T, MPI_INT64_T). MPI
// has no bfloat16, so bf16 travels as a committed user datatype (one MPI_UINT16_T) with user
// reduction operations: the sum converts both operands to fp32, adds and rounds to bf16 (nearest
// even), the max compares in fp32 (a NaN operand wins). Each combining step of MPI's reduction is
// one such fp32 add, so a sum over p ranks is exact whenever its partial sums are representable
// in bf16, and otherwise carries one bf16 rounding per combining step. These user objects are
// created on first use and freed when MPI_Finalize runs (an attribute on MPI_COMM_SELF).
//
// Errors: every MpiCommunicator sets MPI_ERRORS_RETURN on its own communicator, so a failing MPI
// call becomes a std::runtime_error naming the call, the group (label, world ranks, this rank)
// and MPI's error string instead of aborting the job. Bad arguments (negative counts, a root or
// peer outside the group, a send to itself) are std::invalid_argument before any MPI call.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace freqkv {

// MPI for the lifetime of this object. The first session of the process initialises MPI
// (MPI_Init_thread with MPI_THREAD_FUNNELED: only the main thread calls MPI, OpenMP threads never
// do) unless something else already did, and finalises it when it is destroyed; sessions made
// while MPI is up neither initialise nor finalise it. A process that mpirun/srun did not start
// becomes a one-rank MPI world (MPI's singleton init); for such a process the session sets
// OMPI_MCA_ess_singleton_isolated=1 (unless the environment sets it) so Open MPI does not fork a
// daemon, which needs a working network interface, only to serve a world of one.
//
// Declare it first in main(), before any communicator or grid, so they are gone before it
// finalises (MpiCommunicator skips freeing its MPI_Comm if MPI was finalised first).
class MpiSession {
 public:
  explicit MpiSession(int* argc = nullptr, char*** argv = nullptr);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  // Whether this session initialised MPI (and so finalises it).
  bool owns_mpi() const { return owns_mpi_; }

  // The steps the session takes, for programs that manage MPI's lifetime themselves.
  // initialize(): MPI_Init_thread unless MPI is initialised; true when this call initialised it.
  // Throws std::runtime_error if MPI was already finalised (MPI cannot start twice in a process)
  // or cannot give MPI_THREAD_FUNNELED.
  static bool initialize(int* argc = nullptr, char*** argv = nullptr);
  // finalize(): MPI_Finalize if MPI is initialised and not yet finalised; otherwise nothing.
  static void finalize();
  // MPI is initialised and not finalised: MPI calls are allowed.
  static bool active();
  // The process was started by an MPI launcher (mpirun/mpiexec/srun with PMI or PMIx): one of
  // OMPI_COMM_WORLD_SIZE, PMIX_RANK, PMI_RANK, PMI_SIZE is set.
  static bool started_by_launcher();
  // Rank and size in MPI_COMM_WORLD; std::logic_error when MPI is not active.
  static int world_rank();
  static int world_size();

 private:
  bool owns_mpi_ = false;
};

// A Communicator over host memory on an MPI communicator. Counts are int64_t; MPI's are int, so
// every operation moves at most `max_chunk` elements per MPI call and loops over chunks (the tests
// shrink max_chunk to exercise that path on small buffers). Buffers must not overlap, except the
// in-place all_gather where `send` is this rank's block of `recv`.
class MpiCommunicator final : public Communicator {
 public:
  // 2^28 elements (1 GiB of f32) per MPI call: far below INT_MAX, large enough to run at MPI's
  // full bandwidth.
  static constexpr int64_t kDefaultMaxChunk = int64_t{1} << 28;

  // Duplicates `comm` (MPI_Comm_dup, collective over it) so freqkv's traffic never matches
  // messages of other users of the same communicator (parallel HDF5 uses MPI_COMM_WORLD), and
  // frees the duplicate when destroyed. `label` names the group in errors ("world").
  // Requires an active MPI (MpiSession). max_chunk in 1..INT_MAX.
  explicit MpiCommunicator(MPI_Comm comm, std::string label = "world",
                           int64_t max_chunk = kDefaultMaxChunk);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  void all_reduce(void* data, int64_t n, CommDType dtype, ReduceOp op) override;
  void all_gather(const void* send, void* recv, int64_t n_per_rank, CommDType dtype) override;
  void reduce_scatter(const void* send, void* recv, int64_t n_per_rank, CommDType dtype) override;
  void broadcast(void* data, int64_t n, CommDType dtype, int root) override;
  void reduce_to(void* data, int64_t n, CommDType dtype, int root) override;
  void send(const void* data, int64_t n, CommDType dtype, int peer) override;
  void recv(void* data, int64_t n, CommDType dtype, int peer) override;
  void barrier() override;
  double all_reduce_scalar(double value, ReduceOp op) override;
  // MPI_Comm_split of this communicator; the result owns its MPI_Comm and keeps max_chunk.
  std::unique_ptr<Communicator> split(int color, int key, const std::string& label) override;
  // MPI_Iallreduce per chunk; progress() is MPI_Testall, wait_reductions() MPI_Waitall.
  void start_all_reduce_sum(void* data, int64_t n, CommDType dtype) override;
  void progress() override;
  void wait_reductions() override;

  // The underlying (duplicated or split) MPI communicator.
  MPI_Comm comm() const { return comm_; }
  const std::string& label() const { return label_; }
  int64_t max_chunk() const { return max_chunk_; }
  // World ranks of the members, indexed by rank in this group.
  const std::vector<int>& world_ranks() const { return world_ranks_; }
  // "group 'tp' (world ranks 2,3; this is rank 1 of 2)", as errors name the group.
  std::string describe() const;

  // Typed conveniences of the base class (hidden otherwise by the overrides above).
  using Communicator::all_gather;
  using Communicator::broadcast;
  using Communicator::recv;
  using Communicator::send;
  using Communicator::start_all_reduce_sum;

 private:
  struct Adopt {};
  // Takes ownership of `comm` as it is (a fresh split): no duplication.
  MpiCommunicator(Adopt, MPI_Comm comm, std::string label, int64_t max_chunk);
  void init_members();

  // Throws std::runtime_error for a failed MPI call: `call` and `detail` say what was asked.
  void check(int code, const char* call, const std::string& detail) const;
  void check_count(const char* operation, int64_t n) const;
  void check_rank(const char* operation, const char* role, int r) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string label_;
  int64_t max_chunk_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<int> world_ranks_;
  std::vector<MPI_Request> pending_;  // started reductions not yet waited for
  int64_t pending_elements_ = 0;      // their size, for messages
};

// MPI's text for an error code ("MPI_ERR_TRUNCATE: message truncated").
std::string mpi_error_string(int code);

}  // namespace freqkv
