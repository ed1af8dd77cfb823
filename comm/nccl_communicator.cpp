// NcclCommunicator and make_nccl_grid: device-memory collectives over NCCL (see
// nccl_communicator.h).
#include "comm/nccl_communicator.h"

#include <cstring>
#include <exception>
#include <stdexcept>
#include <utility>

namespace freqkv {

std::string nccl_error_string(ncclResult_t result) {
  const char* text = ncclGetErrorString(result);
  return std::string(text != nullptr ? text : "unknown NCCL result") + " (ncclResult_t " +
         std::to_string(static_cast<int>(result)) + ")";
}

namespace {

ncclDataType_t nccl_type(CommDType dtype) {
  switch (dtype) {
    case CommDType::kF32: return ncclFloat32;
    case CommDType::kF64: return ncclFloat64;
    case CommDType::kBF16: return ncclBfloat16;
    case CommDType::kI32: return ncclInt32;
    case CommDType::kI64: return ncclInt64;
  }
  throw std::invalid_argument("NcclCommunicator: unknown CommDType value " +
                              std::to_string(static_cast<int>(dtype)));
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kMax: return ncclMax;
  }
  throw std::invalid_argument("NcclCommunicator: unknown ReduceOp value " +
                              std::to_string(static_cast<int>(op)));
}

std::string cuda_error_text(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")";
}

// The ncclUniqueId travels through the typed broadcast as int64 words, with NCCL's result first
// (so a failed ncclGetUniqueId on rank 0 reaches every rank instead of leaving them waiting).
constexpr int kUniqueIdWords =
    static_cast<int>((sizeof(ncclUniqueId) + sizeof(int64_t) - 1) / sizeof(int64_t));
struct UniqueIdMessage {
  int64_t result = 0;
  int64_t id_words[kUniqueIdWords] = {};
};

// All ranks learn whether any rank failed a step that each rank ran on its own, so that they all
// throw together instead of some of them waiting in the next collective. Returns normally only
// when every rank succeeded.
void agree_on_success(MpiCommunicator& group, const std::string& local_error,
                      const std::string& step) {
  const double failed = group.all_reduce_scalar(local_error.empty() ? 0.0 : 1.0, ReduceOp::kMax);
  if (failed == 0.0) return;
  if (!local_error.empty()) throw std::runtime_error(local_error);
  throw std::runtime_error(step + " failed on another rank of " + group.describe() +
                           " (its own message says why); this rank stops with it");
}

// The copy of LocalCommunicator's all_gather/reduce_scatter for device buffers. A plain function
// cannot know the compute stream, so it waits for the whole device first and copies synchronously:
// correct whichever stream produced or consumes the data. Only groups of one rank use it, where
// these calls are rare (the model skips collectives of size-1 groups).
void copy_device_memory_synchronously(void* dst, const void* src, size_t bytes) {
  cudaError_t status = cudaDeviceSynchronize();
  if (status == cudaSuccess) status = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault);
  if (status != cudaSuccess) {
    throw std::runtime_error("local communicator (a group of one rank on a GPU): copying " +
                             std::to_string(bytes) + " bytes: " + cuda_error_text(status));
  }
}

}  // namespace

// ---- construction ------------------------------------------------------------------------------

