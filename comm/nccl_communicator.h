// NCCL for device memory: NcclCommunicator, the Communicator over buffers on one CUDA device per
// rank, and make_nccl_grid, the tp × sp × dp grid whose groups are NCCL communicators.
//
// Bootstrap: the group's ranks already share an MPI communicator. Rank 0 asks NCCL for a unique
// id (ncclGetUniqueId) and MPI_Bcasts it; every rank then joins with ncclCommInitRank on its own
// device. Sub-groups (tp, sp, dp) come from ncclCommSplit of the parent, with the matching
// MPI_Comm_split beside it, so every NcclCommunicator also holds an MpiCommunicator of the same
// ranks in the same order (host()).
//
// Memory: device buffers travel over NCCL. Host buffers (what ParallelGrid exchanges at start-up:
// the shape check and the host names) travel over that MPI communicator instead, so the grid's
// constructor works unchanged; the kind of each buffer is asked from the CUDA runtime
// (cudaPointerGetAttributes). Every rank must pass the same kind of buffer to a collective, as
// every rank must call it.
//
// Streams: collectives run on the communicator's own stream (stream()). A communicator made with
// a compute stream (the stream of the CudaKernels whose buffers it moves: cuda_kernels_stream)
// orders every collective against it automatically -- the collective waits for the work enqueued
// on the compute stream so far, and work enqueued there afterwards waits for the collective -- so
// the Communicator contract holds for the device: once a call returns, the compute stream sees
// its result (the host does not wait; host reads go through the backend, which synchronises).
// With that automatic ordering the collectives of all groups run one after another on the device,
// in program order, which also keeps NCCL from deadlocking (kernels of two communicators must not
// wait on each other across ranks). The overlapped gradient sums (start_all_reduce_sum) are the
// exception: they run on this stream while the backward's tp and sp collectives run on theirs,
// as Megatron-LM overlaps its data-parallel reduction; every rank issues them in the same program
// order, and CUDA_DEVICE_MAX_CONNECTIONS=1 (README) keeps the device from reordering kernels
// across streams. parallel.overlap_grad_reduce: false falls back to one blocking sum after the
// backward. By hand: set_ordering(StreamOrdering::kManual), then wait_for(compute) after the data
// is written, the collective, and record_on(compute) before anything reads it.
//
// Types and reductions: f32, f64, i32, i64 and bf16 (ncclBfloat16) map to NCCL's types; sums use
// ncclSum, maxima ncclMax. NCCL reduces bf16 two operands at a time as partial results pass
// between ranks: each addition is computed at fp32 precision and its result rounded to bf16 (nearest
// even) before it moves on, so a sum over p ranks carries up to p - 1 bf16 roundings -- the same
// bound as MpiCommunicator's bf16 sum; the order of additions depends on NCCL's algorithm (ring,
// tree, NVLS), the result is the same on every rank. NaN handling of max is NCCL's.
//
// all_reduce_scalar (losses, norms): the double goes through a pinned host word and a device word,
// ncclFloat64, and back; the call waits for the result.
//
// Errors: a failing NCCL or CUDA call throws std::runtime_error naming the call, what it moved,
// the group (label, world ranks, this rank), the device, ncclGetErrorString and ncclGetLastError.
// Bad arguments (negative counts, roots or peers outside the group, a buffer on another device,
// mixed host/device buffers) are std::invalid_argument before any call.
//
// Two ranks on ONE GPU (a test machine with a single device): NCCL refuses a communicator in which
// two ranks have the same host hash and the same GPU ("Duplicate GPU detected : rank 1 and rank 0
// both on CUDA device ...", ncclInvalidUsage). Give every rank its own NCCL_HOSTID (and
// NCCL_SOCKET_IFNAME=lo): the ranks then look like separate nodes and talk over sockets -- correct,
// but slow (milliseconds per small collective); for correctness checks only, e.g. (Open MPI)
//     mpirun -np 2 -x NCCL_SOCKET_IFNAME=lo
//         bash -c 'NCCL_HOSTID=freqkv-rank-$OMPI_COMM_WORLD_RANK exec ./freqkv train ...'
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/mpi_communicator.h"
#include "comm/parallel_grid.h"

