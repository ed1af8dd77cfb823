// CUDA emulation: NCCL over MPI (include/nccl.h), so NcclCommunicator and its tests run on the CPU.
// The processes are MPI ranks started by mpirun, each with its emulated device (cuda_runtime.h:
// "device" memory is host memory, every stream is the host thread, work runs when enqueued).
// Semantics are NCCL's documented ones (nccl.h, the NCCL user guide); this file is an independent
// check of how the project calls NCCL, so it checks more than NCCL does and says why on stderr.
//
// Communicators
//   * ncclGetUniqueId writes an id naming this process (its MPI_COMM_WORLD rank) and a serial
//     number. ncclCommInitRank(comm, nranks, id, rank) is collective over the nranks processes
//     that pass the same id, as in NCCL; the emulation's bootstrap: every member sends (rank,
//     nranks, host id, device) to the id's creator over MPI_COMM_WORLD (tag from the serial), the
//     creator checks them (same nranks, ranks distinct and in range, no two ranks on the same
//     GPU -- below) and answers everyone with the verdict and the members' world ranks in NCCL
//     rank order; the members then make their MPI communicator with MPI_Comm_create_group, which
//     involves the members only, so any subset of the world can form a communicator. Limit: the
//     process that called ncclGetUniqueId must itself join (real NCCL runs a bootstrap thread
//     there); a member waiting for a creator that never comes says so on stderr.
//   * Duplicate GPUs: NCCL refuses a communicator in which two ranks have the same host hash and
//     the same device ("Duplicate GPU detected", ncclInvalidUsage). Every emulated process has one
//     device, device 0, so ranks on one host collide unless each has its own NCCL_HOSTID -- as on
//     a real machine with one GPU (comm/nccl_communicator.h). FREQKV_EMU_NCCL_DISTINCT_GPUS=1
//     treats every process as its own GPU instead.
//   * ncclCommSplit is MPI_Comm_split of the parent's communicator (color NCCL_SPLIT_NOCOLOR:
//     MPI_UNDEFINED, *newcomm = NULL); ordering by key, ties by parent rank, as in NCCL. The child
//     keeps the parent's device. Colors other than >= 0 or NCCL_SPLIT_NOCOLOR are refused.
//   * A communicator is live from its creation to ncclCommDestroy/Abort; any call with another
//     pointer (destroyed, never made) is ncclInvalidArgument instead of undefined behaviour.
//   * Config (ncclCommInitRankConfig, ncclCommSplit): when given it must carry
//     NCCL_CONFIG_INITIALIZER's magic; non-blocking communicators are made blocking (every call
//     returns ncclSuccess once done, which NCCL allows).
//
// Collectives (AllReduce, Reduce, Broadcast/Bcast, AllGather, ReduceScatter) run when they are
// called (the stream is the host thread), through MPI's nonblocking collectives on the
// communicator's MPI communicator, polled (a rank that waits long says so on stderr). Checks, each
// a ncclInvalidArgument with the reason on stderr:
//   * comm live; datatype in [0, ncclNumTypes); op in [0, ncclNumOps); root in [0, nranks);
//   * buffers (when count > 0): every buffer the call reads or writes on this rank must be memory
//     the device can reach -- cudaMalloc'd (device or managed) on the communicator's device, or
//     pinned host memory (cudaMallocHost) -- at both its first and its last byte. Ordinary host
//     memory is refused (NCCL's kernels would fault on it). Buffers NCCL ignores are not checked
//     (Broadcast's sendbuff off the root, Reduce's recvbuff off the root, which may be NULL);
//   * overlap: send and receive ranges either are disjoint or are NCCL's in-place form exactly
//     (sendbuff == recvbuff; AllGather: sendbuff == recvbuff + rank * sendcount; ReduceScatter:
//     recvbuff == sendbuff + rank * recvcount). Other overlaps are undefined in NCCL.
// Data moves through staging copies, which makes every in-place form trivially right; the copies
// are memcpy, which AddressSanitizer checks, so a buffer too short for count elements whose end
// still lies in another allocation stops the test with a heap-buffer-overflow report. count == 0 does nothing (as in NCCL). Counts beyond INT_MAX go
// in chunks (FREQKV_EMU_NCCL_CHUNK sets a smaller chunk, to test that path).
// Reductions as NCCL's kernels compute them: integers with MPI's built-in ops (wrapping); f32/f64
// sum and prod with MPI's, max/min with fmax/fmin (NCCL's: a NaN loses to a number); f16 and bf16
// with user-defined MPI ops that convert both operands to float, combine and round to nearest even
// (NCCL's __hadd/__hmul/__hmax on sm_80+); ncclAvg as NCCL: floating types pre-multiplied by 1/nranks
// (in the element type) then summed, integers summed then divided (truncation). fp8 types move
// (Broadcast, AllGather, Send/Recv) but do not reduce here: ncclInvalidUsage.
//
// Point to point. On a GPU ncclSend and ncclRecv return once enqueued and block their stream until
// the peer's matching call runs. Here the stream is the host thread, and kernels enqueued after a
// call run at once, so:
//   * ncclRecv, like every collective here, blocks the host until it is done: its data has arrived
//     (whatever runs next may read it). So a rank that receives and then enters a host barrier
//     which the sender reaches before its send deadlocks here but not on a GPU, where the host
//     does not wait; a long wait says so on stderr.
//   * ncclSend copies the data at once (the point where its stream reaches it) and starts a
//     synchronous-mode MPI_Issend from the copy, so the call returns and the caller may reuse the
//     buffer. The send is complete when the receiver has matched it, and it must complete before
//     anything that follows it on the device: the next NCCL call on the same communicator (NCCL
//     serialises a communicator's operations) or on the same stream (stream order) waits for it,
//     and so does every host synchronisation (cudaStreamSynchronize, cudaEventSynchronize,
//     cudaDeviceSynchronize, through emu::add_synchronize_hook: the hook cannot tell streams
//     apart, so it waits for all pending sends -- stricter than a GPU where only the synchronised
//     stream's sends would matter), ncclCommFinalize and ncclCommDestroy. So a send-send cycle
//     that deadlocks on a GPU (both ranks send first, no group) deadlocks here as well, instead of
//     passing because MPI buffered the message.
//   * Every message carries (datatype, count); ncclRecv checks them against its own arguments
//     (NCCL requires the same datatype and count on both sides but cannot check).
//   * Group calls (ncclGroupStart/End) queue the calls and run them at the outermost ncclGroupEnd:
//     all sends and receives are posted first, so grouped exchanges that need concurrency (a rank
//     sending to and receiving from the same peer) complete; then the collectives in call order;
//     then the receives are waited for. An error inside a group makes ncclGroupEnd return it and
//     nothing of the group runs. Communicator creation inside a group is not emulated
//     (ncclInvalidUsage).
//
// Errors: every failing call returns NCCL's result for it and prints
// "[world rank r] emulated NCCL: <call>(<arguments>): <reason>" to stderr; ncclGetLastError
// returns that text. Failures of MPI itself are ncclSystemError (a send's, also the
// communicator's asynchronous error, ncclCommGetAsyncError).
#include <mpi.h>
#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <list>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

// ---- the communicator ---------------------------------------------------------------------------
struct ncclComm {
  MPI_Comm mpi = MPI_COMM_NULL;  // its ranks are the NCCL ranks, in the same order
  int rank = 0;
  int nranks = 1;
  int device = 0;
  ncclResult_t async_error = ncclSuccess;
  bool finalized = false;
};

namespace {

// ---- process state ------------------------------------------------------------------------------

struct PendingSend {
  ncclComm* comm;
  cudaStream_t stream;
  MPI_Request request;
  std::vector<char> message;  // header + data, alive until the send completes
  std::string call;           // for messages
};

struct GroupOp {
  enum Kind { kCollective, kSend, kRecv } kind;
  ncclComm* comm = nullptr;
  cudaStream_t stream = nullptr;
  std::function<ncclResult_t()> run;  // collectives
  const void* sendbuff = nullptr;     // point to point
  void* recvbuff = nullptr;
  size_t count = 0;
  ncclDataType_t datatype = ncclInt8;
  int peer = 0;
  std::string call;
};

struct State {
  std::set<const ncclComm*> live;
  std::list<PendingSend> pending;
  std::string last_error;
  int group_depth = 0;
  ncclResult_t group_error = ncclSuccess;
  std::vector<GroupOp> group_ops;
  uint64_t next_serial = 1;
  std::set<uint64_t> used_serials;  // ids of this process already used to make a communicator
  bool hook_registered = false;
  // Messages of sends abandoned by ncclCommAbort: MPI may still read them, so they stay (reachable,
  // so LeakSanitizer does not count them).
  std::vector<std::vector<char>> abandoned;
};

// Never destroyed: the synchronisation hook may run while the process exits.
State& state() {
  static State* instance = new State;
  return *instance;
}

int world_rank() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return -1;
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

bool mpi_usable() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

const char* result_name(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
    default: return "ncclResult_t(?)";
  }
}