NcclCommunicator::NcclCommunicator(MPI_Comm comm, int device, cudaStream_t compute,
                                   std::string label)
    : host_(std::make_unique<MpiCommunicator>(comm, std::move(label))),
      device_(device),
      rank_(host_->rank()),
      size_(host_->size()),
      compute_(compute) {
  std::string error;
  int device_count = 0;
  const cudaError_t counted = cudaGetDeviceCount(&device_count);
  if (counted != cudaSuccess) {
    (void)cudaGetLastError();
    error = "NcclCommunicator for " + host_->describe() + ": no usable CUDA device: " +
            cuda_error_text(counted);
  } else if (device_ < 0 || device_ >= device_count) {
    error = "NcclCommunicator for " + host_->describe() + ": device " + std::to_string(device_) +
            " requested, but " + std::to_string(device_count) + " CUDA device(s) are visible";
  } else if (const cudaError_t selected = cudaSetDevice(device_); selected != cudaSuccess) {
    error = "NcclCommunicator for " + host_->describe() + ": cudaSetDevice(" +
            std::to_string(device_) + "): " + cuda_error_text(selected);
  }
  agree_on_success(*host_, error, "selecting the CUDA device");

  // Rank 0 makes the id, everyone receives it (and rank 0's result with it).
  UniqueIdMessage message;
  if (rank_ == 0) {
    ncclUniqueId id;
    message.result = static_cast<int64_t>(ncclGetUniqueId(&id));
    std::memcpy(message.id_words, &id, sizeof id);
  }
  static_assert(sizeof(UniqueIdMessage) % sizeof(int64_t) == 0, "whole int64 words");
  host_->broadcast(reinterpret_cast<int64_t*>(&message),
                   static_cast<int64_t>(sizeof message / sizeof(int64_t)), 0);
  const auto id_result = static_cast<ncclResult_t>(message.result);
  if (id_result != ncclSuccess) {
    throw std::runtime_error("ncclGetUniqueId failed on rank 0 of " + host_->describe() + ": " +
                             nccl_error_string(id_result));
  }
  ncclUniqueId id;
  std::memcpy(&id, message.id_words, sizeof id);

  const ncclResult_t joined = ncclCommInitRank(&comm_, size_, id, rank_);
  error.clear();
  if (joined != ncclSuccess) {
    comm_ = nullptr;
    const char* last = ncclGetLastError(nullptr);
    error = "ncclCommInitRank (rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
            ") failed on " + describe() + ": " + nccl_error_string(joined) +
            (last != nullptr && *last ? std::string("; last NCCL error: ") + last : std::string()) +
            " (if several ranks share one GPU, give each its own NCCL_HOSTID: see "
            "comm/nccl_communicator.h)";
  }
  try {
    agree_on_success(*host_, error, "ncclCommInitRank");
    create_stream_and_buffers();
  } catch (...) {
    release(/*abort=*/true);
    throw;
  }
}

NcclCommunicator::NcclCommunicator(Adopt, ncclComm_t comm, std::unique_ptr<MpiCommunicator> host,
                                   int device, cudaStream_t compute, StreamOrdering ordering)
    : comm_(comm),
      host_(std::move(host)),
      device_(device),
      rank_(host_->rank()),
      size_(host_->size()),
      compute_(compute),
      ordering_(ordering) {
  try {
    // ncclCommSplit and MPI_Comm_split order the members the same way (by key, then by rank in
    // the parent); a difference would send data to the wrong ranks, so it is checked once here.
    int nccl_rank = -1;
    int nccl_size = -1;
    check_nccl(ncclCommUserRank(comm_, &nccl_rank), "ncclCommUserRank", "");
    check_nccl(ncclCommCount(comm_, &nccl_size), "ncclCommCount", "");
    if (nccl_rank != rank_ || nccl_size != size_) {
      throw std::logic_error("NcclCommunicator: the NCCL split of " + describe() +
                             " made this rank " + std::to_string(nccl_rank) + " of " +
                             std::to_string(nccl_size) + ", the MPI split rank " +
                             std::to_string(rank_) + " of " + std::to_string(size_));
    }
    create_stream_and_buffers();
  } catch (...) {
    release(/*abort=*/true);
    throw;
  }
}

void NcclCommunicator::create_stream_and_buffers() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice", "");
  // Non-blocking: the legacy default stream does not serialise with it; ordering against the
  // compute stream is by events only.
  check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate", "");
  check_cuda(cudaEventCreateWithFlags(&compute_ready_, cudaEventDisableTiming), "cudaEventCreate",
             "");
  check_cuda(cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming), "cudaEventCreate", "");
  check_cuda(cudaMalloc(&scalar_device_, sizeof(double)), "cudaMalloc", "of the scalar word");
  check_cuda(cudaMallocHost(&scalar_host_, sizeof(double)), "cudaMallocHost",
             "of the pinned scalar word");
}

// ncclCommDestroy waits for the other ranks' side of shared resources; a rank leaving because of an
// exception must not wait for ranks that may never come, so it aborts instead.
NcclCommunicator::~NcclCommunicator() { release(/*abort=*/std::uncaught_exceptions() > 0); }

