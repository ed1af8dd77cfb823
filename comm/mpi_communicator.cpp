// MpiSession and MpiCommunicator: host-memory collectives over MPI (see mpi_communicator.h).
#include "comm/mpi_communicator.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <utility>

namespace freqkv {

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) {
    return "MPI error code " + std::to_string(code);
  }
  return std::string(text, static_cast<size_t>(length));
}

namespace {

// ---- bf16: a user datatype and user reduction operations -----------------------------------------

void bf16_sum(void* in, void* inout, int* length, MPI_Datatype*) {
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *length; ++i) {
    b[i] = bf16::from_float(bf16::to_float(a[i]) + bf16::to_float(b[i]));
  }
}

void bf16_max(void* in, void* inout, int* length, MPI_Datatype*) {
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *length; ++i) {
    const float x = bf16::to_float(a[i]);
    // A NaN in b stays (x > NaN is false); a NaN in a replaces b.
    if (std::isnan(x) || x > bf16::to_float(b[i])) b[i] = a[i];
  }
}

struct Bf16MpiObjects {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  MPI_Op sum = MPI_OP_NULL;
  MPI_Op max = MPI_OP_NULL;
  int self_keyval = MPI_KEYVAL_INVALID;
};

std::mutex& bf16_mutex() {
  static std::mutex mutex;
  return mutex;
}

Bf16MpiObjects& bf16_objects_storage() {
  static Bf16MpiObjects objects;
  return objects;
}

// MPI_Finalize deletes MPI_COMM_SELF's attributes first, while MPI calls are still allowed: the
// moment to free the user objects, whoever finalises MPI.
int free_bf16_objects(MPI_Comm, int, void*, void*) {
  std::lock_guard<std::mutex> lock(bf16_mutex());
  Bf16MpiObjects& objects = bf16_objects_storage();
  if (objects.type != MPI_DATATYPE_NULL) MPI_Type_free(&objects.type);
  if (objects.sum != MPI_OP_NULL) MPI_Op_free(&objects.sum);
  if (objects.max != MPI_OP_NULL) MPI_Op_free(&objects.max);
  objects = Bf16MpiObjects{};
  return MPI_SUCCESS;
}

void check_setup(int code, const char* call) {
  if (code != MPI_SUCCESS) {
    throw std::runtime_error(std::string(call) + " failed while creating the bf16 MPI datatype "
                             "and reduction operations: " + mpi_error_string(code));
  }
}

const Bf16MpiObjects& bf16_objects() {
  std::lock_guard<std::mutex> lock(bf16_mutex());
  Bf16MpiObjects& objects = bf16_objects_storage();
  if (objects.type != MPI_DATATYPE_NULL) return objects;
  static_assert(sizeof(bf16) == sizeof(uint16_t), "bf16 travels as one uint16_t");
  check_setup(MPI_Type_contiguous(1, MPI_UINT16_T, &objects.type), "MPI_Type_contiguous");
  check_setup(MPI_Type_commit(&objects.type), "MPI_Type_commit");
  check_setup(MPI_Op_create(&bf16_sum, /*commute=*/1, &objects.sum), "MPI_Op_create(sum)");
  check_setup(MPI_Op_create(&bf16_max, /*commute=*/1, &objects.max), "MPI_Op_create(max)");
  check_setup(MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, &free_bf16_objects,
                                     &objects.self_keyval, nullptr),
              "MPI_Comm_create_keyval");
  check_setup(MPI_Comm_set_attr(MPI_COMM_SELF, objects.self_keyval, nullptr),
              "MPI_Comm_set_attr(MPI_COMM_SELF)");
  return objects;
}

MPI_Datatype mpi_type(CommDType dtype) {
  switch (dtype) {
    case CommDType::kF32: return MPI_FLOAT;
    case CommDType::kF64: return MPI_DOUBLE;
    case CommDType::kI32: return MPI_INT32_T;
    case CommDType::kI64: return MPI_INT64_T;
    case CommDType::kBF16: return bf16_objects().type;
  }
  throw std::invalid_argument("MpiCommunicator: unknown CommDType value " +
                              std::to_string(static_cast<int>(dtype)));
}

