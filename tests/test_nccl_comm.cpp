// Multi-rank tests of NcclCommunicator and make_nccl_grid on GPUs, run under mpirun (ctest:
// nccl_np2; main() in mpi_gtest_main.cpp):
//   - every collective on device buffers with known per-rank data, for f32, f64, bf16, i32, i64;
//   - host buffers take the MPI path; all_reduce_scalar; barrier; split against MPI's order;
//   - automatic ordering against the CUDA backend's stream (data produced and consumed by
//     CudaKernels around a collective, with no synchronisation by the test);
//   - the model over an NCCL grid (tensor parallel, then sequence parallel) against the same
//     model on one rank, both in bf16 on the GPU.
// Without a CUDA device every test skips itself, on every rank alike. When the ranks outnumber
// the devices (one GPU on a test machine), each rank gets its own NCCL_HOSTID before NCCL starts:
// NCCL refuses two ranks of one host on one GPU otherwise (see nccl_communicator.h).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "comm/mpi_communicator.h"
#include "comm/nccl_communicator.h"
#include "kernels/cuda/cuda_backend.h"
#include "model/llama_model.h"

namespace freqkv {
namespace {

// ---- set-up ------------------------------------------------------------------------------------

int world_rank() { return MpiSession::world_rank(); }
int world_size() { return MpiSession::world_size(); }

// Called before the first NCCL call of the process (setenv without overwriting keeps the user's).
void allow_ranks_to_share_a_gpu() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) (void)cudaGetLastError();
  if (devices > 0 && world_size() > devices) {
    setenv("NCCL_HOSTID", ("freqkv-test-rank-" + std::to_string(world_rank())).c_str(), 0);
    setenv("NCCL_SOCKET_IFNAME", "lo", 0);
  }
}

// The world's NcclCommunicator, made once for the whole run (NCCL start-up takes a while) and
// freed before MPI is finalised; nullptr without a device.
class NcclWorld : public ::testing::Environment {
 public:
  void SetUp() override {
    if (!cuda_device_available()) return;
    allow_ranks_to_share_a_gpu();
    device_ = device_for_this_rank();
    comm_ = std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, device_, nullptr, "world");
  }
  void TearDown() override { comm_.reset(); }
  static NcclCommunicator* comm() { return comm_.get(); }
  static int device() { return device_; }

 private:
  static std::unique_ptr<NcclCommunicator> comm_;
  static int device_;
};
std::unique_ptr<NcclCommunicator> NcclWorld::comm_;
int NcclWorld::device_ = 0;
[[maybe_unused]] ::testing::Environment* const kNcclWorld =
    ::testing::AddGlobalTestEnvironment(new NcclWorld);

#define SKIP_WITHOUT_GPU() \
  if (NcclWorld::comm() == nullptr) GTEST_SKIP() << "no CUDA device"

// ---- data --------------------------------------------------------------------------------------

template <typename U> U from_double(double v) { return static_cast<U>(v); }
template <> bf16 from_double<bf16>(double v) { return bf16(static_cast<float>(v)); }
template <typename U> double to_double(U v) { return static_cast<double>(v); }
template <> double to_double<bf16>(bf16 v) { return static_cast<double>(static_cast<float>(v)); }

// Small integers in [-5, 5]: exact in every type, and sums over a few ranks exact in bf16.
double known(int source, int64_t i) { return static_cast<double>((source * 5 + i * 3) % 11) - 5.0; }

template <typename U> std::vector<U> known_vector(int source, int64_t n) {
  std::vector<U> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[static_cast<size_t>(i)] = from_double<U>(known(source, i));
  return values;
}