// Frees everything; errors are ignored (destructor and failed construction). `abort`: free the
// NCCL communicator without waiting for the other ranks (ncclCommAbort).
void NcclCommunicator::release(bool abort) noexcept {
  if (cudaSetDevice(device_) != cudaSuccess) (void)cudaGetLastError();
  if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
  if (comm_ != nullptr) {
    (void)(abort ? ncclCommAbort(comm_) : ncclCommDestroy(comm_));
    comm_ = nullptr;
  }
  if (scalar_host_ != nullptr) (void)cudaFreeHost(scalar_host_);
  scalar_host_ = nullptr;
  if (scalar_device_ != nullptr) (void)cudaFree(scalar_device_);
  scalar_device_ = nullptr;
  if (comm_done_ != nullptr) (void)cudaEventDestroy(comm_done_);
  comm_done_ = nullptr;
  if (compute_ready_ != nullptr) (void)cudaEventDestroy(compute_ready_);
  compute_ready_ = nullptr;
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  stream_ = nullptr;
  (void)cudaGetLastError();
}

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key,
                                                      const std::string& label) {
  if (color < 0) {
    throw std::invalid_argument("split of " + describe() + " into group '" + label +
                                "' with color " + std::to_string(color) +
                                ": colors must be >= 0");
  }
  std::unique_ptr<Communicator> host_part = host_->split(color, key, label);
  if (dynamic_cast<MpiCommunicator*>(host_part.get()) == nullptr) {
    throw std::logic_error("NcclCommunicator::split: the MPI split of " + describe() +
                           " is not an MpiCommunicator");
  }
  std::unique_ptr<MpiCommunicator> host(static_cast<MpiCommunicator*>(host_part.release()));

  check_cuda(cudaSetDevice(device_), "cudaSetDevice", "before ncclCommSplit");
  ncclComm_t part = nullptr;
  const ncclResult_t result = ncclCommSplit(comm_, color, key, &part, nullptr);
  std::string error;
  if (result != ncclSuccess) {
    const char* last = ncclGetLastError(comm_);
    error = "ncclCommSplit into group '" + label + "' (color " + std::to_string(color) + ", key " +
            std::to_string(key) + ") failed on " + describe() + ": " + nccl_error_string(result) +
            (last != nullptr && *last ? std::string("; last NCCL error: ") + last : std::string());
  } else if (part == nullptr) {
    error = "ncclCommSplit into group '" + label + "' on " + describe() +
            " returned no communicator for color " + std::to_string(color);
  }
  try {
    agree_on_success(*host_, error, "ncclCommSplit into group '" + label + "'");
  } catch (...) {
    if (part != nullptr) (void)ncclCommAbort(part);
    throw;
  }
  return std::unique_ptr<Communicator>(
      new NcclCommunicator(Adopt{}, part, std::move(host), device_, compute_, ordering_));
}

// ---- errors and checks -------------------------------------------------------------------------

std::string NcclCommunicator::describe() const {
  return "nccl " + host_->describe() + " on device " + std::to_string(device_);
}

void NcclCommunicator::check_nccl(ncclResult_t result, const char* call,
                                  const std::string& detail) const {
  if (result == ncclSuccess) return;
  const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : ncclGetLastError(nullptr);
  throw std::runtime_error(std::string(call) + (detail.empty() ? "" : " " + detail) +
                           " failed on " + describe() + ": " + nccl_error_string(result) +
                           (last != nullptr && *last ? std::string("; last NCCL error: ") + last
                                                     : std::string()));
}

void NcclCommunicator::check_cuda(cudaError_t status, const char* call,
                                  const std::string& detail) const {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // a non-sticky error must not resurface at the next check
  throw std::runtime_error(std::string(call) + (detail.empty() ? "" : " " + detail) +
                           " failed on " + describe() + ": " + cuda_error_text(status));
}

void NcclCommunicator::check_count(const char* operation, int64_t n) const {
  if (n < 0) {
    throw std::invalid_argument(std::string(operation) + " of " + std::to_string(n) +
                                " elements on " + describe() + ": the count must be >= 0");
  }
}

void NcclCommunicator::check_rank(const char* operation, const char* role, int r) const {
  if (r < 0 || r >= size_) {
    throw std::invalid_argument(std::string(operation) + " on " + describe() + ": " + role + " " +
                                std::to_string(r) + " is not a rank of the group (0.." +
                                std::to_string(size_ - 1) + ")");
  }
}

