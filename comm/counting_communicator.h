// A communicator that forwards to another and counts what this rank sends, per operation: the
// measurement behind bench/sp_comm_volume.cpp. Counted as the bytes a rank puts on the wire in
// a ring/tree-free model: send = n, broadcast = n at the root, reduce_to = n at non-roots,
// all_reduce = 2 (p-1)/p n (ring), all_gather / reduce_scatter = (p-1) n_per_rank.
#pragma once

#include <map>
#include <string>

#include "comm/communicator.h"

namespace freqkv {

class CountingCommunicator final : public Communicator {
 public:
  explicit CountingCommunicator(Communicator& inner) : inner_(inner) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string name() const override { return "counting(" + inner_.name() + ")"; }

  void all_reduce(void* data, int64_t n, CommDType dtype, ReduceOp op) override {
    add("all_reduce", 2.0 * (size() - 1) / size() * bytes(n, dtype));
    inner_.all_reduce(data, n, dtype, op);
  }
  void all_gather(const void* send, void* recv, int64_t n, CommDType dtype) override {
    add("all_gather", static_cast<double>(size() - 1) * bytes(n, dtype));
    inner_.all_gather(send, recv, n, dtype);
  }
  void reduce_scatter(const void* send, void* recv, int64_t n, CommDType dtype) override {
    add("reduce_scatter", static_cast<double>(size() - 1) * bytes(n, dtype));
    inner_.reduce_scatter(send, recv, n, dtype);
  }
  void broadcast(void* data, int64_t n, CommDType dtype, int root) override {
    if (rank() == root) add("broadcast", static_cast<double>(size() - 1) * bytes(n, dtype));
    inner_.broadcast(data, n, dtype, root);
  }
  void reduce_to(void* data, int64_t n, CommDType dtype, int root) override {
    if (rank() != root) add("reduce_to", bytes(n, dtype));
    inner_.reduce_to(data, n, dtype, root);
  }
  void send(const void* data, int64_t n, CommDType dtype, int peer) override {
    add("send", bytes(n, dtype));
    inner_.send(data, n, dtype, peer);
  }
  void recv(void* data, int64_t n, CommDType dtype, int peer) override {
    inner_.recv(data, n, dtype, peer);
  }
  void start_all_reduce_sum(void* data, int64_t n, CommDType dtype) override {
    add("all_reduce", 2.0 * (size() - 1) / size() * bytes(n, dtype));
    inner_.start_all_reduce_sum(data, n, dtype);
  }
  void progress() override { inner_.progress(); }
  void wait_reductions() override { inner_.wait_reductions(); }
  void barrier() override { inner_.barrier(); }
  double all_reduce_scalar(double value, ReduceOp op) override {
    return inner_.all_reduce_scalar(value, op);
  }
  std::unique_ptr<Communicator> split(int color, int key, const std::string& label) override {
    return inner_.split(color, key, label);
  }

  double total_bytes() const {
    double t = 0;
    for (const auto& [op, b] : sent_) t += b;
    return t;
  }
  const std::map<std::string, double>& by_operation() const { return sent_; }
  void reset() { sent_.clear(); }

 private:
  static double bytes(int64_t n, CommDType dtype) {
    return static_cast<double>(n) * static_cast<double>(comm_dtype_size(dtype));
  }
  void add(const std::string& op, double b) { sent_[op] += b; }

  Communicator& inner_;
  std::map<std::string, double> sent_;
};

}  // namespace freqkv