MPI_Op mpi_op(CommDType dtype, ReduceOp op) {
  if (op != ReduceOp::kSum && op != ReduceOp::kMax) {
    throw std::invalid_argument("MpiCommunicator: unknown ReduceOp value " +
                                std::to_string(static_cast<int>(op)));
  }
  if (dtype == CommDType::kBF16) {
    return op == ReduceOp::kSum ? bf16_objects().sum : bf16_objects().max;
  }
  return op == ReduceOp::kSum ? MPI_SUM : MPI_MAX;
}

// A committed MPI datatype freed at the end of the scope.
class ScopedType {
 public:
  ScopedType() = default;
  ~ScopedType() {
    if (type_ != MPI_DATATYPE_NULL) MPI_Type_free(&type_);
  }
  ScopedType(const ScopedType&) = delete;
  ScopedType& operator=(const ScopedType&) = delete;
  MPI_Datatype* out() { return &type_; }
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

const char* getenv_nonempty(const char* name) {
  const char* value = std::getenv(name);
  return value && *value ? value : nullptr;
}

std::mutex& session_mutex() {
  static std::mutex mutex;
  return mutex;
}

// One tag for all point-to-point traffic: messages between two ranks of one communicator with one
// tag arrive in the order they were sent, which keeps the chunks of a message in order.
constexpr int kPointToPointTag = 7;

}  // namespace

// ---- MpiSession --------------------------------------------------------------------------------

MpiSession::MpiSession(int* argc, char*** argv) : owns_mpi_(initialize(argc, argv)) {}

MpiSession::~MpiSession() {
  if (!owns_mpi_) return;
  try {
    finalize();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "freqkv: %s\n", error.what());
  }
}

bool MpiSession::initialize(int* argc, char*** argv) {
  std::lock_guard<std::mutex> lock(session_mutex());
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (finalized) {
    throw std::runtime_error("MpiSession: MPI was already finalised in this process and cannot "
                             "be initialised again; keep one MpiSession for the whole program");
  }
  if (initialized) return false;
  // Singleton init (no launcher): Open MPI would otherwise fork an orted daemon, which fails on
  // machines without a usable network interface; one rank needs none. setenv's last argument 0
  // keeps a value the user set.
  if (!started_by_launcher()) setenv("OMPI_MCA_ess_singleton_isolated", "1", 0);
  int provided = MPI_THREAD_SINGLE;
  const int code = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  if (code != MPI_SUCCESS) {
    throw std::runtime_error("MPI_Init_thread(MPI_THREAD_FUNNELED) failed: " +
                             mpi_error_string(code));
  }
  if (provided < MPI_THREAD_FUNNELED) {
    MPI_Finalize();
    throw std::runtime_error("MPI_Init_thread: this MPI library gives thread level " +
                             std::to_string(provided) + ", freqkv needs MPI_THREAD_FUNNELED (" +
                             std::to_string(MPI_THREAD_FUNNELED) +
                             "): the main thread calls MPI while OpenMP threads exist");
  }
  return true;
}

void MpiSession::finalize() {
  std::lock_guard<std::mutex> lock(session_mutex());
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return;
  const int code = MPI_Finalize();
  if (code != MPI_SUCCESS) {
    throw std::runtime_error("MPI_Finalize failed: " + mpi_error_string(code));
  }
}

bool MpiSession::active() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

bool MpiSession::started_by_launcher() {
  return getenv_nonempty("OMPI_COMM_WORLD_SIZE") || getenv_nonempty("PMIX_RANK") ||
         getenv_nonempty("PMI_RANK") || getenv_nonempty("PMI_SIZE");
}