NcclCommunicator::Memory NcclCommunicator::memory_of(const void* p, const char* operation) const {
  cudaPointerAttributes attributes{};
  check_cuda(cudaPointerGetAttributes(&attributes, p), "cudaPointerGetAttributes",
             std::string("for the buffer of ") + operation);
  switch (attributes.type) {
    case cudaMemoryTypeUnregistered:
    case cudaMemoryTypeHost:
      return Memory::kHost;
    case cudaMemoryTypeManaged:
      return Memory::kDevice;
    case cudaMemoryTypeDevice:
      if (attributes.device != device_) {
        throw std::invalid_argument(std::string(operation) + " on " + describe() +
                                    ": the buffer lives on device " +
                                    std::to_string(attributes.device));
      }
      return Memory::kDevice;
  }
  throw std::invalid_argument(std::string(operation) + " on " + describe() +
                              ": unknown CUDA memory type " +
                              std::to_string(static_cast<int>(attributes.type)));
}

NcclCommunicator::Memory NcclCommunicator::memory_of(const void* a, const void* b,
                                                     const char* operation) const {
  const Memory first = memory_of(a, operation);
  if (memory_of(b, operation) != first) {
    throw std::invalid_argument(std::string(operation) + " on " + describe() +
                                ": one buffer is in host memory and the other on the device; "
                                "both must be one or the other");
  }
  return first;
}

// ---- stream ordering ---------------------------------------------------------------------------

void NcclCommunicator::begin(const char* operation) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice", std::string("before ") + operation);
  if (ordering_ != StreamOrdering::kAutomatic) return;
  check_cuda(cudaEventRecord(compute_ready_, compute_), "cudaEventRecord",
             std::string("on the compute stream before ") + operation);
  check_cuda(cudaStreamWaitEvent(stream_, compute_ready_, 0), "cudaStreamWaitEvent",
             std::string("of the communicator stream before ") + operation);
}

void NcclCommunicator::end(const char* operation) {
  if (ordering_ != StreamOrdering::kAutomatic) return;
  check_cuda(cudaEventRecord(comm_done_, stream_), "cudaEventRecord",
             std::string("on the communicator stream after ") + operation);
  check_cuda(cudaStreamWaitEvent(compute_, comm_done_, 0), "cudaStreamWaitEvent",
             std::string("of the compute stream after ") + operation);
}

void NcclCommunicator::wait_for(cudaStream_t producer) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice", "in wait_for");
  // The wait takes the event as recorded at this moment: re-recording it later is safe.
  check_cuda(cudaEventRecord(compute_ready_, producer), "cudaEventRecord",
             "on the producer stream (wait_for)");
  check_cuda(cudaStreamWaitEvent(stream_, compute_ready_, 0), "cudaStreamWaitEvent",
             "of the communicator stream (wait_for)");
}

void NcclCommunicator::record_on(cudaStream_t consumer) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice", "in record_on");
  check_cuda(cudaEventRecord(comm_done_, stream_), "cudaEventRecord",
             "on the communicator stream (record_on)");
  check_cuda(cudaStreamWaitEvent(consumer, comm_done_, 0), "cudaStreamWaitEvent",
             "of the consumer stream (record_on)");
}

void NcclCommunicator::synchronize() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice", "in synchronize");
  check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize",
             "(the fault may come from any collective enqueued since the last wait)");
  ncclResult_t async = ncclSuccess;
  check_nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError", "");
  check_nccl(async, "a collective", "(asynchronous error)");
}

// ---- collectives -------------------------------------------------------------------------------

void NcclCommunicator::all_reduce(void* data, int64_t n, CommDType dtype, ReduceOp op) {
  check_count("all_reduce", n);
  if (n == 0) return;
  if (memory_of(data, "all_reduce") == Memory::kHost) {
    host_->all_reduce(data, n, dtype, op);
    return;
  }
  begin("all_reduce");
  check_nccl(ncclAllReduce(data, data, static_cast<size_t>(n), nccl_type(dtype), nccl_op(op),
                           comm_, stream_),
             "ncclAllReduce",
             std::string("(") + reduce_op_name(op) + ") of " + comm_count_text(n, dtype));
  end("all_reduce");
}