// A device copy of a host array; freed with the object. Transfers use the legacy default stream,
// which is the compute stream of the world communicator here, so they are ordered with its
// collectives.
template <typename U> class DeviceArray {
 public:
  explicit DeviceArray(const std::vector<U>& host) : n_(host.size()) {
    EXPECT_EQ(cudaMalloc(&data_, std::max<size_t>(1, n_) * sizeof(U)), cudaSuccess);
    if (n_ > 0) {
      EXPECT_EQ(cudaMemcpy(data_, host.data(), n_ * sizeof(U), cudaMemcpyHostToDevice),
                cudaSuccess);
    }
  }
  ~DeviceArray() { (void)cudaFree(data_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  U* data() const { return static_cast<U*>(data_); }
  std::vector<U> to_host() const {
    std::vector<U> host(n_);
    if (n_ > 0) {
      EXPECT_EQ(cudaMemcpy(host.data(), data_, n_ * sizeof(U), cudaMemcpyDeviceToHost),
                cudaSuccess);
    }
    return host;
  }

 private:
  size_t n_;
  void* data_ = nullptr;
};

template <typename U>
void expect_values(const std::vector<U>& got, const std::vector<double>& want,
                   const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size() && reported < 5; ++i) {
    if (to_double(got[i]) != want[i]) {
      ADD_FAILURE() << what << " on rank " << world_rank() << ": element " << i << " is "
                    << to_double(got[i]) << ", expected " << want[i];
      ++reported;
    }
  }
}

// ---- every collective, every type ----------------------------------------------------------------

template <typename U> class NcclCollectiveTest : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, bf16, int32_t, int64_t>;
struct ElementTypeNames {
  template <typename U> static std::string GetName(int) {
    return comm_dtype_name(CommDTypeOf<U>::value);
  }
};
TYPED_TEST_SUITE(NcclCollectiveTest, ElementTypes, ElementTypeNames);

constexpr int64_t kCount = 37;

TYPED_TEST(NcclCollectiveTest, AllReduceSumAndMax) {
  using U = TypeParam;
  SKIP_WITHOUT_GPU();
  NcclCommunicator& comm = *NcclWorld::comm();
  std::vector<double> sum(kCount, 0.0), max(kCount, -1e9);
  for (int r = 0; r < comm.size(); ++r) {
    for (int64_t i = 0; i < kCount; ++i) {
      sum[static_cast<size_t>(i)] += known(r, i);
      max[static_cast<size_t>(i)] = std::max(max[static_cast<size_t>(i)], known(r, i));
    }
  }
  DeviceArray<U> a(known_vector<U>(comm.rank(), kCount));
  comm.all_reduce_sum(a.data(), kCount);
  expect_values(a.to_host(), sum, "all_reduce sum");
  DeviceArray<U> b(known_vector<U>(comm.rank(), kCount));
  comm.all_reduce_max(b.data(), kCount);
  expect_values(b.to_host(), max, "all_reduce max");
}

TYPED_TEST(NcclCollectiveTest, AllGatherOutOfPlaceAndInPlace) {
  using U = TypeParam;
  SKIP_WITHOUT_GPU();
  NcclCommunicator& comm = *NcclWorld::comm();
  std::vector<double> want;
  for (int r = 0; r < comm.size(); ++r)
    for (int64_t i = 0; i < kCount; ++i) want.push_back(known(r, i));
  DeviceArray<U> send(known_vector<U>(comm.rank(), kCount));
  DeviceArray<U> recv(std::vector<U>(static_cast<size_t>(kCount * comm.size())));
  comm.all_gather(send.data(), recv.data(), kCount);
  expect_values(recv.to_host(), want, "all_gather");
  // In place: this rank's block already sits in the receive buffer.
  std::vector<U> blocks(static_cast<size_t>(kCount * comm.size()), from_double<U>(0));
  const std::vector<U> mine = known_vector<U>(comm.rank(), kCount);
  std::copy(mine.begin(), mine.end(), blocks.begin() + comm.rank() * kCount);
  DeviceArray<U> in_place(blocks);
  comm.all_gather(in_place.data() + comm.rank() * kCount, in_place.data(), kCount);
  expect_values(in_place.to_host(), want, "all_gather in place");
}

TYPED_TEST(NcclCollectiveTest, ReduceScatter) {
  using U = TypeParam;
  SKIP_WITHOUT_GPU();
  NcclCommunicator& comm = *NcclWorld::comm();
  const int64_t total = kCount * comm.size();
  std::vector<double> want(kCount, 0.0);
  for (int r = 0; r < comm.size(); ++r)
    for (int64_t i = 0; i < kCount; ++i) want[static_cast<size_t>(i)] += known(r, comm.rank() * kCount + i);
  DeviceArray<U> send(known_vector<U>(comm.rank(), total));
  DeviceArray<U> recv(std::vector<U>(static_cast<size_t>(kCount)));
  comm.reduce_scatter_sum(send.data(), recv.data(), kCount);
  expect_values(recv.to_host(), want, "reduce_scatter");
}

TYPED_TEST(NcclCollectiveTest, BroadcastAndReduceToEveryRoot) {
  using U = TypeParam;
  SKIP_WITHOUT_GPU();
  NcclCommunicator& comm = *NcclWorld::comm();
  for (int root = 0; root < comm.size(); ++root) {
    DeviceArray<U> data(known_vector<U>(comm.rank(), kCount));
    comm.broadcast(data.data(), kCount, root);
    std::vector<double> want;
    for (int64_t i = 0; i < kCount; ++i) want.push_back(known(root, i));
    expect_values(data.to_host(), want, "broadcast from " + std::to_string(root));

    DeviceArray<U> summed(known_vector<U>(comm.rank(), kCount));
    comm.reduce_sum_to(summed.data(), kCount, root);
    std::vector<double> expected;
    for (int64_t i = 0; i < kCount; ++i) {
      double s = 0;
      for (int r = 0; r < comm.size(); ++r) s += known(r, i);
      expected.push_back(comm.rank() == root ? s : known(comm.rank(), i));  // others unchanged
    }
    expect_values(summed.to_host(), expected, "reduce_to root " + std::to_string(root));
  }
}

TYPED_TEST(NcclCollectiveTest, SendRecvAroundTheRing) {
  using U = TypeParam;
  SKIP_WITHOUT_GPU();
  NcclCommunicator& comm = *NcclWorld::comm();
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int next = (comm.rank() + 1) % comm.size();
  const int previous = (comm.rank() + comm.size() - 1) % comm.size();
  DeviceArray<U> outgoing(known_vector<U>(comm.rank(), kCount));
  DeviceArray<U> incoming(std::vector<U>(static_cast<size_t>(kCount)));
  // Even ranks send first, odd ranks receive first: blocking point-to-point never waits in a
  // cycle (as the model's chain of memories never does).
  if (comm.rank() % 2 == 0) {
    comm.send(outgoing.data(), kCount, next);
    comm.recv(incoming.data(), kCount, previous);
  } else {
    comm.recv(incoming.data(), kCount, previous);
    comm.send(outgoing.data(), kCount, next);
  }
  std::vector<double> want;
  for (int64_t i = 0; i < kCount; ++i) want.push_back(known(previous, i));
  expect_values(incoming.to_host(), want, "recv from " + std::to_string(previous));
}

// ---- host buffers, scalars, splits, errors ----------------------------------------------------

TEST(NcclCommunicator, HostBuffersTakeTheMpiPath) {
  SKIP_WITHOUT_GPU();
  NcclCommunicator& comm = *NcclWorld::comm();
  std::vector<int64_t> values = known_vector<int64_t>(comm.rank(), kCount);
  comm.all_reduce_sum(values.data(), kCount);
  std::vector<double> want(kCount, 0.0);
  for (int r = 0; r < comm.size(); ++r)
    for (int64_t i = 0; i < kCount; ++i) want[static_cast<size_t>(i)] += known(r, i);
  expect_values(values, want, "host all_reduce");
  // Mixing a host and a device buffer in one call is an argument error, before any traffic.
  DeviceArray<float> device(std::vector<float>(static_cast<size_t>(kCount * comm.size())));
  std::vector<float> host(kCount);
  EXPECT_THROW(comm.all_gather(host.data(), device.data(), kCount), std::invalid_argument);
}

TEST(NcclCommunicator, ScalarBarrierAndArguments) {
  SKIP_WITHOUT_GPU();
  NcclCommunicator& comm = *NcclWorld::comm();
  const double sum = comm.all_reduce_scalar(comm.rank() + 0.5, ReduceOp::kSum);
  EXPECT_DOUBLE_EQ(sum, comm.size() * (comm.size() - 1) / 2.0 + 0.5 * comm.size());
  EXPECT_DOUBLE_EQ(comm.all_reduce_scalar(-comm.rank(), ReduceOp::kMax), 0.0);
  comm.barrier();
  EXPECT_EQ(comm.name(), "nccl");
  DeviceArray<float> data(std::vector<float>(4));
  EXPECT_THROW(comm.all_reduce_sum(data.data(), -1), std::invalid_argument);
  EXPECT_THROW(comm.broadcast(data.data(), 4, comm.size()), std::invalid_argument);
  EXPECT_THROW(comm.send(data.data(), 4, comm.rank()), std::invalid_argument);
  try {
    comm.recv(data.data(), 4, -1);
    ADD_FAILURE() << "recv from peer -1 did not throw";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("group 'world'"), std::string::npos) << e.what();
  }
}