std::string type_name(ncclDataType_t t) {
  switch (t) {
    case ncclInt8: return "ncclInt8";
    case ncclUint8: return "ncclUint8";
    case ncclInt32: return "ncclInt32";
    case ncclUint32: return "ncclUint32";
    case ncclInt64: return "ncclInt64";
    case ncclUint64: return "ncclUint64";
    case ncclFloat16: return "ncclFloat16";
    case ncclFloat32: return "ncclFloat32";
    case ncclFloat64: return "ncclFloat64";
    case ncclBfloat16: return "ncclBfloat16";
    case ncclFloat8e4m3: return "ncclFloat8e4m3";
    case ncclFloat8e5m2: return "ncclFloat8e5m2";
    default: return "ncclDataType_t(" + std::to_string(static_cast<int>(t)) + ")";
  }
}

std::string op_name(ncclRedOp_t op) {
  switch (op) {
    case ncclSum: return "ncclSum";
    case ncclProd: return "ncclProd";
    case ncclMax: return "ncclMax";
    case ncclMin: return "ncclMin";
    case ncclAvg: return "ncclAvg";
    default: return "ncclRedOp_t(" + std::to_string(static_cast<int>(op)) + ")";
  }
}

std::string pointer_text(const void* p) {
  if (p == nullptr) return "NULL";
  std::ostringstream s;
  s << p;
  return s.str();
}

std::string comm_text(const ncclComm* c) {
  if (c == nullptr) return "comm=NULL";
  std::string text = "comm=" + pointer_text(c);
  if (state().live.count(c) != 0) {
    text += " (rank " + std::to_string(c->rank) + " of " + std::to_string(c->nranks) +
            ", device " + std::to_string(c->device) + ")";
  }
  return text;
}

// One line to stderr, written at once (the ranks' lines must not interleave).
void report(const std::string& text) {
  const std::string line = "[world rank " + std::to_string(world_rank()) + "] " + text + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

// Records and prints a failure; returns `code`.
ncclResult_t fail(ncclResult_t code, const std::string& call, const std::string& why) {
  State& s = state();
  s.last_error = call + ": " + why;
  report("emulated NCCL: " + s.last_error + " -> " + result_name(code));
  if (s.group_depth > 0 && s.group_error == ncclSuccess) s.group_error = code;
  return code;
}

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

// Polls `requests` until all are complete. Returns an MPI error code. A long wait is reported on
// stderr (it is a deadlock if it never ends).
int wait_all(std::vector<MPI_Request>& requests, std::vector<MPI_Status>* statuses,
             const std::string& what) {
  if (requests.empty()) return MPI_SUCCESS;
  if (statuses != nullptr) statuses->assign(requests.size(), MPI_Status{});
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  Clock::time_point next_report = start + std::chrono::seconds(60);
  for (long polls = 0;; ++polls) {
    int done = 0;
    const int code = MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done,
                                 statuses != nullptr ? statuses->data() : MPI_STATUSES_IGNORE);
    if (code != MPI_SUCCESS) return code;
    if (done) return MPI_SUCCESS;
    if (polls < 200) continue;
    const Clock::time_point now = Clock::now();
    std::this_thread::sleep_for(std::chrono::microseconds(now - start < std::chrono::seconds(1) ? 20 : 500));
    if (now >= next_report) {
      const auto waited = std::chrono::duration_cast<std::chrono::seconds>(now - start).count();
      report("emulated NCCL: " + what + " has waited " + std::to_string(waited) +
             " s for other ranks (fine if they are busy; a deadlock if it never ends: in the "
             "emulation every NCCL call runs when it is called, ncclRecv blocks the host until "
             "its data arrives, and a send must be matched before the next call on its "
             "communicator or stream and before a host synchronisation)");
      next_report = now + std::chrono::seconds(120);
    }
  }
}

int wait_one(MPI_Request& request, MPI_Status* status, const std::string& what) {
  std::vector<MPI_Request> requests{request};
  std::vector<MPI_Status> statuses;
  const int code = wait_all(requests, &statuses, what);
  request = requests[0];
  if (status != nullptr && !statuses.empty()) *status = statuses[0];
  return code;
}

// ---- element types and reductions ---------------------------------------------------------------

size_t type_size(ncclDataType_t t) {
  switch (t) {
    case ncclInt8: case ncclUint8: case ncclFloat8e4m3: case ncclFloat8e5m2: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
  }
}

// For moving bytes: an MPI type of the element's size.
MPI_Datatype move_type(ncclDataType_t t) {
  switch (type_size(t)) {
    case 1: return MPI_BYTE;
    case 2: return MPI_UINT16_T;
    case 4: return MPI_UINT32_T;
    default: return MPI_UINT64_T;
  }
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays a quiet NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mantissa <<= 1;
    } while ((mantissa & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t float_to_f16(float f) {  // round to nearest even, overflow to infinity
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (magnitude < 0x38800000u) {  // below 2^-14: subnormal (or zero)
    if (magnitude < 0x33000000u) return sign;  // below half the smallest subnormal
    const uint32_t exponent = magnitude >> 23;
    const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // 14..24
    uint32_t value = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (value & 1u))) ++value;
    return static_cast<uint16_t>(sign | value);
  }
  uint32_t value = magnitude - 0x38000000u;  // rebias 127 -> 15
  value += 0xfffu + ((value >> 13) & 1u);
  return static_cast<uint16_t>(sign | (value >> 13));
}

enum class Combine { kSum, kProd, kMax, kMin };

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float), Combine C>
void half_op(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    const float x = ToFloat(a[i]), y = ToFloat(b[i]);
    float r;
    switch (C) {
      case Combine::kSum: r = x + y; break;
      case Combine::kProd: r = x * y; break;
      case Combine::kMax: r = std::fmax(x, y); break;
      default: r = std::fmin(x, y); break;
    }
    b[i] = FromFloat(r);
  }
}

template <typename T, Combine C>
void float_minmax_op(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = C == Combine::kMax ? std::fmax(a[i], b[i]) : std::fmin(a[i], b[i]);
}

struct UserOps {
  MPI_Op bf16[4];
  MPI_Op f16[4];
  MPI_Op f32_max, f32_min, f64_max, f64_min;
};

const UserOps& user_ops() {
  static const UserOps ops = [] {
    UserOps o{};
    MPI_Op_create(&half_op<bf16_to_float, float_to_bf16, Combine::kSum>, 1, &o.bf16[0]);
    MPI_Op_create(&half_op<bf16_to_float, float_to_bf16, Combine::kProd>, 1, &o.bf16[1]);
    MPI_Op_create(&half_op<bf16_to_float, float_to_bf16, Combine::kMax>, 1, &o.bf16[2]);
    MPI_Op_create(&half_op<bf16_to_float, float_to_bf16, Combine::kMin>, 1, &o.bf16[3]);
    MPI_Op_create(&half_op<f16_to_float, float_to_f16, Combine::kSum>, 1, &o.f16[0]);
    MPI_Op_create(&half_op<f16_to_float, float_to_f16, Combine::kProd>, 1, &o.f16[1]);
    MPI_Op_create(&half_op<f16_to_float, float_to_f16, Combine::kMax>, 1, &o.f16[2]);
    MPI_Op_create(&half_op<f16_to_float, float_to_f16, Combine::kMin>, 1, &o.f16[3]);
    MPI_Op_create(&float_minmax_op<float, Combine::kMax>, 1, &o.f32_max);
    MPI_Op_create(&float_minmax_op<float, Combine::kMin>, 1, &o.f32_min);
    MPI_Op_create(&float_minmax_op<double, Combine::kMax>, 1, &o.f64_max);
    MPI_Op_create(&float_minmax_op<double, Combine::kMin>, 1, &o.f64_min);
    return o;
  }();
  return ops;
}

bool is_floating(ncclDataType_t t) {
  return t == ncclFloat16 || t == ncclBfloat16 || t == ncclFloat32 || t == ncclFloat64;
}

// The MPI datatype and op of a reduction (ncclAvg: the sum; the scaling is separate).
void reduction_of(ncclDataType_t t, ncclRedOp_t op, MPI_Datatype* type, MPI_Op* mpi_op) {
  const int k = op == ncclAvg ? 0 : static_cast<int>(op);  // sum, prod, max, min
  const MPI_Op builtin[4] = {MPI_SUM, MPI_PROD, MPI_MAX, MPI_MIN};
  const UserOps& u = user_ops();
  switch (t) {
    case ncclInt8: *type = MPI_INT8_T; *mpi_op = builtin[k]; return;
    case ncclUint8: *type = MPI_UINT8_T; *mpi_op = builtin[k]; return;
    case ncclInt32: *type = MPI_INT32_T; *mpi_op = builtin[k]; return;
    case ncclUint32: *type = MPI_UINT32_T; *mpi_op = builtin[k]; return;
    case ncclInt64: *type = MPI_INT64_T; *mpi_op = builtin[k]; return;
    case ncclUint64: *type = MPI_UINT64_T; *mpi_op = builtin[k]; return;
    case ncclFloat32:
      *type = MPI_FLOAT;
      *mpi_op = k == 2 ? u.f32_max : k == 3 ? u.f32_min : builtin[k];
      return;
    case ncclFloat64:
      *type = MPI_DOUBLE;
      *mpi_op = k == 2 ? u.f64_max : k == 3 ? u.f64_min : builtin[k];
      return;
    case ncclBfloat16: *type = MPI_UINT16_T; *mpi_op = u.bf16[k]; return;
    case ncclFloat16: *type = MPI_UINT16_T; *mpi_op = u.f16[k]; return;
    default: *type = MPI_DATATYPE_NULL; *mpi_op = MPI_OP_NULL; return;
  }
}

