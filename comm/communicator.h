// The communicator interface: one group of ranks exchanging data that lives in the memory of one
// backend (host memory for the MPI implementation, device memory for NCCL). Model and trainer
// code talk only to this interface, as they talk only to Kernels<T>.
//
// Every collective that the forward pass uses has its adjoint in the backward pass
// (Megatron-LM's mappings): all_reduce is self-adjoint (identity's adjoint is all_reduce),
// all_gather's adjoint is reduce_scatter, send's adjoint is recv from the other side,
// broadcast's adjoint is a sum-reduce to the root. The tests check each pair as
// <A x, y> = <x, A^T y>.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dtype.h"

namespace freqkv {

enum class CommDType { kF32, kF64, kBF16, kI32, kI64 };
enum class ReduceOp { kSum, kMax };

template <typename U> struct CommDTypeOf;
template <> struct CommDTypeOf<float> { static constexpr CommDType value = CommDType::kF32; };
template <> struct CommDTypeOf<double> { static constexpr CommDType value = CommDType::kF64; };
template <> struct CommDTypeOf<bf16> { static constexpr CommDType value = CommDType::kBF16; };
template <> struct CommDTypeOf<int32_t> { static constexpr CommDType value = CommDType::kI32; };
template <> struct CommDTypeOf<int64_t> { static constexpr CommDType value = CommDType::kI64; };

size_t comm_dtype_size(CommDType dtype);
const char* comm_dtype_name(CommDType dtype);  // "f32", "f64", "bf16", "i32", "i64" (for messages)
const char* reduce_op_name(ReduceOp op);       // "sum", "max"
// For messages: "1024 x bf16", and ranks as "0,1,2,3" (up to 8) or "0,8,16,...,504 (64 ranks)".
std::string comm_count_text(int64_t n, CommDType dtype);
std::string format_rank_list(const std::vector<int>& ranks);

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "mpi", "nccl", "local"

  // In place over the group. Sums of bf16 are accumulated in fp32.
  virtual void all_reduce(void* data, int64_t n, CommDType dtype, ReduceOp op) = 0;
  // recv[r * n_per_rank + i] = send_of_rank_r[i]
  virtual void all_gather(const void* send, void* recv, int64_t n_per_rank, CommDType dtype) = 0;
  // recv[i] = sum over ranks r of send_of_rank_r[rank() * n_per_rank + i]
  virtual void reduce_scatter(const void* send, void* recv, int64_t n_per_rank,
                              CommDType dtype) = 0;
  virtual void broadcast(void* data, int64_t n, CommDType dtype, int root) = 0;
  // Sum over the group into root's data (other ranks' data is left as it is).
  virtual void reduce_to(void* data, int64_t n, CommDType dtype, int root) = 0;
  // Point to point (blocking) with a rank of this group.
  virtual void send(const void* data, int64_t n, CommDType dtype, int peer) = 0;
  virtual void recv(void* data, int64_t n, CommDType dtype, int peer) = 0;
  virtual void barrier() = 0;
  // A host scalar (losses, norms, counters) reduced over the group.
  virtual double all_reduce_scalar(double value, ReduceOp op) = 0;
  // Sub-groups of this group, as MPI_Comm_split: the ranks passing the same color (>= 0) form one
  // group, ordered by key (ties by rank in this group). Collective over this group, which stays
  // usable. `label` names the new group in error messages ("tp", "sp", "dp").
  virtual std::unique_ptr<Communicator> split(int color, int key, const std::string& label) = 0;

  // ---- sums overlapped with computation (the gradient reduction during backward) ------------
  // start_all_reduce_sum begins an in-place sum of data[0, n) over the group and may return
  // before it is done: the buffer must be neither read nor written until wait_reductions()
  // returns. Every rank starts the same reductions in the same order. progress() lets a host
  // implementation advance what is in flight (MPI moves nonblocking collectives only inside MPI
  // calls): call it between pieces of computation. The defaults are blocking -- the sum is done
  // when start returns -- which is correct for any implementation, only not overlapped.
  virtual void start_all_reduce_sum(void* data, int64_t n, CommDType dtype) {
    all_reduce(data, n, dtype, ReduceOp::kSum);
  }
  virtual void progress() {}
  virtual void wait_reductions() {}

  // Typed conveniences.
  template <typename U> void all_reduce_sum(U* data, int64_t n) {
    all_reduce(data, n, CommDTypeOf<U>::value, ReduceOp::kSum);
  }
  template <typename U> void start_all_reduce_sum(U* data, int64_t n) {
    start_all_reduce_sum(static_cast<void*>(data), n, CommDTypeOf<U>::value);
  }
  template <typename U> void all_reduce_max(U* data, int64_t n) {
    all_reduce(data, n, CommDTypeOf<U>::value, ReduceOp::kMax);
  }
  template <typename U> void all_gather(const U* send, U* recv, int64_t n_per_rank) {
    all_gather(static_cast<const void*>(send), recv, n_per_rank, CommDTypeOf<U>::value);
  }
  template <typename U> void reduce_scatter_sum(const U* send, U* recv, int64_t n_per_rank) {
    reduce_scatter(static_cast<const void*>(send), recv, n_per_rank, CommDTypeOf<U>::value);
  }
  template <typename U> void broadcast(U* data, int64_t n, int root) {
    broadcast(static_cast<void*>(data), n, CommDTypeOf<U>::value, root);
  }
  template <typename U> void reduce_sum_to(U* data, int64_t n, int root) {
    reduce_to(static_cast<void*>(data), n, CommDTypeOf<U>::value, root);
  }
  template <typename U> void send(const U* data, int64_t n, int peer) {
    send(static_cast<const void*>(data), n, CommDTypeOf<U>::value, peer);
  }
  template <typename U> void recv(U* data, int64_t n, int peer) {
    recv(static_cast<void*>(data), n, CommDTypeOf<U>::value, peer);
  }
};

// A group of one rank: every collective is the identity (all_gather/reduce_scatter copy). The
// communicator of a parallel dimension of size 1, and of a run without MPI. `copy` moves bytes in
// the backend's memory (memcpy for host memory; a device copy for GPU buffers).
class LocalCommunicator final : public Communicator {
 public:
  using CopyFn = void (*)(void* dst, const void* src, size_t bytes);
  explicit LocalCommunicator(CopyFn copy = nullptr) : copy_(copy) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "local"; }
  void all_reduce(void*, int64_t, CommDType, ReduceOp) override {}
  void all_gather(const void* send, void* recv, int64_t n_per_rank, CommDType dtype) override;
  void reduce_scatter(const void* send, void* recv, int64_t n_per_rank, CommDType dtype) override;
  void broadcast(void*, int64_t, CommDType, int root) override;
  void reduce_to(void*, int64_t, CommDType, int root) override;
  void send(const void*, int64_t, CommDType, int peer) override;
  void recv(void*, int64_t, CommDType, int peer) override;
  void barrier() override {}
  double all_reduce_scalar(double value, ReduceOp) override { return value; }
  // Another group of one rank with the same copy function.
  std::unique_ptr<Communicator> split(int color, int key, const std::string& label) override;
  // Typed conveniences of the base class (hidden otherwise by the overrides above).
  using Communicator::all_gather;
  using Communicator::broadcast;
  using Communicator::recv;
  using Communicator::send;
  using Communicator::start_all_reduce_sum;

 private:
  CopyFn copy_;  // nullptr: memcpy
};

}  // namespace freqkv