TEST(NcclCommunicator, SplitOrdersByKeyLikeMpi) {
  SKIP_WITHOUT_GPU();
  NcclCommunicator& comm = *NcclWorld::comm();
  // Two groups by parity, ordered by descending world rank (key = size - rank).
  const std::unique_ptr<Communicator> part =
      comm.split(comm.rank() % 2, comm.size() - comm.rank(), "parity");
  const int members = (comm.size() + 1 - comm.rank() % 2) / 2;
  EXPECT_EQ(part->size(), members);
  EXPECT_EQ(part->name(), "nccl");
  // Ranks of my parity above me come first.
  int above = 0;
  for (int r = comm.rank() + 2; r < comm.size(); r += 2) ++above;
  EXPECT_EQ(part->rank(), above);
  DeviceArray<int32_t> value(std::vector<int32_t>{comm.rank()});
  part->all_reduce_sum(value.data(), 1);
  int32_t want = 0;
  for (int r = comm.rank() % 2; r < comm.size(); r += 2) want += r;
  EXPECT_EQ(value.to_host()[0], want);
  EXPECT_THROW(comm.split(-1, 0, "bad"), std::invalid_argument);
}

// ---- ordering against the CUDA backend's stream ------------------------------------------------

TEST(NcclCommunicator, CollectivesAreOrderedWithTheBackendStream) {
  SKIP_WITHOUT_GPU();
  const std::unique_ptr<Kernels<bf16>> kernels = make_cuda_kernels(NcclWorld::device());
  // A group of its own whose compute stream is the backend's.
  const std::unique_ptr<Communicator> group =
      NcclWorld::comm()->split(0, NcclWorld::comm()->rank(), "ordered");
  auto& comm = dynamic_cast<NcclCommunicator&>(*group);
  comm.set_compute_stream(cuda_kernels_stream(*kernels));
  const int64_t n = int64_t{1} << 20;  // large enough that a race would show
  Buffer<bf16> data(*kernels, n);
  std::vector<float> ones(static_cast<size_t>(n), 1.0f);
  for (int round = 0; round < 3; ++round) {
    kernels->upload(data.data(), ones.data(), n);
    kernels->scale(data.data(), 2.0, n);       // enqueued on the backend's stream, not waited for
    comm.all_reduce_sum(data.data(), n);        // must see the scaled values
    kernels->scale(data.data(), 0.5, n);        // must see the reduced values
    std::vector<float> got(static_cast<size_t>(n));
    kernels->download(got.data(), data.data(), n);
    int wrong = 0;
    for (float v : got) wrong += v != static_cast<float>(comm.size());
    EXPECT_EQ(wrong, 0) << "round " << round << ": elements not equal to the rank count";
  }
  // Manual ordering: the caller orders by events.
  comm.set_ordering(StreamOrdering::kManual);
  kernels->upload(data.data(), ones.data(), n);
  comm.wait_for(cuda_kernels_stream(*kernels));
  comm.all_reduce_sum(data.data(), n);
  comm.record_on(cuda_kernels_stream(*kernels));
  std::vector<float> got(static_cast<size_t>(n));
  kernels->download(got.data(), data.data(), n);
  EXPECT_EQ(got.front(), static_cast<float>(comm.size()));
  EXPECT_EQ(got.back(), static_cast<float>(comm.size()));
}