void NcclCommunicator::start_all_reduce_sum(void* data, int64_t n, CommDType dtype) {
  check_count("start_all_reduce_sum", n);
  if (n == 0) return;
  if (memory_of(data, "start_all_reduce_sum") == Memory::kHost) {
    host_->start_all_reduce_sum(data, n, dtype);
    return;
  }
  wait_for(compute_);
  check_nccl(ncclAllReduce(data, data, static_cast<size_t>(n), nccl_type(dtype), ncclSum, comm_,
                           stream_),
             "ncclAllReduce", "(sum, overlapped) of " + comm_count_text(n, dtype));
  device_reductions_pending_ = true;
}

void NcclCommunicator::progress() { host_->progress(); }

void NcclCommunicator::wait_reductions() {
  host_->wait_reductions();
  if (!device_reductions_pending_) return;
  device_reductions_pending_ = false;
  record_on(compute_);
}

void NcclCommunicator::all_gather(const void* send, void* recv, int64_t n_per_rank,
                                  CommDType dtype) {
  check_count("all_gather", n_per_rank);
  if (n_per_rank == 0) return;
  if (memory_of(send, recv, "all_gather") == Memory::kHost) {
    host_->all_gather(send, recv, n_per_rank, dtype);
    return;
  }
  // NCCL's in-place form is the interface's: send is this rank's block of recv.
  begin("all_gather");
  check_nccl(ncclAllGather(send, recv, static_cast<size_t>(n_per_rank), nccl_type(dtype), comm_,
                           stream_),
             "ncclAllGather", "of " + comm_count_text(n_per_rank, dtype) + " per rank");
  end("all_gather");
}

void NcclCommunicator::reduce_scatter(const void* send, void* recv, int64_t n_per_rank,
                                      CommDType dtype) {
  check_count("reduce_scatter", n_per_rank);
  if (n_per_rank == 0) return;
  if (memory_of(send, recv, "reduce_scatter") == Memory::kHost) {
    host_->reduce_scatter(send, recv, n_per_rank, dtype);
    return;
  }
  begin("reduce_scatter");
  check_nccl(ncclReduceScatter(send, recv, static_cast<size_t>(n_per_rank), nccl_type(dtype),
                               ncclSum, comm_, stream_),
             "ncclReduceScatter", "(sum) of " + comm_count_text(n_per_rank, dtype) + " per rank");
  end("reduce_scatter");
}

void NcclCommunicator::broadcast(void* data, int64_t n, CommDType dtype, int root) {
  check_count("broadcast", n);
  check_rank("broadcast", "root", root);
  if (n == 0) return;
  if (memory_of(data, "broadcast") == Memory::kHost) {
    host_->broadcast(data, n, dtype, root);
    return;
  }
  begin("broadcast");
  check_nccl(ncclBroadcast(data, data, static_cast<size_t>(n), nccl_type(dtype), root, comm_,
                           stream_),
             "ncclBroadcast",
             "of " + comm_count_text(n, dtype) + " from root " + std::to_string(root));
  end("broadcast");
}

void NcclCommunicator::reduce_to(void* data, int64_t n, CommDType dtype, int root) {
  check_count("reduce_to", n);
  check_rank("reduce_to", "root", root);
  if (n == 0) return;
  if (memory_of(data, "reduce_to") == Memory::kHost) {
    host_->reduce_to(data, n, dtype, root);
    return;
  }
  begin("reduce_to");
  // The root reduces in place; the others pass no receive buffer (NCCL allows NULL there), so
  // nothing is written into their data.
  check_nccl(ncclReduce(data, rank_ == root ? data : nullptr, static_cast<size_t>(n),
                        nccl_type(dtype), ncclSum, root, comm_, stream_),
             "ncclReduce",
             "(sum) of " + comm_count_text(n, dtype) + " to root " + std::to_string(root));
  end("reduce_to");
}

void NcclCommunicator::send(const void* data, int64_t n, CommDType dtype, int peer) {
  check_count("send", n);
  check_rank("send", "peer", peer);
  if (peer == rank_) {
    throw std::invalid_argument("send on " + describe() + " to itself (peer " +
                                std::to_string(peer) + "): a blocking send to this rank would "
                                "wait forever for its own receive");
  }
  if (n == 0) return;
  if (memory_of(data, "send") == Memory::kHost) {
    host_->send(data, n, dtype, peer);
    return;
  }
  begin("send");
  check_nccl(ncclSend(data, static_cast<size_t>(n), nccl_type(dtype), peer, comm_, stream_),
             "ncclSend", "of " + comm_count_text(n, dtype) + " to peer " + std::to_string(peer));
  end("send");
}