int MpiSession::world_rank() {
  if (!active()) {
    throw std::logic_error("MpiSession::world_rank: MPI is not initialised (create an MpiSession "
                           "first) or was already finalised");
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int MpiSession::world_size() {
  if (!active()) {
    throw std::logic_error("MpiSession::world_size: MPI is not initialised (create an MpiSession "
                           "first) or was already finalised");
  }
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// ---- MpiCommunicator: construction -------------------------------------------------------------

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string label, int64_t max_chunk)
    : label_(std::move(label)), max_chunk_(max_chunk) {
  if (max_chunk_ < 1 || max_chunk_ > INT_MAX) {
    throw std::invalid_argument("MpiCommunicator '" + label_ + "': max_chunk " +
                                std::to_string(max_chunk_) + " is outside 1.." +
                                std::to_string(INT_MAX) + " (elements per MPI call)");
  }
  if (!MpiSession::active()) {
    throw std::logic_error("MpiCommunicator '" + label_ + "': MPI is not initialised (create an "
                           "MpiSession first) or was already finalised");
  }
  if (comm == MPI_COMM_NULL) {
    throw std::invalid_argument("MpiCommunicator '" + label_ + "': MPI_COMM_NULL given");
  }
  const int code = MPI_Comm_dup(comm, &comm_);
  if (code != MPI_SUCCESS) {
    throw std::runtime_error("MPI_Comm_dup failed for group '" + label_ + "': " +
                             mpi_error_string(code));
  }
  init_members();
}

MpiCommunicator::MpiCommunicator(Adopt, MPI_Comm comm, std::string label, int64_t max_chunk)
    : comm_(comm), label_(std::move(label)), max_chunk_(max_chunk) {
  init_members();
}

void MpiCommunicator::init_members() {
  try {
    // Only this communicator's handler changes; a failure returns a code that check() turns
    // into an exception instead of aborting every rank.
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler", "");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank", "");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size", "");
    MPI_Group group = MPI_GROUP_NULL;
    MPI_Group world_group = MPI_GROUP_NULL;
    check(MPI_Comm_group(comm_, &group), "MPI_Comm_group", "");
    check(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "MPI_Comm_group", "of MPI_COMM_WORLD");
    std::vector<int> ranks(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r) ranks[static_cast<size_t>(r)] = r;
    world_ranks_.assign(static_cast<size_t>(size_), MPI_UNDEFINED);
    const int code =
        MPI_Group_translate_ranks(group, size_, ranks.data(), world_group, world_ranks_.data());
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
    check(code, "MPI_Group_translate_ranks", "to world ranks");
  } catch (...) {
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    throw;
  }
}

MpiCommunicator::~MpiCommunicator() {
  if (!MpiSession::active()) return;
  // Reductions still in flight (an exception unwound past wait_reductions) must finish before
  // their communicator goes; errors no longer matter here.
  if (!pending_.empty())
    MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE);
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key, const std::string& label) {
  if (color < 0) {
    throw std::invalid_argument("split of " + describe() + " into group '" + label +
                                "' with color " + std::to_string(color) +
                                ": colors must be >= 0");
  }
  MPI_Comm part = MPI_COMM_NULL;
  check(MPI_Comm_split(comm_, color, key, &part), "MPI_Comm_split",
        "into group '" + label + "' (color " + std::to_string(color) + ", key " +
            std::to_string(key) + ")");
  return std::unique_ptr<Communicator>(new MpiCommunicator(Adopt{}, part, label, max_chunk_));
}

// ---- errors ------------------------------------------------------------------------------------

std::string MpiCommunicator::describe() const {
  std::string text = "group '" + label_ + "'";
  if (world_ranks_.empty()) return text;
  return text + " (world ranks " + format_rank_list(world_ranks_) + "; this is rank " +
         std::to_string(rank_) + " of " + std::to_string(size_) + ")";
}