// ncclAvg of floating types: every input times 1/nranks in its own type, before the sum.
void pre_multiply(char* data, size_t count, ncclDataType_t t, int nranks) {
  const double scale = 1.0 / nranks;
  switch (t) {
    case ncclFloat32: {
      float* p = reinterpret_cast<float*>(data);
      for (size_t i = 0; i < count; ++i) p[i] *= static_cast<float>(scale);
      return;
    }
    case ncclFloat64: {
      double* p = reinterpret_cast<double*>(data);
      for (size_t i = 0; i < count; ++i) p[i] *= scale;
      return;
    }
    case ncclBfloat16: case ncclFloat16: {
      const bool bf = t == ncclBfloat16;
      uint16_t* p = reinterpret_cast<uint16_t*>(data);
      const float s = bf ? bf16_to_float(float_to_bf16(static_cast<float>(scale)))
                         : f16_to_float(float_to_f16(static_cast<float>(scale)));
      for (size_t i = 0; i < count; ++i) {
        p[i] = bf ? float_to_bf16(bf16_to_float(p[i]) * s) : float_to_f16(f16_to_float(p[i]) * s);
      }
      return;
    }
    default: return;
  }
}

template <typename T> void divide(char* data, size_t count, int nranks) {
  T* p = reinterpret_cast<T*>(data);
  for (size_t i = 0; i < count; ++i) p[i] = static_cast<T>(p[i] / static_cast<T>(nranks));
}
// ncclAvg of integer types: the sum divided by nranks (truncating), after the sum.
void post_divide(char* data, size_t count, ncclDataType_t t, int nranks) {
  switch (t) {
    case ncclInt8: divide<int8_t>(data, count, nranks); return;
    case ncclUint8: divide<uint8_t>(data, count, nranks); return;
    case ncclInt32: divide<int32_t>(data, count, nranks); return;
    case ncclUint32: divide<uint32_t>(data, count, nranks); return;
    case ncclInt64: divide<int64_t>(data, count, nranks); return;
    case ncclUint64: divide<uint64_t>(data, count, nranks); return;
    default: return;
  }
}

// Elements per MPI call (MPI counts are int).
size_t chunk_elements() {
  static const size_t chunk = [] {
    size_t c = static_cast<size_t>(INT_MAX);
    if (const char* v = std::getenv("FREQKV_EMU_NCCL_CHUNK")) {
      const long long n = std::atoll(v);
      if (n > 0 && static_cast<size_t>(n) < c) c = static_cast<size_t>(n);
    }
    return c;
  }();
  return chunk;
}

// ---- argument checks ----------------------------------------------------------------------------

ncclResult_t check_comm(const std::string& call, const ncclComm* comm) {
  if (comm == nullptr) return fail(ncclInvalidArgument, call, "comm is NULL");
  if (state().live.count(comm) == 0) {
    return fail(ncclInvalidArgument, call,
                "comm " + pointer_text(comm) +
                    " is not a live communicator (already destroyed or aborted, or never "
                    "initialised)");
  }
  return ncclSuccess;
}

ncclResult_t check_type(const std::string& call, ncclDataType_t t) {
  if (static_cast<int>(t) < 0 || static_cast<int>(t) >= ncclNumTypes) {
    return fail(ncclInvalidArgument, call, "invalid datatype " + std::to_string(static_cast<int>(t)));
  }
  return ncclSuccess;
}

ncclResult_t check_op(const std::string& call, ncclDataType_t t, ncclRedOp_t op) {
  if (static_cast<int>(op) < 0 || static_cast<int>(op) >= ncclNumOps) {
    return fail(ncclInvalidArgument, call,
                "invalid reduction operation " + std::to_string(static_cast<int>(op)) +
                    " (user-defined operators are not emulated)");
  }
  if (t == ncclFloat8e4m3 || t == ncclFloat8e5m2) {
    return fail(ncclInvalidUsage, call,
                "the emulation cannot follow: reductions of " + type_name(t) +
                    " are not emulated (moving fp8 data is)");
  }
  return ncclSuccess;
}

ncclResult_t check_rank(const std::string& call, const char* role, int r, const ncclComm* comm) {
  if (r < 0 || r >= comm->nranks) {
    return fail(ncclInvalidArgument, call,
                std::string("invalid ") + role + " " + std::to_string(r) + " (" + role +
                    " should be in the 0.." + std::to_string(comm->nranks - 1) + " range)");
  }
  return ncclSuccess;
}

// `bytes` (> 0) at `p` must be memory NCCL's kernels on the communicator's device can reach.
ncclResult_t check_buffer(const std::string& call, const char* role, const void* p, size_t bytes,
                          const ncclComm* comm) {
  if (p == nullptr) return fail(ncclInvalidArgument, call, std::string(role) + " is NULL");
  const char* first = static_cast<const char*>(p);
  const char* ends[2] = {first, first + bytes - 1};
  for (int e = 0; e < 2; ++e) {
    cudaPointerAttributes attributes{};
    const cudaError_t status = cudaPointerGetAttributes(&attributes, ends[e]);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return fail(ncclInvalidArgument, call,
                  std::string(role) + " " + pointer_text(p) + ": cudaPointerGetAttributes: " +
                      cudaGetErrorString(status));
    }
    const std::string where =
        e == 0 ? "" : " at its last byte (offset " + std::to_string(bytes - 1) + ")";
    switch (attributes.type) {
      case cudaMemoryTypeUnregistered:
        return fail(ncclInvalidArgument, call,
                    std::string(role) + " " + pointer_text(p) + " (" + std::to_string(bytes) +
                        " bytes) is not device memory" + where +
                        ": it is host memory that CUDA does not know (neither cudaMalloc'd nor "
                        "cudaMallocHost'd), which NCCL's kernels cannot reach" +
                        (e == 1 ? " (the buffer is shorter than count elements)" : ""));
      case cudaMemoryTypeDevice:
        if (attributes.device != comm->device) {
          return fail(ncclInvalidArgument, call,
                      std::string(role) + " " + pointer_text(p) + " is on device " +
                          std::to_string(attributes.device) + where +
                          ", the communicator on device " + std::to_string(comm->device));
        }
        break;
      case cudaMemoryTypeHost:     // pinned host memory: mapped, reachable from the device
      case cudaMemoryTypeManaged:
        break;
    }
  }
  return ncclSuccess;
}

bool overlap(const void* a, size_t abytes, const void* b, size_t bbytes) {
  const char* x = static_cast<const char*>(a);
  const char* y = static_cast<const char*>(b);
  return x < y + bbytes && y < x + abytes;
}

// Overlapping send and receive ranges are fine only in NCCL's in-place form.
ncclResult_t check_overlap(const std::string& call, const void* send, size_t send_bytes,
                           const void* recv, size_t recv_bytes, bool in_place,
                           const std::string& in_place_rule) {
  if (in_place || !overlap(send, send_bytes, recv, recv_bytes)) return ncclSuccess;
  return fail(ncclInvalidArgument, call,
              "sendbuff [" + pointer_text(send) + ", +" + std::to_string(send_bytes) +
                  " bytes) and recvbuff [" + pointer_text(recv) + ", +" +
                  std::to_string(recv_bytes) +
                  " bytes) overlap without being NCCL's in-place form (" + in_place_rule +
                  "); the result would be undefined");
}

// ---- pending sends ------------------------------------------------------------------------------

// Completes the pending sends that `which` selects, oldest first.
ncclResult_t complete_sends(const std::function<bool(const PendingSend&)>& which,
                            const std::string& reason) {
  State& s = state();
  ncclResult_t result = ncclSuccess;
  for (auto it = s.pending.begin(); it != s.pending.end();) {
    if (!which(*it)) {
      ++it;
      continue;
    }
    const int code = wait_one(it->request, nullptr, it->call + ", awaited by " + reason + ",");
    if (code != MPI_SUCCESS) {
      it->comm->async_error = ncclSystemError;
      result = fail(ncclSystemError, it->call, "the send failed in MPI: " + mpi_error_text(code));
    }
    it = s.pending.erase(it);
  }
  return result;
}