void NcclCommunicator::recv(void* data, int64_t n, CommDType dtype, int peer) {
  check_count("recv", n);
  check_rank("recv", "peer", peer);
  if (peer == rank_) {
    throw std::invalid_argument("recv on " + describe() + " from itself (peer " +
                                std::to_string(peer) + "): a blocking receive from this rank "
                                "would wait forever for its own send");
  }
  if (n == 0) return;
  if (memory_of(data, "recv") == Memory::kHost) {
    host_->recv(data, n, dtype, peer);
    return;
  }
  begin("recv");
  check_nccl(ncclRecv(data, static_cast<size_t>(n), nccl_type(dtype), peer, comm_, stream_),
             "ncclRecv", "of " + comm_count_text(n, dtype) + " from peer " + std::to_string(peer));
  end("recv");
}

void NcclCommunicator::barrier() {
  synchronize();
  host_->barrier();
}

double NcclCommunicator::all_reduce_scalar(double value, ReduceOp op) {
  // Ordered like every collective (with automatic ordering it runs after the compute work enqueued
  // so far): NCCL kernels of different communicators must not run concurrently, or ranks that
  // reach them in different orders could wait on each other.
  begin("all_reduce_scalar");
  *scalar_host_ = value;
  check_cuda(cudaMemcpyAsync(scalar_device_, scalar_host_, sizeof(double), cudaMemcpyHostToDevice,
                             stream_),
             "cudaMemcpyAsync", "of the scalar to the device");
  check_nccl(ncclAllReduce(scalar_device_, scalar_device_, 1, ncclFloat64, nccl_op(op), comm_,
                           stream_),
             "ncclAllReduce", std::string("(") + reduce_op_name(op) + ") of one f64 scalar");
  check_cuda(cudaMemcpyAsync(scalar_host_, scalar_device_, sizeof(double), cudaMemcpyDeviceToHost,
                             stream_),
             "cudaMemcpyAsync", "of the scalar to the host");
  synchronize();
  end("all_reduce_scalar");
  return *scalar_host_;
}

// ---- placement and the grid ----------------------------------------------------------------------

int node_local_rank() {
  if (!MpiSession::active()) {
    throw std::logic_error("node_local_rank: MPI is not initialised (create an MpiSession first) "
                           "or was already finalised");
  }
  MPI_Comm node = MPI_COMM_NULL;
  const int code =
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  if (code != MPI_SUCCESS) {
    throw std::runtime_error("MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) of MPI_COMM_WORLD "
                             "failed: " + mpi_error_string(code));
  }
  int rank = 0;
  const int ranked = MPI_Comm_rank(node, &rank);
  MPI_Comm_free(&node);
  if (ranked != MPI_SUCCESS) {
    throw std::runtime_error("MPI_Comm_rank of the node communicator failed: " +
                             mpi_error_string(ranked));
  }
  return rank;
}

int device_for_this_rank() {
  // The collective part first, so that every rank reaches it even where a device is missing.
  const int local = MpiSession::active() ? node_local_rank() : 0;
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    throw std::runtime_error("device_for_this_rank: no CUDA device is visible to this rank" +
                             (status != cudaSuccess ? ": " + cuda_error_text(status)
                                                    : std::string()));
  }
  return local % count;
}

std::unique_ptr<ParallelGrid> make_nccl_grid(GridShape shape, int device, cudaStream_t compute) {
  if (!MpiSession::active()) {
    throw std::logic_error("make_nccl_grid: MPI is not initialised (create an MpiSession at the "
                           "start of main): NCCL is bootstrapped over MPI_COMM_WORLD");
  }
  // A bad shape is the same error on every rank, before any NCCL start-up is paid for.
  ParallelGrid::validate(shape, MpiSession::world_size());
  auto world = std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, device, compute, "world");
  return std::make_unique<ParallelGrid>(std::move(world), shape, &copy_device_memory_synchronously);
}

}  // namespace freqkv