void MpiCommunicator::check(int code, const char* call, const std::string& detail) const {
  if (code == MPI_SUCCESS) return;
  throw std::runtime_error(std::string(call) + (detail.empty() ? "" : " " + detail) +
                           " failed on " + describe() + ": " + mpi_error_string(code));
}

void MpiCommunicator::check_count(const char* operation, int64_t n) const {
  if (n < 0) {
    throw std::invalid_argument(std::string(operation) + " of " + std::to_string(n) +
                                " elements on " + describe() + ": the count must be >= 0");
  }
}

void MpiCommunicator::check_rank(const char* operation, const char* role, int r) const {
  if (r < 0 || r >= size_) {
    throw std::invalid_argument(std::string(operation) + " on " + describe() + ": " + role + " " +
                                std::to_string(r) + " is not a rank of the group (0.." +
                                std::to_string(size_ - 1) + ")");
  }
}

// ---- collectives -------------------------------------------------------------------------------

void MpiCommunicator::all_reduce(void* data, int64_t n, CommDType dtype, ReduceOp op) {
  check_count("all_reduce", n);
  if (n == 0) return;
  const MPI_Datatype type = mpi_type(dtype);
  const MPI_Op mpi_reduce = mpi_op(dtype, op);
  auto* bytes = static_cast<unsigned char*>(data);
  const size_t element = comm_dtype_size(dtype);
  for (int64_t offset = 0; offset < n; offset += max_chunk_) {
    const int count = static_cast<int>(std::min(max_chunk_, n - offset));
    check(MPI_Allreduce(MPI_IN_PLACE, bytes + offset * element, count, type, mpi_reduce, comm_),
          "MPI_Allreduce",
          "(" + std::string(reduce_op_name(op)) + ") of " + comm_count_text(n, dtype));
  }
}

void MpiCommunicator::start_all_reduce_sum(void* data, int64_t n, CommDType dtype) {
  check_count("start_all_reduce_sum", n);
  const MPI_Datatype type = mpi_type(dtype);
  const MPI_Op sum = mpi_op(dtype, ReduceOp::kSum);
  auto* bytes = static_cast<unsigned char*>(data);
  const size_t element = comm_dtype_size(dtype);
  for (int64_t offset = 0; offset < n; offset += max_chunk_) {
    const int count = static_cast<int>(std::min(max_chunk_, n - offset));
    MPI_Request request = MPI_REQUEST_NULL;
    check(MPI_Iallreduce(MPI_IN_PLACE, bytes + offset * element, count, type, sum, comm_, &request),
          "MPI_Iallreduce", "(sum) of " + comm_count_text(n, dtype));
    pending_.push_back(request);
  }
  pending_elements_ += n;
}

void MpiCommunicator::progress() {
  if (pending_.empty()) return;
  int done = 0;
  check(MPI_Testall(static_cast<int>(pending_.size()), pending_.data(), &done, MPI_STATUSES_IGNORE),
        "MPI_Testall", "of " + std::to_string(pending_.size()) + " started reductions");
}

void MpiCommunicator::wait_reductions() {
  if (pending_.empty()) return;
  const std::string what = std::to_string(pending_.size()) + " started reductions (" +
                           std::to_string(pending_elements_) + " elements)";
  const int code =
      MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE);
  pending_.clear();
  pending_elements_ = 0;
  check(code, "MPI_Waitall", "of " + what);
}