// Frees the sends that have completed without waiting.
void test_sends() {
  State& s = state();
  for (auto it = s.pending.begin(); it != s.pending.end();) {
    int done = 0;
    if (MPI_Test(&it->request, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && done) {
      it = s.pending.erase(it);
    } else {
      ++it;
    }
  }
}

// What comes before an operation on `comm` (and, for operations on a stream, `*stream`) in
// NCCL's order: the sends enqueued earlier on the same communicator or the same stream.
ncclResult_t complete_earlier_sends(const ncclComm* comm, const cudaStream_t* stream,
                                    const std::string& call) {
  if (state().pending.empty()) return ncclSuccess;
  test_sends();
  return complete_sends(
      [&](const PendingSend& p) {
        return p.comm == comm || (stream != nullptr && p.stream == *stream);
      },
      call + " (which follows it on its communicator or stream)");
}

// Every host synchronisation waits for every pending send.
void synchronize_hook() {
  State& s = state();
  if (s.pending.empty() || !mpi_usable()) return;
  (void)complete_sends([](const PendingSend&) { return true; },
                       "a host synchronisation (cudaStreamSynchronize/cudaEventSynchronize/"
                       "cudaDeviceSynchronize)");
}

// ---- messages of point to point -----------------------------------------------------------------

struct MessageHeader {
  uint32_t magic;
  int32_t datatype;
  uint64_t count;
};
constexpr uint32_t kMessageMagic = 0x4e43434cu;  // "NCCL"
constexpr int kP2pTag = 7;

std::string p2p_call(const char* name, const void* buff, size_t count, ncclDataType_t t, int peer,
                     const ncclComm* comm, cudaStream_t stream) {
  return std::string(name) + "(" + pointer_text(buff) + ", count=" + std::to_string(count) + ", " +
         type_name(t) + ", peer=" + std::to_string(peer) + ", " + comm_text(comm) +
         ", stream=" + pointer_text(stream) + ")";
}

// Copies the data (the stream reaches the send now) and starts the synchronous-mode send.
ncclResult_t start_send(const GroupOp& op, PendingSend* out) {
  const size_t bytes = op.count * type_size(op.datatype);
  out->comm = op.comm;
  out->stream = op.stream;
  out->call = op.call;
  out->message.resize(sizeof(MessageHeader) + bytes);
  const MessageHeader header{kMessageMagic, static_cast<int32_t>(op.datatype), op.count};
  std::memcpy(out->message.data(), &header, sizeof header);
  if (bytes > 0) std::memcpy(out->message.data() + sizeof header, op.sendbuff, bytes);
  if (out->message.size() > static_cast<size_t>(INT_MAX)) {
    return fail(ncclInvalidUsage, op.call,
                "the emulation cannot follow: messages above 2 GiB are not emulated");
  }
  const int code = MPI_Issend(out->message.data(), static_cast<int>(out->message.size()), MPI_BYTE,
                              op.peer, kP2pTag, op.comm->mpi, &out->request);
  if (code != MPI_SUCCESS) {
    return fail(ncclSystemError, op.call, "MPI_Issend failed: " + mpi_error_text(code));
  }
  return ncclSuccess;
}

struct PostedRecv {
  const GroupOp* op;
  std::vector<char> message;
  MPI_Request request;
};

ncclResult_t start_recv(const GroupOp& op, PostedRecv* out) {
  out->op = &op;
  out->message.resize(sizeof(MessageHeader) + op.count * type_size(op.datatype));
  if (out->message.size() > static_cast<size_t>(INT_MAX)) {
    return fail(ncclInvalidUsage, op.call,
                "the emulation cannot follow: messages above 2 GiB are not emulated");
  }
  const int code = MPI_Irecv(out->message.data(), static_cast<int>(out->message.size()), MPI_BYTE,
                             op.peer, kP2pTag, op.comm->mpi, &out->request);
  if (code != MPI_SUCCESS) {
    return fail(ncclSystemError, op.call, "MPI_Irecv failed: " + mpi_error_text(code));
  }
  return ncclSuccess;
}

// Checks what arrived against the receive's own arguments and copies the data out.
ncclResult_t finish_recv(PostedRecv& r, const MPI_Status& status) {
  const GroupOp& op = *r.op;
  int received = 0;
  MPI_Get_count(&status, MPI_BYTE, &received);
  MessageHeader header{};
  if (static_cast<size_t>(received) >= sizeof header) {
    std::memcpy(&header, r.message.data(), sizeof header);
  }
  if (static_cast<size_t>(received) < sizeof header || header.magic != kMessageMagic) {
    return fail(ncclInternalError, op.call, "received a message that no emulated ncclSend sent");
  }
  if (header.datatype != static_cast<int32_t>(op.datatype) || header.count != op.count) {
    return fail(ncclInvalidUsage, op.call,
                "the matching ncclSend of peer " + std::to_string(op.peer) + " sent " +
                    std::to_string(header.count) + " x " +
                    type_name(static_cast<ncclDataType_t>(header.datatype)) + ", this receive expects " +
                    std::to_string(op.count) + " x " + type_name(op.datatype) +
                    " (NCCL requires the same count and datatype on both sides)");
  }
  const size_t bytes = op.count * type_size(op.datatype);
  if (bytes > 0) std::memcpy(op.recvbuff, r.message.data() + sizeof header, bytes);
  return ncclSuccess;
}

// Runs point-to-point operations together: receives posted first, then sends, then `between`
// (a group's collectives), then the receives waited for. The sends stay pending.
ncclResult_t run_p2p(const std::vector<const GroupOp*>& ops,
                     const std::function<ncclResult_t()>& between) {
  std::vector<PostedRecv> recvs;
  std::vector<PendingSend> sends;
  recvs.reserve(ops.size());
  ncclResult_t result = ncclSuccess;
  for (const GroupOp* op : ops) {
    if (op->kind != GroupOp::kRecv) continue;
    recvs.emplace_back();
    result = start_recv(*op, &recvs.back());
    if (result != ncclSuccess) {
      recvs.pop_back();
      break;
    }
  }
  for (const GroupOp* op : ops) {
    if (result != ncclSuccess || op->kind != GroupOp::kSend) continue;
    sends.emplace_back();
    result = start_send(*op, &sends.back());
    if (result != ncclSuccess) sends.pop_back();
  }
  if (result == ncclSuccess && between) result = between();
  std::vector<MPI_Request> requests;
  for (PostedRecv& r : recvs) requests.push_back(r.request);
  std::vector<MPI_Status> statuses;
  std::string what = recvs.size() == 1 ? recvs[0].op->call
                                       : std::to_string(recvs.size()) + " receives of a group";
  if (result != ncclSuccess) {
    for (MPI_Request& q : requests) {  // unmatched receives: cancelled, their buffers still ours
      MPI_Cancel(&q);
      MPI_Wait(&q, MPI_STATUS_IGNORE);
    }
    for (PendingSend& p : sends) state().pending.push_back(std::move(p));
    return result;
  }
  const int code = wait_all(requests, &statuses, what);
  if (code != MPI_SUCCESS && code != MPI_ERR_IN_STATUS) {
    result = fail(ncclSystemError, what, "waiting for the receive failed: " + mpi_error_text(code));
  } else {
    for (size_t i = 0; i < recvs.size(); ++i) {
      if (code == MPI_ERR_IN_STATUS && statuses[i].MPI_ERROR != MPI_SUCCESS) {
        const ncclResult_t r = fail(
            ncclInvalidUsage, recvs[i].op->call,
            "the receive failed in MPI (" + mpi_error_text(statuses[i].MPI_ERROR) +
                "): the matching ncclSend sent more data than this receive expects");
        if (result == ncclSuccess) result = r;
        continue;
      }
      const ncclResult_t r = finish_recv(recvs[i], statuses[i]);
      if (result == ncclSuccess) result = r;
    }
  }
  for (PendingSend& p : sends) state().pending.push_back(std::move(p));
  return result;
}

// ---- collectives --------------------------------------------------------------------------------

// Calls `body(offset, elements)` for consecutive chunks of `count` elements.
int for_chunks(size_t count, const std::function<int(size_t, int)>& body) {
  const size_t chunk = chunk_elements();
  for (size_t offset = 0; offset < count; offset += chunk) {
    const int code = body(offset, static_cast<int>(std::min(chunk, count - offset)));
    if (code != MPI_SUCCESS) return code;
  }
  return MPI_SUCCESS;
}

ncclResult_t mpi_result(int code, const std::string& call, const char* mpi_call) {
  if (code == MPI_SUCCESS) return ncclSuccess;
  return fail(ncclSystemError, call, std::string(mpi_call) + " failed: " + mpi_error_text(code));
}

// Runs now, or queues it when inside a group (arguments already checked).
ncclResult_t run_or_queue(ncclComm* comm, cudaStream_t stream, const std::string& call,
                          std::function<ncclResult_t()> body) {
  State& s = state();
  if (s.group_depth > 0) {
    GroupOp op;
    op.kind = GroupOp::kCollective;
    op.comm = comm;
    op.stream = stream;
    op.run = std::move(body);
    op.call = call;
    s.group_ops.push_back(std::move(op));
    return ncclSuccess;
  }
  const ncclResult_t earlier = complete_earlier_sends(comm, &stream, call);
  if (earlier != ncclSuccess) return earlier;
  // The operation runs now, so the work enqueued before it on its stream (and what that work
  // waits for, cudaStreamWaitEvent) must have run: a collective that does not wait for the
  // kernels producing its input reads stale data, as it would on a GPU.
  emu::drain(stream);
  return body();
}

std::string collective_call(const char* name, const void* send, const void* recv, size_t count,
                            ncclDataType_t t, const std::string& extra, const ncclComm* comm,
                            cudaStream_t stream) {
  return std::string(name) + "(sendbuff=" + pointer_text(send) + ", recvbuff=" + pointer_text(recv) +
         ", count=" + std::to_string(count) + ", " + type_name(t) + extra + ", " + comm_text(comm) +
         ", stream=" + pointer_text(stream) + ")";
}

void copy_in(std::vector<char>& stage, const void* src, size_t bytes) {
  stage.resize(bytes);
  if (bytes > 0) std::memcpy(stage.data(), src, bytes);
}
void copy_out(void* dst, const std::vector<char>& stage, size_t bytes) {
  if (bytes > 0) std::memcpy(dst, stage.data(), bytes);
}

// Starts a nonblocking MPI collective and waits for it.
int run_collective(const std::function<int(MPI_Request*)>& start, const std::string& call) {
  MPI_Request request = MPI_REQUEST_NULL;
  const int code = start(&request);
  if (code != MPI_SUCCESS) return code;
  return wait_one(request, nullptr, call);
}

}  // namespace

