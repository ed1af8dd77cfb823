// Element sizes and names of the communicator types, and LocalCommunicator: the group of one rank.
#include "comm/communicator.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace freqkv {

std::string comm_count_text(int64_t n, CommDType dtype) {
  return std::to_string(n) + " x " + comm_dtype_name(dtype);
}

std::string format_rank_list(const std::vector<int>& ranks) {
  std::string text;
  const size_t shown = ranks.size() <= 8 ? ranks.size() : 3;
  for (size_t i = 0; i < shown; ++i) text += (i ? "," : "") + std::to_string(ranks[i]);
  if (shown < ranks.size()) {
    text += ",...," + std::to_string(ranks.back()) + " (" + std::to_string(ranks.size()) +
            " ranks)";
  }
  return text;
}

size_t comm_dtype_size(CommDType dtype) {
  switch (dtype) {
    case CommDType::kF32: return sizeof(float);
    case CommDType::kF64: return sizeof(double);
    case CommDType::kBF16: return sizeof(bf16);
    case CommDType::kI32: return sizeof(int32_t);
    case CommDType::kI64: return sizeof(int64_t);
  }
  throw std::invalid_argument("comm_dtype_size: unknown CommDType value " +
                              std::to_string(static_cast<int>(dtype)));
}

const char* comm_dtype_name(CommDType dtype) {
  switch (dtype) {
    case CommDType::kF32: return "f32";
    case CommDType::kF64: return "f64";
    case CommDType::kBF16: return "bf16";
    case CommDType::kI32: return "i32";
    case CommDType::kI64: return "i64";
  }
  return "unknown CommDType";
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kMax: return "max";
  }
  return "unknown ReduceOp";
}

namespace {

constexpr const char* kLocalGroup = "local communicator (a group of one rank)";

size_t local_bytes(const char* operation, int64_t n, CommDType dtype) {
  if (n < 0) {
    throw std::invalid_argument(std::string(kLocalGroup) + ": " + operation + " of " +
                                std::to_string(n) + " elements: the count must be >= 0");
  }
  return static_cast<size_t>(n) * comm_dtype_size(dtype);
}

void check_root(const char* operation, int root) {
  if (root != 0) {
    throw std::invalid_argument(std::string(kLocalGroup) + ": " + operation + " with root " +
                                std::to_string(root) + ", but the only rank is 0");
  }
}

[[noreturn]] void no_peer(const char* operation, int peer) {
  throw std::invalid_argument(std::string(kLocalGroup) + ": " + operation + " peer " +
                              std::to_string(peer) +
                              ": a group of one rank has no other rank to exchange with");
}

}  // namespace

void LocalCommunicator::all_gather(const void* send, void* recv, int64_t n_per_rank,
                                   CommDType dtype) {
  const size_t bytes = local_bytes("all_gather", n_per_rank, dtype);
  // send == recv is the in-place form (this rank's block already sits in recv).
  if (bytes == 0 || send == recv) return;
  if (copy_) {
    copy_(recv, send, bytes);
  } else {
    std::memcpy(recv, send, bytes);
  }
}

void LocalCommunicator::reduce_scatter(const void* send, void* recv, int64_t n_per_rank,
                                       CommDType dtype) {
  const size_t bytes = local_bytes("reduce_scatter", n_per_rank, dtype);
  if (bytes == 0 || send == recv) return;
  if (copy_) {
    copy_(recv, send, bytes);
  } else {
    std::memcpy(recv, send, bytes);
  }
}

void LocalCommunicator::broadcast(void*, int64_t n, CommDType dtype, int root) {
  local_bytes("broadcast", n, dtype);
  check_root("broadcast", root);
}

void LocalCommunicator::reduce_to(void*, int64_t n, CommDType dtype, int root) {
  local_bytes("reduce_to", n, dtype);
  check_root("reduce_to", root);
}

void LocalCommunicator::send(const void*, int64_t, CommDType, int peer) { no_peer("send to", peer); }

void LocalCommunicator::recv(void*, int64_t, CommDType, int peer) { no_peer("recv from", peer); }

std::unique_ptr<Communicator> LocalCommunicator::split(int color, int, const std::string& label) {
  if (color < 0) {
    throw std::invalid_argument(std::string(kLocalGroup) + ": split into group '" + label +
                                "' with color " + std::to_string(color) +
                                ": colors must be >= 0");
  }
  return std::make_unique<LocalCommunicator>(copy_);
}

}  // namespace freqkv