void MpiCommunicator::all_gather(const void* send, void* recv, int64_t n_per_rank,
                                 CommDType dtype) {
  check_count("all_gather", n_per_rank);
  if (n_per_rank == 0) return;
  const MPI_Datatype type = mpi_type(dtype);
  const size_t element = comm_dtype_size(dtype);
  auto* out = static_cast<unsigned char*>(recv);
  const auto* in = static_cast<const unsigned char*>(send);
  // MPI forbids send aliasing recv; this rank's own block of recv is MPI's in-place form.
  const bool in_place = in == out + static_cast<size_t>(rank_) * n_per_rank * element;
  const std::string detail = "of " + comm_count_text(n_per_rank, dtype) + " per rank";
  if (n_per_rank <= max_chunk_) {
    const int count = static_cast<int>(n_per_rank);
    check(MPI_Allgather(in_place ? MPI_IN_PLACE : send, count, type, recv, count, type, comm_),
          "MPI_Allgather", detail);
    return;
  }
  // Chunk [offset, offset + count) of every rank's block: a receive type of `count` elements
  // whose extent is a whole block puts rank r's chunk at r * n_per_rank + offset.
  for (int64_t offset = 0; offset < n_per_rank; offset += max_chunk_) {
    const int count = static_cast<int>(std::min(max_chunk_, n_per_rank - offset));
    ScopedType contiguous;
    ScopedType block;
    check(MPI_Type_contiguous(count, type, contiguous.out()), "MPI_Type_contiguous", detail);
    check(MPI_Type_create_resized(contiguous.get(), 0,
                                  static_cast<MPI_Aint>(n_per_rank * element), block.out()),
          "MPI_Type_create_resized", detail);
    check(MPI_Type_commit(block.out()), "MPI_Type_commit", detail);
    check(MPI_Allgather(in_place ? MPI_IN_PLACE : in + offset * element, count, type,
                        out + offset * element, 1, block.get(), comm_),
          "MPI_Allgather", detail);
  }
}

void MpiCommunicator::reduce_scatter(const void* send, void* recv, int64_t n_per_rank,
                                     CommDType dtype) {
  check_count("reduce_scatter", n_per_rank);
  if (n_per_rank == 0) return;
  const MPI_Datatype type = mpi_type(dtype);
  const MPI_Op sum = mpi_op(dtype, ReduceOp::kSum);
  const size_t element = comm_dtype_size(dtype);
  const std::string detail = "(sum) of " + comm_count_text(n_per_rank, dtype) + " per rank";
  // One MPI call reduces size_ blocks: keep the whole call within max_chunk elements.
  const int64_t chunk = std::max<int64_t>(1, max_chunk_ / size_);
  if (n_per_rank <= chunk) {
    check(MPI_Reduce_scatter_block(send, recv, static_cast<int>(n_per_rank), type, sum, comm_),
          "MPI_Reduce_scatter_block", detail);
    return;
  }
  // Chunk [offset, offset + count) of every block, packed contiguously rank after rank.
  const auto* in = static_cast<const unsigned char*>(send);
  auto* out = static_cast<unsigned char*>(recv);
  std::vector<unsigned char> packed(static_cast<size_t>(chunk * size_) * element);
  for (int64_t offset = 0; offset < n_per_rank; offset += chunk) {
    const int64_t count = std::min(chunk, n_per_rank - offset);
    for (int r = 0; r < size_; ++r) {
      std::memcpy(packed.data() + static_cast<size_t>(r * count) * element,
                  in + static_cast<size_t>(r * n_per_rank + offset) * element,
                  static_cast<size_t>(count) * element);
    }
    check(MPI_Reduce_scatter_block(packed.data(), out + offset * element, static_cast<int>(count),
                                   type, sum, comm_),
          "MPI_Reduce_scatter_block", detail);
  }
}

void MpiCommunicator::broadcast(void* data, int64_t n, CommDType dtype, int root) {
  check_count("broadcast", n);
  check_rank("broadcast", "root", root);
  if (n == 0) return;
  const MPI_Datatype type = mpi_type(dtype);
  auto* bytes = static_cast<unsigned char*>(data);
  const size_t element = comm_dtype_size(dtype);
  for (int64_t offset = 0; offset < n; offset += max_chunk_) {
    const int count = static_cast<int>(std::min(max_chunk_, n - offset));
    check(MPI_Bcast(bytes + offset * element, count, type, root, comm_), "MPI_Bcast",
          "of " + comm_count_text(n, dtype) + " from root " + std::to_string(root));
  }
}