// ---- the model over an NCCL grid -----------------------------------------------------------------

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 64;  // heads, KV heads, FFN width and vocabulary divide by tp = 2
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  return c;
}

double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    norm += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-300);
}

// Loss and logical gradients of one batch: on one rank (parallel empty) or over the grid's tp/sp.
std::pair<double, std::vector<std::vector<float>>> loss_and_grads(Kernels<bf16>& kernels,
                                                                  const ModelParallel& parallel,
                                                                  const std::vector<int32_t>& all_inputs,
                                                                  const std::vector<int32_t>& all_targets,
                                                                  int64_t batch, int64_t seq_len) {
  FreqKVConfig f;
  f.cache = 32;
  f.sink = 2;
  f.ratio = 0.5;
  LlamaModel<bf16> model(small_config(), f, kernels, LoraConfig(), parallel);
  model.init_random(21, 0.05);
  const SequenceShard shard = model.sequence_shard(seq_len);
  std::vector<int32_t> inputs, targets;
  for (int64_t b = 0; b < batch; ++b) {
    const auto in = all_inputs.begin() + b * seq_len + shard.token_begin;
    const auto tg = all_targets.begin() + b * seq_len + shard.token_begin;
    inputs.insert(inputs.end(), in, in + shard.tokens);
    targets.insert(targets.end(), tg, tg + shard.tokens);
  }
  model.zero_grads();
  const double scale = 1.0 / static_cast<double>(batch * seq_len);
  double loss = model.forward(inputs.data(), targets.data(), batch, seq_len, scale).sum;
  model.backward();
  if (parallel.sp != nullptr) {
    parallel.sp->all_reduce_sum(model.grads(), model.arena_numel());
    loss = parallel.sp->all_reduce_scalar(loss, ReduceOp::kSum);
  }
  std::vector<std::vector<float>> grads;
  for (size_t i = 0; i < model.param_table().size(); ++i) grads.push_back(model.get_grad(i));
  return {loss, grads};
}