// ---- errors and versions --------------------------------------------------------------------------

extern "C" {

const char* ncclGetErrorString(ncclResult_t code) {
  switch (code) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t) { return state().last_error.c_str(); }

ncclResult_t ncclGetVersion(int* version) {
  if (version == nullptr) return fail(ncclInvalidArgument, "ncclGetVersion(NULL)", "version is NULL");
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

}  // extern "C"

// ---- making communicators -------------------------------------------------------------------------

namespace {

constexpr char kIdMagic[16] = "freqkv-emu-nccl";
struct IdContents {
  char magic[16];
  int32_t creator_world_rank;
  int32_t reserved;
  uint64_t serial;
};
static_assert(sizeof(IdContents) <= NCCL_UNIQUE_ID_BYTES, "fits an ncclUniqueId");

// The bootstrap's messages between the members and the id's creator, on MPI_COMM_WORLD.
struct JoinMessage {
  uint64_t serial;
  int32_t rank;
  int32_t nranks;
  int32_t world_rank;
  int32_t device;
  char host_id[256];
};
constexpr int kReplyTextBytes = 1024;
int bootstrap_tag(uint64_t serial) { return 20000 + static_cast<int>(serial % 10000); }

std::string host_id() {
  if (const char* id = std::getenv("NCCL_HOSTID")) return std::string("NCCL_HOSTID=") + id;
  char name[256] = {};
  gethostname(name, sizeof name - 1);
  return std::string("host ") + name;
}

bool distinct_gpus() {
  const char* v = std::getenv("FREQKV_EMU_NCCL_DISTINCT_GPUS");
  return v != nullptr && std::strcmp(v, "0") != 0 && *v != '\0';
}

ncclComm* adopt(MPI_Comm mpi, int device) {
  State& s = state();
  if (!s.hook_registered) {
    emu::add_synchronize_hook(&synchronize_hook);
    s.hook_registered = true;
  }
  MPI_Comm_set_errhandler(mpi, MPI_ERRORS_RETURN);
  auto* comm = new ncclComm;
  comm->mpi = mpi;
  MPI_Comm_rank(mpi, &comm->rank);
  MPI_Comm_size(mpi, &comm->nranks);
  comm->device = device;
  s.live.insert(comm);
  return comm;
}

ncclResult_t check_config(const std::string& call, const ncclConfig_t* config) {
  if (config == nullptr) return ncclSuccess;
  if (config->magic != 0xcafebeef || config->size < offsetof(ncclConfig_t, blocking) + sizeof(int)) {
    return fail(ncclInvalidArgument, call,
                "config was not initialised with NCCL_CONFIG_INITIALIZER (magic " +
                    std::to_string(config->magic) + ")");
  }
  return ncclSuccess;
}

// The creator's side of the bootstrap: collects the other members' join messages, checks them,
// answers. Returns the verdict; `world_ranks` gets the members in NCCL rank order.
ncclResult_t collect_members(const std::string& call, const JoinMessage& mine, uint64_t serial,
                             std::vector<int>* world_ranks, std::string* verdict_text) {
  const int tag = bootstrap_tag(serial);
  std::vector<JoinMessage> members{mine};
  for (int i = 1; i < mine.nranks; ++i) {
    JoinMessage m{};
    MPI_Request request = MPI_REQUEST_NULL;
    MPI_Irecv(&m, sizeof m, MPI_BYTE, MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, &request);
    const int code = wait_one(request, nullptr,
                              call + " on the id's creator, waiting for rank " +
                                  std::to_string(members.size()) + " of " +
                                  std::to_string(mine.nranks) + " to join");
    if (code != MPI_SUCCESS) return mpi_result(code, call, "MPI_Irecv (bootstrap)");
    members.push_back(m);
  }
  ncclResult_t verdict = ncclSuccess;
  std::string why;
  world_ranks->assign(static_cast<size_t>(mine.nranks), -1);
  for (const JoinMessage& m : members) {
    if (verdict != ncclSuccess) break;
    if (m.serial != serial) {
      verdict = ncclInternalError;
      why = "world rank " + std::to_string(m.world_rank) + " joined with another id";
    } else if (m.nranks != mine.nranks) {
      verdict = ncclInvalidUsage;
      why = "world rank " + std::to_string(m.world_rank) + " passed nranks " +
            std::to_string(m.nranks) + ", the id's creator (world rank " +
            std::to_string(mine.world_rank) + ") " + std::to_string(mine.nranks);
    } else if ((*world_ranks)[static_cast<size_t>(m.rank)] != -1) {
      verdict = ncclInvalidUsage;
      why = "rank " + std::to_string(m.rank) + " was claimed by world ranks " +
            std::to_string((*world_ranks)[static_cast<size_t>(m.rank)]) + " and " +
            std::to_string(m.world_rank);
    } else {
      (*world_ranks)[static_cast<size_t>(m.rank)] = m.world_rank;
    }
  }
  if (verdict == ncclSuccess && !distinct_gpus()) {
    for (size_t a = 0; a < members.size() && verdict == ncclSuccess; ++a) {
      for (size_t b = a + 1; b < members.size(); ++b) {
        if (members[a].device == members[b].device &&
            std::strncmp(members[a].host_id, members[b].host_id, sizeof members[a].host_id) == 0) {
          verdict = ncclInvalidUsage;
          why = "Duplicate GPU detected : rank " + std::to_string(members[a].rank) + " and rank " +
                std::to_string(members[b].rank) + " both on CUDA device " +
                std::to_string(members[a].device) + " of " + members[a].host_id +
                " (every emulated process has one device; give each rank its own NCCL_HOSTID, "
                "as on a machine with one GPU, or set FREQKV_EMU_NCCL_DISTINCT_GPUS=1)";
          break;
        }
      }
    }
  }
  // The reply: verdict, world ranks in NCCL rank order, text.
  std::vector<char> reply(sizeof(int32_t) * (1 + static_cast<size_t>(mine.nranks)) + kReplyTextBytes, 0);
  const int32_t v = static_cast<int32_t>(verdict);
  std::memcpy(reply.data(), &v, sizeof v);
  for (int r = 0; r < mine.nranks; ++r) {
    const int32_t w = (*world_ranks)[static_cast<size_t>(r)];
    std::memcpy(reply.data() + sizeof(int32_t) * (1 + static_cast<size_t>(r)), &w, sizeof w);
  }
  std::strncpy(reply.data() + sizeof(int32_t) * (1 + static_cast<size_t>(mine.nranks)), why.c_str(),
               kReplyTextBytes - 1);
  std::vector<MPI_Request> requests;
  for (const JoinMessage& m : members) {
    if (m.world_rank == mine.world_rank) continue;
    requests.emplace_back();
    MPI_Isend(reply.data(), static_cast<int>(reply.size()), MPI_BYTE, m.world_rank, tag,
              MPI_COMM_WORLD, &requests.back());
  }
  const int code = wait_all(requests, nullptr, call + " on the id's creator, answering the members");
  if (code != MPI_SUCCESS) return mpi_result(code, call, "MPI_Isend (bootstrap)");
  *verdict_text = why;
  return verdict;
}

// A member's side: sends its join message to the creator and waits for the answer.
ncclResult_t join_creator(const std::string& call, const JoinMessage& mine, int creator,
                          uint64_t serial, std::vector<int>* world_ranks, std::string* verdict_text) {
  const int tag = bootstrap_tag(serial);
  std::vector<char> reply(sizeof(int32_t) * (1 + static_cast<size_t>(mine.nranks)) + kReplyTextBytes, 0);
  std::vector<MPI_Request> requests(2, MPI_REQUEST_NULL);
  MPI_Irecv(reply.data(), static_cast<int>(reply.size()), MPI_BYTE, creator, tag, MPI_COMM_WORLD,
            &requests[0]);
  MPI_Isend(&mine, sizeof mine, MPI_BYTE, creator, tag, MPI_COMM_WORLD, &requests[1]);
  const int code = wait_all(requests, nullptr,
                            call + ", waiting for the id's creator (world rank " +
                                std::to_string(creator) +
                                ", which must join this communicator itself: the emulation "
                                "has no bootstrap thread)");
  if (code != MPI_SUCCESS) return mpi_result(code, call, "bootstrap exchange");
  int32_t v = 0;
  std::memcpy(&v, reply.data(), sizeof v);
  world_ranks->assign(static_cast<size_t>(mine.nranks), -1);
  for (int r = 0; r < mine.nranks; ++r) {
    int32_t w = 0;
    std::memcpy(&w, reply.data() + sizeof(int32_t) * (1 + static_cast<size_t>(r)), sizeof w);
    (*world_ranks)[static_cast<size_t>(r)] = w;
  }
  const char* text = reply.data() + sizeof(int32_t) * (1 + static_cast<size_t>(mine.nranks));
  *verdict_text = std::string(text, strnlen(text, kReplyTextBytes));
  return static_cast<ncclResult_t>(v);
}

ncclResult_t init_rank(ncclComm_t* newcomm, int nranks, const ncclUniqueId& id, int rank,
                       ncclConfig_t* config, const char* name) {
  const std::string call = std::string(name) + "(nranks=" + std::to_string(nranks) +
                           ", rank=" + std::to_string(rank) + ")";
  if (newcomm == nullptr) return fail(ncclInvalidArgument, call, "comm (the result pointer) is NULL");
  *newcomm = nullptr;
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    return fail(ncclInvalidArgument, call,
                "Invalid rank requested : " + std::to_string(rank) + "/" + std::to_string(nranks));
  }
  if (const ncclResult_t r = check_config(call, config); r != ncclSuccess) return r;
  if (state().group_depth > 0) {
    return fail(ncclInvalidUsage, call,
                "the emulation cannot follow: communicator creation inside ncclGroupStart/"
                "ncclGroupEnd is not emulated");
  }
  if (!mpi_usable()) {
    return fail(ncclInvalidUsage, call,
                "the emulation cannot follow: the emulated NCCL bootstraps over MPI, which is not "
                "initialised (or already finalised)");
  }
  IdContents contents{};
  std::memcpy(&contents, id.internal, sizeof contents);
  int world_size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  if (std::memcmp(contents.magic, kIdMagic, sizeof kIdMagic) != 0 ||
      contents.creator_world_rank < 0 || contents.creator_world_rank >= world_size) {
    return fail(ncclInvalidArgument, call,
                "the ncclUniqueId did not come from ncclGetUniqueId (or was not passed on whole)");
  }
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return fail(ncclUnhandledCudaError, call, "cudaGetDevice failed");
  }
  const int me = world_rank();
  JoinMessage mine{};
  mine.serial = contents.serial;
  mine.rank = rank;
  mine.nranks = nranks;
  mine.world_rank = me;
  mine.device = device;
  std::strncpy(mine.host_id, host_id().c_str(), sizeof mine.host_id - 1);

  std::vector<int> world_ranks;
  std::string why;
  ncclResult_t verdict;
  if (me == contents.creator_world_rank) {
    if (!state().used_serials.insert(contents.serial).second) {
      return fail(ncclInvalidUsage, call,
                  "this ncclUniqueId was already used to make a communicator (an id makes one)");
    }
    verdict = collect_members(call, mine, contents.serial, &world_ranks, &why);
  } else {
    verdict = join_creator(call, mine, contents.creator_world_rank, contents.serial, &world_ranks,
                           &why);
  }
  if (verdict != ncclSuccess) return fail(verdict, call, why.empty() ? "bootstrap failed" : why);

  MPI_Group world_group = MPI_GROUP_NULL, group = MPI_GROUP_NULL;
  MPI_Comm_group(MPI_COMM_WORLD, &world_group);
  MPI_Group_incl(world_group, nranks, world_ranks.data(), &group);
  MPI_Comm mpi = MPI_COMM_NULL;
  const int code = MPI_Comm_create_group(MPI_COMM_WORLD, group, bootstrap_tag(contents.serial), &mpi);
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  if (code != MPI_SUCCESS || mpi == MPI_COMM_NULL) {
    return fail(ncclSystemError, call, "MPI_Comm_create_group failed: " + mpi_error_text(code));
  }
  ncclComm* comm = adopt(mpi, device);
  if (comm->rank != rank || comm->nranks != nranks) {
    const std::string why2 = "internal: MPI made this rank " + std::to_string(comm->rank) + " of " +
                             std::to_string(comm->nranks);
    state().live.erase(comm);
    MPI_Comm_free(&comm->mpi);
    delete comm;
    return fail(ncclInternalError, call, why2);
  }
  *newcomm = comm;
  return ncclSuccess;
}