namespace freqkv {

enum class StreamOrdering {
  kAutomatic,  // every collective waits for the compute stream and the compute stream for it
  kManual,     // the caller orders with wait_for / record_on
};

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `comm` (every rank calls it with its own device): duplicates `comm` for the
  // host traffic, makes the device current, bootstraps NCCL as above and creates the stream.
  // `compute` is the stream the moved buffers are produced and consumed on (nullptr: the legacy
  // default stream); `label` names the group in errors ("world"). Requires an active MPI
  // (MpiSession).
  NcclCommunicator(MPI_Comm comm, int device, cudaStream_t compute, std::string label = "world");
  // Waits for this communicator's stream and frees the NCCL communicator (ncclCommDestroy; while
  // an exception unwinds, ncclCommAbort, which does not wait for other ranks).
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }

  void all_reduce(void* data, int64_t n, CommDType dtype, ReduceOp op) override;
  void all_gather(const void* send, void* recv, int64_t n_per_rank, CommDType dtype) override;
  void reduce_scatter(const void* send, void* recv, int64_t n_per_rank, CommDType dtype) override;
  void broadcast(void* data, int64_t n, CommDType dtype, int root) override;
  // ncclReduce to root; other ranks pass no receive buffer, so their data stays as it is.
  void reduce_to(void* data, int64_t n, CommDType dtype, int root) override;
  // Point to point: "blocking" for the compute stream (automatic ordering), as NCCL's send and
  // recv block their stream until the peer's matching call has run.
  void send(const void* data, int64_t n, CommDType dtype, int peer) override;
  void recv(void* data, int64_t n, CommDType dtype, int peer) override;
  // Waits for this communicator's stream, then MPI_Barrier over the group.
  void barrier() override;
  double all_reduce_scalar(double value, ReduceOp op) override;
  // ncclCommSplit and MPI_Comm_split with the same color and key (collective over this group);
  // the child shares the device, the compute stream and the ordering mode.
  std::unique_ptr<Communicator> split(int color, int key, const std::string& label) override;
  // Overlapped sums whatever the ordering mode: the reduction waits for the compute stream's work
  // so far (the gradients written) and runs on this communicator's stream while the compute
  // stream goes on; wait_reductions() makes the compute stream wait for them (the host does not
  // wait). Host buffers go to the MPI twin's nonblocking reductions.
  void start_all_reduce_sum(void* data, int64_t n, CommDType dtype) override;
  void progress() override;
  void wait_reductions() override;

  // ---- streams ----------------------------------------------------------------------------------
  cudaStream_t stream() const { return stream_; }
  cudaStream_t compute_stream() const { return compute_; }
  void set_compute_stream(cudaStream_t compute) { compute_ = compute; }
  StreamOrdering ordering() const { return ordering_; }
  void set_ordering(StreamOrdering ordering) { ordering_ = ordering; }
  // Collectives enqueued after this call wait for the work enqueued on `producer` so far.
  void wait_for(cudaStream_t producer);
  // Work enqueued on `consumer` after this call waits for the collectives enqueued so far.
  void record_on(cudaStream_t consumer);
  // Waits on the host for every collective enqueued so far; reports NCCL's asynchronous errors.
  void synchronize();

  int device() const { return device_; }
  ncclComm_t nccl_comm() const { return comm_; }
  // The MPI communicator of the same ranks in the same order (host memory).
  MpiCommunicator& host() const { return *host_; }
  const std::string& label() const { return host_->label(); }
  // "nccl group 'tp' (world ranks 2,3; this is rank 1 of 2) on device 1", as errors name it.
  std::string describe() const;

  // Typed conveniences of the base class (hidden otherwise by the overrides above).
  using Communicator::all_gather;
  using Communicator::broadcast;
  using Communicator::recv;
  using Communicator::send;
  using Communicator::start_all_reduce_sum;

 private:
  struct Adopt {};
  // Takes ownership of a fresh NCCL communicator and its MPI twin (a split).
  NcclCommunicator(Adopt, ncclComm_t comm, std::unique_ptr<MpiCommunicator> host, int device,
                   cudaStream_t compute, StreamOrdering ordering);
  void create_stream_and_buffers();
  void release(bool abort) noexcept;

  enum class Memory { kHost, kDevice };
  // Where `p` lives; a device buffer on another device is std::invalid_argument.
  Memory memory_of(const void* p, const char* operation) const;
  // The common kind of two buffers of one call (mixed kinds are std::invalid_argument).
  Memory memory_of(const void* a, const void* b, const char* operation) const;
  // Makes the device current and, with automatic ordering, makes the stream wait for compute.
  void begin(const char* operation);
  // With automatic ordering, makes compute wait for what was just enqueued.
  void end(const char* operation);

  void check_nccl(ncclResult_t result, const char* call, const std::string& detail) const;
  void check_cuda(cudaError_t status, const char* call, const std::string& detail) const;
  void check_count(const char* operation, int64_t n) const;
  void check_rank(const char* operation, const char* role, int r) const;

  ncclComm_t comm_ = nullptr;
  std::unique_ptr<MpiCommunicator> host_;
  int device_ = 0;
  int rank_ = 0;
  int size_ = 1;
  cudaStream_t compute_ = nullptr;
  StreamOrdering ordering_ = StreamOrdering::kAutomatic;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t compute_ready_ = nullptr;  // recorded on the producer / compute stream
  cudaEvent_t comm_done_ = nullptr;      // recorded on stream_
  double* scalar_device_ = nullptr;      // all_reduce_scalar's device word
  double* scalar_host_ = nullptr;        // and its pinned host word
  bool device_reductions_pending_ = false;  // started on stream_, compute not yet waiting
};

// NCCL's error text for a result ("unhandled cuda error (run with NCCL_DEBUG=INFO for details)").
std::string nccl_error_string(ncclResult_t result);

// The rank of this process among the ranks on its node (MPI_Comm_split_type with
// MPI_COMM_TYPE_SHARED over MPI_COMM_WORLD). Requires an active MPI.
int node_local_rank();

// The device of this rank: node_local_rank() modulo the visible CUDA devices, so ranks spread
// over a node's GPUs in order (and share them round robin when there are more ranks than GPUs).
// Collective over MPI_COMM_WORLD when MPI is active (node_local_rank); rank 0's view otherwise.
// Throws std::runtime_error when no device is visible.
int device_for_this_rank();

// The grid of MPI_COMM_WORLD whose world and tp/sp/dp groups are NcclCommunicators on `device`,
// ordered against `compute` (the backend's stream, cuda_kernels_stream); dimensions of size 1 are
// LocalCommunicators that copy device memory. Validates the shape against the world size before
// starting NCCL (std::invalid_argument, as ParallelGrid). Requires an active MPI (std::logic_error
// otherwise: create an MpiSession first).
std::unique_ptr<ParallelGrid> make_nccl_grid(GridShape shape, int device,
                                             cudaStream_t compute = nullptr);

}  // namespace freqkv