TEST(NcclGrid, TensorAndSequenceParallelModelMatchesOneRank) {
  SKIP_WITHOUT_GPU();
  if (world_size() != 2) GTEST_SKIP() << "written for 2 ranks";
  const std::unique_ptr<Kernels<bf16>> kernels = make_cuda_kernels(NcclWorld::device());
  const int64_t batch = 2, seq_len = 96;  // six chunks: sp = 2 gets three each
  std::mt19937_64 rng(9);
  std::vector<int32_t> inputs, targets;
  for (int64_t i = 0; i < batch * seq_len; ++i) {
    inputs.push_back(static_cast<int32_t>(rng() % 64));
    targets.push_back(static_cast<int32_t>(rng() % 64));
  }
  const auto [want_loss, want_grads] = loss_and_grads(*kernels, ModelParallel{}, inputs, targets,
                                                      batch, seq_len);
  for (const GridShape shape : {GridShape{2, 1, 1}, GridShape{1, 2, 1}}) {
    const std::unique_ptr<ParallelGrid> grid =
        make_nccl_grid(shape, NcclWorld::device(), cuda_kernels_stream(*kernels));
    EXPECT_EQ(grid->world().name(), "nccl");
    ModelParallel parallel;
    if (shape.tp > 1) parallel.tp = &grid->tp();
    if (shape.sp > 1) parallel.sp = &grid->sp();
    const std::string what = shape.tp > 1 ? "tp = 2" : "sp = 2";
    const auto [loss, grads] = loss_and_grads(*kernels, parallel, inputs, targets, batch, seq_len);
    EXPECT_NEAR(loss, want_loss, 2e-2 * std::abs(want_loss)) << what;
    const ParamTable table = llama_param_table(small_config());
    ASSERT_EQ(grads.size(), want_grads.size());
    for (size_t i = 0; i < grads.size(); ++i) {
      EXPECT_LE(relative_error(grads[i], want_grads[i]), 5e-2) << what << ": " << table[i].name;
    }
  }
}

}  // namespace
}  // namespace freqkv