void MpiCommunicator::reduce_to(void* data, int64_t n, CommDType dtype, int root) {
  check_count("reduce_to", n);
  check_rank("reduce_to", "root", root);
  if (n == 0) return;
  const MPI_Datatype type = mpi_type(dtype);
  const MPI_Op sum = mpi_op(dtype, ReduceOp::kSum);
  auto* bytes = static_cast<unsigned char*>(data);
  const size_t element = comm_dtype_size(dtype);
  for (int64_t offset = 0; offset < n; offset += max_chunk_) {
    const int count = static_cast<int>(std::min(max_chunk_, n - offset));
    unsigned char* chunk = bytes + offset * element;
    // The root sums in place; the others only send (MPI leaves their buffer as it is).
    check(MPI_Reduce(rank_ == root ? MPI_IN_PLACE : chunk, rank_ == root ? chunk : nullptr,
                     count, type, sum, root, comm_),
          "MPI_Reduce",
          "(sum) of " + comm_count_text(n, dtype) + " to root " + std::to_string(root));
  }
}

void MpiCommunicator::send(const void* data, int64_t n, CommDType dtype, int peer) {
  check_count("send", n);
  check_rank("send", "peer", peer);
  if (peer == rank_) {
    throw std::invalid_argument("send on " + describe() + " to peer " + std::to_string(peer) +
                                ", which is this rank: a blocking send to itself never completes");
  }
  const MPI_Datatype type = mpi_type(dtype);
  const auto* bytes = static_cast<const unsigned char*>(data);
  const size_t element = comm_dtype_size(dtype);
  for (int64_t offset = 0; offset < n; offset += max_chunk_) {
    const int count = static_cast<int>(std::min(max_chunk_, n - offset));
    check(MPI_Send(bytes + offset * element, count, type, peer, kPointToPointTag, comm_),
          "MPI_Send", "of " + comm_count_text(n, dtype) + " to peer " + std::to_string(peer));
  }
}

void MpiCommunicator::recv(void* data, int64_t n, CommDType dtype, int peer) {
  check_count("recv", n);
  check_rank("recv", "peer", peer);
  if (peer == rank_) {
    throw std::invalid_argument("recv on " + describe() + " from peer " + std::to_string(peer) +
                                ", which is this rank: a blocking recv from itself never "
                                "completes");
  }
  const MPI_Datatype type = mpi_type(dtype);
  auto* bytes = static_cast<unsigned char*>(data);
  const size_t element = comm_dtype_size(dtype);
  const std::string detail =
      "of " + comm_count_text(n, dtype) + " from peer " + std::to_string(peer);
  for (int64_t offset = 0; offset < n; offset += max_chunk_) {
    const int count = static_cast<int>(std::min(max_chunk_, n - offset));
    MPI_Status status;
    check(MPI_Recv(bytes + offset * element, count, type, peer, kPointToPointTag, comm_, &status),
          "MPI_Recv", detail);
    // A shorter message is no MPI error, but it is a mismatch with the sender's count.
    int received = 0;
    check(MPI_Get_count(&status, type, &received), "MPI_Get_count", detail);
    if (received != count) {
      throw std::runtime_error("MPI_Recv " + detail + " on " + describe() + ": expected " +
                               std::to_string(count) + " elements at offset " +
                               std::to_string(offset) + ", the message held " +
                               std::to_string(received) + " (send and recv counts differ)");
    }
  }
}

void MpiCommunicator::barrier() { check(MPI_Barrier(comm_), "MPI_Barrier", ""); }

double MpiCommunicator::all_reduce_scalar(double value, ReduceOp op) {
  check(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, mpi_op(CommDType::kF64, op), comm_),
        "MPI_Allreduce", "(" + std::string(reduce_op_name(op)) + ") of one f64 scalar");
  return value;
}

}  // namespace freqkv