// Destroy (wait for pending sends) or abort (abandon them).
ncclResult_t release(ncclComm_t comm, bool abort, const char* name) {
  if (comm == nullptr) return ncclSuccess;  // NCCL: destroying NULL is a no-op
  const std::string call = std::string(name) + "(" + comm_text(comm) + ")";
  State& s = state();
  if (s.live.count(comm) == 0) {
    return fail(ncclInvalidArgument, call,
                "comm " + pointer_text(comm) + " has already been destroyed (or was never made)");
  }
  ncclResult_t result = ncclSuccess;
  const bool mpi = mpi_usable();
  if (!abort && mpi) {
    result = complete_sends([comm](const PendingSend& p) { return p.comm == comm; },
                            std::string(name) + " of its communicator");
  }
  for (auto it = s.pending.begin(); it != s.pending.end();) {
    if (it->comm != comm) {
      ++it;
      continue;
    }
    if (mpi) MPI_Request_free(&it->request);  // completes in the background; keep the data
    s.abandoned.push_back(std::move(it->message));
    it = s.pending.erase(it);
  }
  if (mpi) {
    MPI_Comm_free(&comm->mpi);
  } else if (!abort) {
    report("emulated NCCL: " + call +
           " after MPI_Finalize: its MPI communicator was already freed by MPI");
  }
  s.live.erase(comm);
  delete comm;
  return result;
}

}  // namespace

extern "C" {

ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId) {
  const std::string call = "ncclGetUniqueId";
  if (uniqueId == nullptr) return fail(ncclInvalidArgument, call, "uniqueId is NULL");
  if (!mpi_usable()) {
    return fail(ncclInvalidUsage, call,
                "the emulation cannot follow: the emulated NCCL bootstraps over MPI, which is not "
                "initialised (or already finalised)");
  }
  IdContents contents{};
  std::memcpy(contents.magic, kIdMagic, sizeof kIdMagic);
  contents.creator_world_rank = world_rank();
  contents.serial = state().next_serial++;
  std::memset(uniqueId->internal, 0, sizeof uniqueId->internal);
  std::memcpy(uniqueId->internal, &contents, sizeof contents);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank) {
  return init_rank(comm, nranks, commId, rank, nullptr, "ncclCommInitRank");
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank,
                                    ncclConfig_t* config) {
  return init_rank(comm, nranks, commId, rank, config, "ncclCommInitRankConfig");
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* newcomm,
                           ncclConfig_t* config) {
  const std::string call = "ncclCommSplit(" + comm_text(comm) + ", color=" + std::to_string(color) +
                           ", key=" + std::to_string(key) + ")";
  if (const ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (newcomm == nullptr) return fail(ncclInvalidArgument, call, "newcomm is NULL");
  *newcomm = nullptr;
  if (color < 0 && color != NCCL_SPLIT_NOCOLOR) {
    return fail(ncclInvalidArgument, call,
                "color " + std::to_string(color) +
                    " is neither >= 0 nor NCCL_SPLIT_NOCOLOR (the emulation's MPI_Comm_split "
                    "takes no other)");
  }
  if (const ncclResult_t r = check_config(call, config); r != ncclSuccess) return r;
  if (state().group_depth > 0) {
    return fail(ncclInvalidUsage, call,
                "the emulation cannot follow: communicator creation inside ncclGroupStart/"
                "ncclGroupEnd is not emulated");
  }
  if (const ncclResult_t r = complete_earlier_sends(comm, nullptr, call); r != ncclSuccess) {
    return r;
  }
  MPI_Comm part = MPI_COMM_NULL;
  const int code =
      MPI_Comm_split(comm->mpi, color == NCCL_SPLIT_NOCOLOR ? MPI_UNDEFINED : color, key, &part);
  if (code != MPI_SUCCESS) return mpi_result(code, call, "MPI_Comm_split");
  if (part != MPI_COMM_NULL) *newcomm = adopt(part, comm->device);
  return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  const std::string call = "ncclCommFinalize(" + comm_text(comm) + ")";
  if (const ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (comm->finalized) return fail(ncclInvalidArgument, call, "already finalized");
  comm->finalized = true;
  return complete_sends([comm](const PendingSend& p) { return p.comm == comm; }, call);
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) { return release(comm, false, "ncclCommDestroy"); }
ncclResult_t ncclCommAbort(ncclComm_t comm) { return release(comm, true, "ncclCommAbort"); }

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError) {
  const std::string call = "ncclCommGetAsyncError(" + comm_text(comm) + ")";
  if (const ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (asyncError == nullptr) return fail(ncclInvalidArgument, call, "asyncError is NULL");
  if (!state().pending.empty() && mpi_usable()) test_sends();
  *asyncError = comm->async_error;
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  const std::string call = "ncclCommCount(" + comm_text(comm) + ")";
  if (const ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (count == nullptr) return fail(ncclInvalidArgument, call, "count is NULL");
  *count = comm->nranks;
  return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
  const std::string call = "ncclCommCuDevice(" + comm_text(comm) + ")";
  if (const ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (device == nullptr) return fail(ncclInvalidArgument, call, "device is NULL");
  *device = comm->device;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  const std::string call = "ncclCommUserRank(" + comm_text(comm) + ")";
  if (const ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (rank == nullptr) return fail(ncclInvalidArgument, call, "rank is NULL");
  *rank = comm->rank;
  return ncclSuccess;
}

// ---- collectives ----------------------------------------------------------------------------------

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream) {
  const std::string call = collective_call("ncclAllReduce", sendbuff, recvbuff, count, datatype,
                                           ", " + op_name(op), comm, stream);
  if (ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_type(call, datatype); r != ncclSuccess) return r;
  if (ncclResult_t r = check_op(call, datatype, op); r != ncclSuccess) return r;
  if (count == 0) return ncclSuccess;
  const size_t bytes = count * type_size(datatype);
  if (ncclResult_t r = check_buffer(call, "sendbuff", sendbuff, bytes, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_buffer(call, "recvbuff", recvbuff, bytes, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_overlap(call, sendbuff, bytes, recvbuff, bytes, sendbuff == recvbuff,
                                     "sendbuff == recvbuff");
      r != ncclSuccess) {
    return r;
  }
  return run_or_queue(comm, stream, call, [=]() -> ncclResult_t {
    std::vector<char> stage;
    copy_in(stage, sendbuff, bytes);
    const size_t size = type_size(datatype);
    if (op == ncclAvg && is_floating(datatype)) pre_multiply(stage.data(), count, datatype, comm->nranks);
    MPI_Datatype type;
    MPI_Op mpi_op;
    reduction_of(datatype, op, &type, &mpi_op);
    const int code = for_chunks(count, [&](size_t offset, int n) {
      return run_collective(
          [&](MPI_Request* q) {
            return MPI_Iallreduce(MPI_IN_PLACE, stage.data() + offset * size, n, type, mpi_op,
                                  comm->mpi, q);
          },
          call);
    });
    if (code != MPI_SUCCESS) return mpi_result(code, call, "MPI_Iallreduce");
    if (op == ncclAvg && !is_floating(datatype)) post_divide(stage.data(), count, datatype, comm->nranks);
    copy_out(recvbuff, stage, bytes);
    return ncclSuccess;
  });
}

ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) {
  const std::string call = collective_call("ncclReduce", sendbuff, recvbuff, count, datatype,
                                           ", " + op_name(op) + ", root=" + std::to_string(root),
                                           comm, stream);
  if (ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_type(call, datatype); r != ncclSuccess) return r;
  if (ncclResult_t r = check_op(call, datatype, op); r != ncclSuccess) return r;
  if (ncclResult_t r = check_rank(call, "root", root, comm); r != ncclSuccess) return r;
  if (count == 0) return ncclSuccess;
  const size_t bytes = count * type_size(datatype);
  const bool is_root = comm->rank == root;
  if (ncclResult_t r = check_buffer(call, "sendbuff", sendbuff, bytes, comm); r != ncclSuccess) return r;
  if (is_root) {  // recvbuff "may be NULL on all calls except for root"
    if (ncclResult_t r = check_buffer(call, "recvbuff (root)", recvbuff, bytes, comm); r != ncclSuccess) {
      return r;
    }
    if (ncclResult_t r = check_overlap(call, sendbuff, bytes, recvbuff, bytes,
                                       sendbuff == recvbuff, "sendbuff == recvbuff");
        r != ncclSuccess) {
      return r;
    }
  }
  return run_or_queue(comm, stream, call, [=]() -> ncclResult_t {
    std::vector<char> stage;
    copy_in(stage, sendbuff, bytes);
    const size_t size = type_size(datatype);
    if (op == ncclAvg && is_floating(datatype)) pre_multiply(stage.data(), count, datatype, comm->nranks);
    MPI_Datatype type;
    MPI_Op mpi_op;
    reduction_of(datatype, op, &type, &mpi_op);
    const int code = for_chunks(count, [&](size_t offset, int n) {
      char* chunk = stage.data() + offset * size;
      return run_collective(
          [&](MPI_Request* q) {
            return is_root ? MPI_Ireduce(MPI_IN_PLACE, chunk, n, type, mpi_op, root, comm->mpi, q)
                           : MPI_Ireduce(chunk, nullptr, n, type, mpi_op, root, comm->mpi, q);
          },
          call);
    });
    if (code != MPI_SUCCESS) return mpi_result(code, call, "MPI_Ireduce");
    if (is_root) {
      if (op == ncclAvg && !is_floating(datatype)) post_divide(stage.data(), count, datatype, comm->nranks);
      copy_out(recvbuff, stage, bytes);
    }
    return ncclSuccess;
  });
}

ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm,
                           cudaStream_t stream) {
  const std::string call = collective_call("ncclBroadcast", sendbuff, recvbuff, count, datatype,
                                           ", root=" + std::to_string(root), comm, stream);
  if (ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_type(call, datatype); r != ncclSuccess) return r;
  if (ncclResult_t r = check_rank(call, "root", root, comm); r != ncclSuccess) return r;
  if (count == 0) return ncclSuccess;
  const size_t bytes = count * type_size(datatype);
  const bool is_root = comm->rank == root;
  if (is_root) {  // sendbuff is used on the root only
    if (ncclResult_t r = check_buffer(call, "sendbuff (root)", sendbuff, bytes, comm); r != ncclSuccess) {
      return r;
    }
    if (ncclResult_t r = check_overlap(call, sendbuff, bytes, recvbuff, bytes,
                                       sendbuff == recvbuff, "sendbuff == recvbuff");
        r != ncclSuccess) {
      return r;
    }
  }
  if (ncclResult_t r = check_buffer(call, "recvbuff", recvbuff, bytes, comm); r != ncclSuccess) return r;
  return run_or_queue(comm, stream, call, [=]() -> ncclResult_t {
    std::vector<char> stage;
    if (is_root) {
      copy_in(stage, sendbuff, bytes);
    } else {
      stage.resize(bytes);
    }
    const size_t size = type_size(datatype);
    const int code = for_chunks(count, [&](size_t offset, int n) {
      return run_collective(
          [&](MPI_Request* q) {
            return MPI_Ibcast(stage.data() + offset * size, n, move_type(datatype), root, comm->mpi, q);
          },
          call);
    });
    if (code != MPI_SUCCESS) return mpi_result(code, call, "MPI_Ibcast");
    copy_out(recvbuff, stage, bytes);
    return ncclSuccess;
  });
}

ncclResult_t ncclBcast(void* buff, size_t count, ncclDataType_t datatype, int root, ncclComm_t comm,
                       cudaStream_t stream) {
  return ncclBroadcast(buff, buff, count, datatype, root, comm, stream);
}

ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream) {
  const std::string call =
      collective_call("ncclAllGather", sendbuff, recvbuff, sendcount, datatype, "", comm, stream);
  if (ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_type(call, datatype); r != ncclSuccess) return r;
  if (sendcount == 0) return ncclSuccess;
  const size_t size = type_size(datatype);
  const size_t bytes = sendcount * size;
  const size_t nranks = static_cast<size_t>(comm->nranks);
  const size_t rank = static_cast<size_t>(comm->rank);
  if (ncclResult_t r = check_buffer(call, "sendbuff", sendbuff, bytes, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_buffer(call, "recvbuff", recvbuff, bytes * nranks, comm); r != ncclSuccess) {
    return r;
  }
  const bool in_place = static_cast<const char*>(sendbuff) == static_cast<const char*>(recvbuff) + rank * bytes;
  if (ncclResult_t r = check_overlap(call, sendbuff, bytes, recvbuff, bytes * nranks, in_place,
                                     "sendbuff == recvbuff + rank * sendcount");
      r != ncclSuccess) {
    return r;
  }
  return run_or_queue(comm, stream, call, [=]() -> ncclResult_t {
    std::vector<char> send;
    copy_in(send, sendbuff, bytes);
    std::vector<char> gathered(bytes * nranks);
    const MPI_Datatype type = move_type(datatype);
    const int code = for_chunks(sendcount, [&](size_t offset, int n) {
      if (static_cast<size_t>(n) == sendcount) {
        return run_collective(
            [&](MPI_Request* q) {
              return MPI_Iallgather(send.data(), n, type, gathered.data(), n, type, comm->mpi, q);
            },
            call);
      }
      std::vector<char> part(static_cast<size_t>(n) * size * nranks);
      const int c = run_collective(
          [&](MPI_Request* q) {
            return MPI_Iallgather(send.data() + offset * size, n, type, part.data(), n, type,
                                  comm->mpi, q);
          },
          call);
      for (size_t r = 0; r < nranks && c == MPI_SUCCESS; ++r) {
        std::memcpy(gathered.data() + (r * sendcount + offset) * size,
                    part.data() + r * static_cast<size_t>(n) * size, static_cast<size_t>(n) * size);
      }
      return c;
    });
    if (code != MPI_SUCCESS) return mpi_result(code, call, "MPI_Iallgather");
    copy_out(recvbuff, gathered, bytes * nranks);
    return ncclSuccess;
  });
}

ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                               ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream) {
  const std::string call = collective_call("ncclReduceScatter", sendbuff, recvbuff, recvcount,
                                           datatype, ", " + op_name(op), comm, stream);
  if (ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_type(call, datatype); r != ncclSuccess) return r;
  if (ncclResult_t r = check_op(call, datatype, op); r != ncclSuccess) return r;
  if (recvcount == 0) return ncclSuccess;
  const size_t size = type_size(datatype);
  const size_t bytes = recvcount * size;
  const size_t nranks = static_cast<size_t>(comm->nranks);
  const size_t rank = static_cast<size_t>(comm->rank);
  if (ncclResult_t r = check_buffer(call, "sendbuff", sendbuff, bytes * nranks, comm); r != ncclSuccess) {
    return r;
  }
  if (ncclResult_t r = check_buffer(call, "recvbuff", recvbuff, bytes, comm); r != ncclSuccess) return r;
  const bool in_place = static_cast<const char*>(recvbuff) == static_cast<const char*>(sendbuff) + rank * bytes;
  if (ncclResult_t r = check_overlap(call, sendbuff, bytes * nranks, recvbuff, bytes, in_place,
                                     "recvbuff == sendbuff + rank * recvcount");
      r != ncclSuccess) {
    return r;
  }
  return run_or_queue(comm, stream, call, [=]() -> ncclResult_t {
    std::vector<char> send;
    copy_in(send, sendbuff, bytes * nranks);
    if (op == ncclAvg && is_floating(datatype)) {
      pre_multiply(send.data(), recvcount * nranks, datatype, comm->nranks);
    }
    std::vector<char> result(bytes);
    MPI_Datatype type;
    MPI_Op mpi_op;
    reduction_of(datatype, op, &type, &mpi_op);
    const int code = for_chunks(recvcount, [&](size_t offset, int n) {
      if (static_cast<size_t>(n) == recvcount) {
        return run_collective(
            [&](MPI_Request* q) {
              return MPI_Ireduce_scatter_block(send.data(), result.data(), n, type, mpi_op,
                                               comm->mpi, q);
            },
            call);
      }
      const size_t part_bytes = static_cast<size_t>(n) * size;
      std::vector<char> part(part_bytes * nranks);
      for (size_t r = 0; r < nranks; ++r) {
        std::memcpy(part.data() + r * part_bytes, send.data() + (r * recvcount + offset) * size,
                    part_bytes);
      }
      return run_collective(
          [&](MPI_Request* q) {
            return MPI_Ireduce_scatter_block(part.data(), result.data() + offset * size, n, type,
                                             mpi_op, comm->mpi, q);
          },
          call);
    });
    if (code != MPI_SUCCESS) return mpi_result(code, call, "MPI_Ireduce_scatter_block");
    if (op == ncclAvg && !is_floating(datatype)) post_divide(result.data(), recvcount, datatype, comm->nranks);
    copy_out(recvbuff, result, bytes);
    return ncclSuccess;
  });
}

// ---- point to point -------------------------------------------------------------------------------

namespace {
ncclResult_t point_to_point(GroupOp::Kind kind, const void* sendbuff, void* recvbuff, size_t count,
                            ncclDataType_t datatype, int peer, ncclComm_t comm,
                            cudaStream_t stream) {
  const bool is_send = kind == GroupOp::kSend;
  const std::string call = p2p_call(is_send ? "ncclSend" : "ncclRecv",
                                    is_send ? sendbuff : recvbuff, count, datatype, peer, comm, stream);
  if (ncclResult_t r = check_comm(call, comm); r != ncclSuccess) return r;
  if (ncclResult_t r = check_type(call, datatype); r != ncclSuccess) return r;
  if (ncclResult_t r = check_rank(call, "peer", peer, comm); r != ncclSuccess) return r;
  if (count > 0) {
    const size_t bytes = count * type_size(datatype);
    if (ncclResult_t r = check_buffer(call, is_send ? "sendbuff" : "recvbuff",
                                      is_send ? sendbuff : recvbuff, bytes, comm);
        r != ncclSuccess) {
      return r;
    }
  }
  GroupOp op;
  op.kind = kind;
  op.comm = comm;
  op.stream = stream;
  op.sendbuff = sendbuff;
  op.recvbuff = recvbuff;
  op.count = count;
  op.datatype = datatype;
  op.peer = peer;
  op.call = call;
  State& s = state();
  if (s.group_depth > 0) {
    s.group_ops.push_back(std::move(op));
    return ncclSuccess;
  }
  if (ncclResult_t r = complete_earlier_sends(comm, &stream, call); r != ncclSuccess) return r;
  emu::drain(stream);  // runs now: after the work enqueued before it on its stream (run_or_queue)
  return run_p2p({&op}, nullptr);
}
}  // namespace

ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  return point_to_point(GroupOp::kSend, sendbuff, nullptr, count, datatype, peer, comm, stream);
}

ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  return point_to_point(GroupOp::kRecv, nullptr, recvbuff, count, datatype, peer, comm, stream);
}

// ---- groups ---------------------------------------------------------------------------------------

ncclResult_t ncclGroupStart() {
  ++state().group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  State& s = state();
  if (s.group_depth == 0) {
    return fail(ncclInvalidUsage, "ncclGroupEnd()", "not inside ncclGroupStart/ncclGroupEnd");
  }
  if (--s.group_depth > 0) return ncclSuccess;
  std::vector<GroupOp> ops = std::move(s.group_ops);
  s.group_ops.clear();
  const ncclResult_t error = s.group_error;
  s.group_error = ncclSuccess;
  if (error != ncclSuccess) {
    s.last_error = "ncclGroupEnd(): a call of the group failed, nothing of the group ran; that "
                   "call: " + s.last_error;
    return error;
  }
  if (ops.empty()) return ncclSuccess;
  // What came before the group on its communicators and streams.
  for (const GroupOp& op : ops) {
    if (ncclResult_t r = complete_earlier_sends(op.comm, &op.stream, "ncclGroupEnd()");
        r != ncclSuccess) {
      return r;
    }
    emu::drain(op.stream);
  }
  std::vector<const GroupOp*> p2p;
  for (const GroupOp& op : ops) {
    if (op.kind != GroupOp::kCollective) p2p.push_back(&op);
  }
  return run_p2p(p2p, [&ops]() -> ncclResult_t {
    for (const GroupOp& op : ops) {
      if (op.kind != GroupOp::kCollective) continue;
      if (ncclResult_t r = op.run(); r != ncclSuccess) return r;
    }
    return ncclSuccess;
  });
}

// LeakSanitizer (the emulated targets run under AddressSanitizer): what MPI's own libraries keep
// until the process ends is not a leak of ours. Open MPI allocates much of it inside components
// (mca_*.so) that it unloads at MPI_Finalize, so the leak reports' frame-pointer stacks end in an
// "<unknown module>" that no suppression can name; unwinding at malloc time with the slow (DWARF)
// unwinder instead reaches libmpi/libopen-pal in every such stack (no measurable cost here). An
// ASAN_OPTIONS of the environment still overrides this default.
const char* __asan_default_options() { return "fast_unwind_on_malloc=0"; }
// The table of suppressions used, printed at every exit, would bury a test's own output.
const char* __lsan_default_options() { return "print_suppressions=0"; }

const char* __lsan_default_suppressions() {
  return "leak:libmpi.so\n"
         "leak:libopen-pal.so\n"
         "leak:libopen-rte.so\n"
         "leak:libpmix.so\n"
         "leak:libhwloc.so\n"
         "leak:libevent\n"
         "leak:mca_\n";
}

}  // extern "C"
