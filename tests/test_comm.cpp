// Multi-rank tests of MpiCommunicator and ParallelGrid, run under mpirun (ctest: comm_mpi_np2,
// comm_mpi_np4; main() in mpi_gtest_main.cpp):
//   - every collective on known per-rank data, for f32, f64, bf16, i32, i64, with one MPI call per
//     operation and with 3 elements per call (the chunked paths that counts above INT_MAX take);
//   - every forward/adjoint pair of Megatron's mappings as <A x, y> = <x, Aᵀ y> on random data;
//   - bf16 reductions (one fp32 add and rounding per combining step, NaN in max), errors;
//   - the grid: coordinates and group memberships for every shape of the world size (the four
//     4-rank shapes against literal tables), shape validation, the start-up table.
// Every rank runs every check; collectives are never skipped on some ranks only.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "tests/test_support.h"
#include "comm/mpi_communicator.h"
#include "comm/parallel_grid.h"

namespace freqkv {
namespace {

// ---- element conversions and data --------------------------------------------------------------

template <typename U> U from_double(double v) { return static_cast<U>(v); }
template <> bf16 from_double<bf16>(double v) { return bf16(static_cast<float>(v)); }
template <typename U> double to_double(U v) { return static_cast<double>(v); }
template <> double to_double<bf16>(bf16 v) { return static_cast<double>(static_cast<float>(v)); }

// One MPI call per operation, and 3 elements per MPI call (37 elements: 13 chunks, the last short).
const int64_t kMaxChunks[] = {MpiCommunicator::kDefaultMaxChunk, 3};
const int64_t kCounts[] = {0, 1, 37};

// Known data: small integers in [-5, 5], exact in every type; sums over up to 8 ranks stay within
// bf16's 8 significant bits, so every expected value below is exact. They vary with the rank in
// no monotone way, so a max is not always the last rank's value.
double known(int source, int64_t i) {
  return static_cast<double>((source * 5 + i * 3) % 11) - 5.0;
}

template <typename U> std::vector<U> known_vector(int source, int64_t n) {
  std::vector<U> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[static_cast<size_t>(i)] = from_double<U>(known(source, i));
  return values;
}

template <typename U> std::vector<U> filled(int64_t n, double value) {
  return std::vector<U>(static_cast<size_t>(n), from_double<U>(value));
}

template <typename U>
void expect_values(const std::vector<U>& got, const std::vector<double>& want,
                   const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size() && reported < 5; ++i) {
    if (to_double(got[i]) != want[i]) {
      ADD_FAILURE() << what << ": element " << i << " is " << to_double(got[i]) << ", expected "
                    << want[i];
      ++reported;
    }
  }
}

std::string context(const MpiCommunicator& comm, int64_t n) {
  return "rank " + std::to_string(comm.rank()) + "/" + std::to_string(comm.size()) +
         ", n=" + std::to_string(n) + ", max_chunk=" + std::to_string(comm.max_chunk());
}

struct ElementTypeNames {
  template <typename U> static std::string GetName(int) {
    return comm_dtype_name(CommDTypeOf<U>::value);
  }
};

// ---- collectives on known data, every element type ---------------------------------------------

template <typename U> class CollectiveTest : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, bf16, int32_t, int64_t>;
TYPED_TEST_SUITE(CollectiveTest, ElementTypes, ElementTypeNames);

TYPED_TEST(CollectiveTest, AllReduceSumAndMax) {
  using U = TypeParam;
  for (const int64_t max_chunk : kMaxChunks) {
    MpiCommunicator world(MPI_COMM_WORLD, "world", max_chunk);
    const int p = world.size();
    for (const int64_t n : kCounts) {
      std::vector<double> sum(static_cast<size_t>(n), 0.0), max(static_cast<size_t>(n), -1e300);
      for (int q = 0; q < p; ++q) {
        for (int64_t i = 0; i < n; ++i) {
          sum[static_cast<size_t>(i)] += known(q, i);
          max[static_cast<size_t>(i)] = std::max(max[static_cast<size_t>(i)], known(q, i));
        }
      }
      std::vector<U> data = known_vector<U>(world.rank(), n);
      world.all_reduce_sum(data.data(), n);
      expect_values(data, sum, "all_reduce sum, " + context(world, n));
      data = known_vector<U>(world.rank(), n);
      world.all_reduce_max(data.data(), n);
      expect_values(data, max, "all_reduce max, " + context(world, n));
    }
  }
}

TYPED_TEST(CollectiveTest, AllGatherOutOfPlaceAndInPlace) {
  using U = TypeParam;
  for (const int64_t max_chunk : kMaxChunks) {
    MpiCommunicator world(MPI_COMM_WORLD, "world", max_chunk);
    const int p = world.size();
    const int r = world.rank();
    for (const int64_t n : kCounts) {
      std::vector<double> want;
      for (int q = 0; q < p; ++q) {
        for (int64_t i = 0; i < n; ++i) want.push_back(known(q, i));
      }
      const std::vector<U> send = known_vector<U>(r, n);
      std::vector<U> recv = filled<U>(p * n, 99.0);
      world.all_gather(send.data(), recv.data(), n);
      expect_values(recv, want, "all_gather, " + context(world, n));

      // In place: this rank's block already sits in recv.
      std::vector<U> gathered = filled<U>(p * n, 99.0);
      std::copy(send.begin(), send.end(), gathered.begin() + r * n);
      world.all_gather(gathered.data() + r * n, gathered.data(), n);
      expect_values(gathered, want, "in-place all_gather, " + context(world, n));
    }
  }
}

TYPED_TEST(CollectiveTest, ReduceScatter) {
  using U = TypeParam;
  for (const int64_t max_chunk : kMaxChunks) {
    MpiCommunicator world(MPI_COMM_WORLD, "world", max_chunk);
    const int p = world.size();
    const int r = world.rank();
    for (const int64_t n : kCounts) {
      std::vector<double> want(static_cast<size_t>(n), 0.0);
      for (int q = 0; q < p; ++q) {
        for (int64_t i = 0; i < n; ++i) want[static_cast<size_t>(i)] += known(q, r * n + i);
      }
      const std::vector<U> send = known_vector<U>(r, p * n);
      std::vector<U> recv = filled<U>(n, 99.0);
      world.reduce_scatter_sum(send.data(), recv.data(), n);
      expect_values(recv, want, "reduce_scatter, " + context(world, n));
    }
  }
}

TYPED_TEST(CollectiveTest, BroadcastFromEveryRoot) {
  using U = TypeParam;
  for (const int64_t max_chunk : kMaxChunks) {
    MpiCommunicator world(MPI_COMM_WORLD, "world", max_chunk);
    for (int root = 0; root < world.size(); ++root) {
      for (const int64_t n : kCounts) {
        std::vector<U> data = world.rank() == root ? known_vector<U>(root, n) : filled<U>(n, 99.0);
        world.broadcast(data.data(), n, root);
        std::vector<double> want(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) want[static_cast<size_t>(i)] = known(root, i);
        expect_values(data, want,
                      "broadcast from root " + std::to_string(root) + ", " + context(world, n));
      }
    }
  }
}

TYPED_TEST(CollectiveTest, ReduceToEveryRootLeavesOthersUnchanged) {
  using U = TypeParam;
  for (const int64_t max_chunk : kMaxChunks) {
    MpiCommunicator world(MPI_COMM_WORLD, "world", max_chunk);
    const int r = world.rank();
    for (int root = 0; root < world.size(); ++root) {
      for (const int64_t n : kCounts) {
        std::vector<double> want(static_cast<size_t>(n), 0.0);
        for (int64_t i = 0; i < n; ++i) {
          if (r == root) {
            for (int q = 0; q < world.size(); ++q) want[static_cast<size_t>(i)] += known(q, i);
          } else {
            want[static_cast<size_t>(i)] = known(r, i);
          }
        }
        std::vector<U> data = known_vector<U>(r, n);
        world.reduce_sum_to(data.data(), n, root);
        expect_values(data, want,
                      "reduce_to root " + std::to_string(root) + ", " + context(world, n));
      }
    }
  }
}

TYPED_TEST(CollectiveTest, SendRecvBetweenEveryPair) {
  using U = TypeParam;
  for (const int64_t max_chunk : kMaxChunks) {
    MpiCommunicator world(MPI_COMM_WORLD, "world", max_chunk);
    const int p = world.size();
    const int r = world.rank();
    // One ordered pair at a time: every rank walks the same list, only the two involved act.
    for (int from = 0; from < p; ++from) {
      for (int to = 0; to < p; ++to) {
        if (from == to) continue;
        const int source = from * p + to;  // distinct data per pair
        for (const int64_t n : kCounts) {
          if (r == from) {
            const std::vector<U> data = known_vector<U>(source, n);
            world.send(data.data(), n, to);
          } else if (r == to) {
            std::vector<U> data = filled<U>(n, 99.0);
            world.recv(data.data(), n, from);
            std::vector<double> want(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i) want[static_cast<size_t>(i)] = known(source, i);
            expect_values(data, want, "recv from " + std::to_string(from) + ", " +
                                          context(world, n));
          }
        }
      }
    }
  }
}

// ---- scalars, bf16 arithmetic, groups, errors ------------------------------------------------

TEST(MpiCommunicator, AllReduceScalarAndBarrier) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const int p = world.size();
  EXPECT_EQ(world.all_reduce_scalar(world.rank() + 1.0, ReduceOp::kSum), p * (p + 1) / 2.0);
  EXPECT_EQ(world.all_reduce_scalar(world.rank() + 0.5, ReduceOp::kMax), p - 0.5);
  world.barrier();
  EXPECT_EQ(world.name(), "mpi");
  std::vector<int> ranks(static_cast<size_t>(p));
  for (int q = 0; q < p; ++q) ranks[static_cast<size_t>(q)] = q;
  EXPECT_EQ(world.world_ranks(), ranks);
  EXPECT_NE(world.describe().find("group 'world'"), std::string::npos) << world.describe();
}

TEST(MpiCommunicator, StartedSumsEqualBlockingSums) {
  // Several overlapped sums in flight at once (f32, f64, bf16, one split into chunks), advanced
  // by progress() and finished by wait_reductions(), equal the blocking all_reduce.
  MpiCommunicator world(MPI_COMM_WORLD, "world", /*max_chunk=*/7);
  const int r = world.rank();
  std::vector<float> f(23), f_ref;
  std::vector<double> d(5), d_ref;
  std::vector<bf16> b(9), b_ref;
  for (size_t i = 0; i < f.size(); ++i) f[i] = static_cast<float>(std::sin(1.0 + i + 7.0 * r));
  for (size_t i = 0; i < d.size(); ++i) d[i] = std::cos(2.0 + i * (r + 1));
  for (size_t i = 0; i < b.size(); ++i) b[i] = bf16(static_cast<float>(i + r) * 0.25f);
  f_ref = f;
  d_ref = d;
  b_ref = b;
  world.all_reduce_sum(f_ref.data(), static_cast<int64_t>(f_ref.size()));
  world.all_reduce_sum(d_ref.data(), static_cast<int64_t>(d_ref.size()));
  world.all_reduce_sum(b_ref.data(), static_cast<int64_t>(b_ref.size()));
  world.start_all_reduce_sum(f.data(), static_cast<int64_t>(f.size()));
  world.progress();
  world.start_all_reduce_sum(d.data(), static_cast<int64_t>(d.size()));
  world.start_all_reduce_sum(b.data(), static_cast<int64_t>(b.size()));
  world.progress();
  world.wait_reductions();
  world.wait_reductions();  // nothing left: a no-op
  for (size_t i = 0; i < f.size(); ++i) EXPECT_FLOAT_EQ(f[i], f_ref[i]) << i;
  for (size_t i = 0; i < d.size(); ++i) EXPECT_DOUBLE_EQ(d[i], d_ref[i]) << i;
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(static_cast<float>(b[i]), static_cast<float>(b_ref[i])) << i;
  EXPECT_THROW(world.start_all_reduce_sum(f.data(), -1, CommDType::kF32), std::invalid_argument);
}

TEST(MpiCommunicator, Bf16SumAddsInFp32AndRoundsToNearestEven) {
  MpiCommunicator world(MPI_COMM_WORLD);
  if (world.size() < 2) GTEST_SKIP() << "needs two ranks";
  // 1 + 1.5·2⁻⁷ lies halfway between bf16's neighbours 1 + 2⁻⁷ and 1 + 2·2⁻⁷: fp32 holds the sum
  // exactly and rounding to nearest even gives 1 + 2·2⁻⁷. Other ranks add exact zeros.
  const float small = 1.5f / 128.0f;  // exact in bf16
  const int r = world.rank();
  bf16 values[2] = {bf16(r == 0 ? 1.0f : r == 1 ? small : 0.0f),
                    bf16(r == 0 ? -1.0f : r == 1 ? -small : 0.0f)};
  world.all_reduce_sum(values, 2);
  EXPECT_EQ(static_cast<float>(values[0]), 1.0f + 2.0f / 128.0f);
  EXPECT_EQ(static_cast<float>(values[0]), static_cast<float>(bf16(1.0f + small)));
  EXPECT_EQ(static_cast<float>(values[1]), -(1.0f + 2.0f / 128.0f));
}

TEST(MpiCommunicator, Bf16MaxKeepsNaN) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  bf16 values[3] = {bf16(world.rank() == 0 ? nan : 1.0f),
                    bf16(world.rank() == world.size() - 1 ? nan : 2.0f),
                    bf16(-3.0f + static_cast<float>(world.rank()))};
  world.all_reduce_max(values, 3);
  EXPECT_TRUE(std::isnan(static_cast<float>(values[0])));
  EXPECT_TRUE(std::isnan(static_cast<float>(values[1])));
  EXPECT_EQ(static_cast<float>(values[2]), -3.0f + static_cast<float>(world.size() - 1));
}

TEST(MpiCommunicator, SplitOrdersByKeyAndNamesWorldRanks) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const int p = world.size();
  const int r = world.rank();
  // Even and odd ranks, each group in reverse world order (key = -rank).
  std::unique_ptr<Communicator> half = world.split(r % 2, -r, "parity");
  std::vector<int> want;
  for (int q = p - 1; q >= 0; --q) {
    if (q % 2 == r % 2) want.push_back(q);
  }
  ASSERT_EQ(half->size(), static_cast<int>(want.size()));
  auto* mpi_half = dynamic_cast<MpiCommunicator*>(half.get());
  ASSERT_NE(mpi_half, nullptr);
  EXPECT_EQ(mpi_half->world_ranks(), want);
  EXPECT_EQ(mpi_half->world_ranks()[static_cast<size_t>(half->rank())], r);
  EXPECT_EQ(mpi_half->label(), "parity");
  std::vector<int32_t> members(want.size());
  const int32_t mine = r;
  half->all_gather(&mine, members.data(), 1);
  EXPECT_EQ(std::vector<int>(members.begin(), members.end()), want);
}

TEST(MpiCommunicator, BadArgumentsNameTheGroupAndValue) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const int p = world.size();
  float data[4] = {};
  expect_error<std::invalid_argument>([&] { world.broadcast(data, 4, p); },
                                      {"broadcast", "root " + std::to_string(p), "group 'world'"});
  expect_error<std::invalid_argument>([&] { world.reduce_sum_to(data, 4, -1); },
                                      {"reduce_to", "root -1"});
  expect_error<std::invalid_argument>([&] { world.send(data, 4, world.rank()); },
                                      {"send", "this rank"});
  expect_error<std::invalid_argument>([&] { world.recv(data, 4, p + 3); },
                                      {"recv", "peer " + std::to_string(p + 3)});
  expect_error<std::invalid_argument>([&] { world.all_reduce_sum(data, -2); },
                                      {"all_reduce", "-2"});
  expect_error<std::invalid_argument>([&] { MpiCommunicator bad(MPI_COMM_WORLD, "bad", 0); },
                                      {"max_chunk 0", "'bad'"});
}

TEST(MpiCommunicator, MpiErrorsBecomeExceptionsNamingTheCall) {
  MpiCommunicator world(MPI_COMM_WORLD);
  if (world.size() < 2) GTEST_SKIP() << "needs two ranks";
  float data[4] = {1, 2, 3, 4};
  // A message longer than the receive buffer is MPI_ERR_TRUNCATE, returned (not fatal) and
  // turned into a runtime_error; a shorter one is no MPI error but still a count mismatch.
  if (world.rank() == 0) {
    world.send(data, 4, 1);
    world.send(data, 2, 1);
  } else if (world.rank() == 1) {
    expect_error<std::runtime_error>([&] { world.recv(data, 2, 0); },
                                     {"MPI_Recv", "from peer 0", "group 'world'", "truncated"});
    expect_error<std::runtime_error>([&] { world.recv(data, 4, 0); },
                                     {"MPI_Recv", "the message held 2"});
  }
  world.barrier();
}

// ---- adjoint pairs: <A x, y> = <x, Aᵀ y> ----------------------------------------------------------

template <typename U> std::vector<U> random_vector(uint64_t seed, int64_t n) {
  std::mt19937_64 generator(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  std::vector<U> values(static_cast<size_t>(n));
  for (auto& v : values) v = static_cast<U>(uniform(generator));
  return values;
}

template <typename U> double dot(const std::vector<U>& a, const std::vector<U>& b) {
  double sum = 0.0;
  for (size_t i = 0; i < a.size(); ++i) sum += static_cast<double>(a[i]) * b[i];
  return sum;
}

template <typename U> class AdjointTest : public ::testing::Test {
 protected:
  // Relative tolerance: the two sides sum the same products in different orders.
  static double tolerance() { return std::is_same<U, float>::value ? 1e-5 : 1e-12; }
  void expect_adjoint(double lhs, double rhs, const std::string& pair) {
    EXPECT_NEAR(lhs, rhs, tolerance() * std::max(1.0, std::abs(lhs)))
        << pair << ": <A x, y> = " << lhs << " but <x, Aᵀ y> = " << rhs;
  }
  MpiCommunicator world{MPI_COMM_WORLD};
  const int p = world.size();
  const int r = world.rank();
  const int64_t n = 53;
  // Per-rank (distributed) and same-on-every-rank (replicated) random data.
  uint64_t distributed_seed(uint64_t stream) const { return 1000 * stream + r + 1; }
  static uint64_t replicated_seed(uint64_t stream) { return 1000 * stream + 999; }
};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(AdjointTest, FloatTypes, ElementTypeNames);

// all_reduce on a distributed vector (x_0 … x_{p-1}) ↦ (Σx, …, Σx) is its own adjoint.
TYPED_TEST(AdjointTest, AllReduceIsSelfAdjoint) {
  using U = TypeParam;
  const std::vector<U> x = random_vector<U>(this->distributed_seed(1), this->n);
  const std::vector<U> y = random_vector<U>(this->distributed_seed(2), this->n);
  std::vector<U> ax = x, ay = y;
  this->world.all_reduce_sum(ax.data(), this->n);
  this->world.all_reduce_sum(ay.data(), this->n);
  const double lhs = this->world.all_reduce_scalar(dot(ax, y), ReduceOp::kSum);
  const double rhs = this->world.all_reduce_scalar(dot(x, ay), ReduceOp::kSum);
  this->expect_adjoint(lhs, rhs, "all_reduce");
}

// Megatron's f: identity forward (a replicated x used by every rank), all_reduce backward.
TYPED_TEST(AdjointTest, CopyForwardAllReduceBackward) {
  using U = TypeParam;
  const std::vector<U> x = random_vector<U>(this->replicated_seed(3), this->n);
  const std::vector<U> y = random_vector<U>(this->distributed_seed(4), this->n);
  const double lhs = this->world.all_reduce_scalar(dot(x, y), ReduceOp::kSum);  // Σ_r <x, y_r>
  std::vector<U> fty = y;
  this->world.all_reduce_sum(fty.data(), this->n);
  const double rhs = dot(x, fty);  // the same on every rank
  this->expect_adjoint(lhs, rhs, "f (copy / all_reduce)");
  EXPECT_EQ(this->world.all_reduce_scalar(rhs, ReduceOp::kMax),
            -this->world.all_reduce_scalar(-rhs, ReduceOp::kMax))
      << "the replicated result differs between ranks";
}

// Megatron's g: all_reduce forward (partial sums to a replicated result), identity backward.
TYPED_TEST(AdjointTest, AllReduceForwardCopyBackward) {
  using U = TypeParam;
  const std::vector<U> x = random_vector<U>(this->distributed_seed(5), this->n);
  const std::vector<U> y = random_vector<U>(this->replicated_seed(6), this->n);
  std::vector<U> gx = x;
  this->world.all_reduce_sum(gx.data(), this->n);
  const double lhs = dot(gx, y);
  const double rhs = this->world.all_reduce_scalar(dot(x, y), ReduceOp::kSum);  // Σ_r <x_r, y>
  this->expect_adjoint(lhs, rhs, "g (all_reduce / copy)");
}

// all_gather (x_r ↦ every rank holds [x_0 … x_{p-1}]) and reduce_scatter.
TYPED_TEST(AdjointTest, AllGatherAndReduceScatter) {
  using U = TypeParam;
  const int64_t n = this->n;
  const std::vector<U> x = random_vector<U>(this->distributed_seed(7), n);
  const std::vector<U> y = random_vector<U>(this->distributed_seed(8), this->p * n);
  std::vector<U> ax(static_cast<size_t>(this->p * n));
  this->world.all_gather(x.data(), ax.data(), n);
  std::vector<U> aty(static_cast<size_t>(n));
  this->world.reduce_scatter_sum(y.data(), aty.data(), n);
  const double lhs = this->world.all_reduce_scalar(dot(ax, y), ReduceOp::kSum);
  const double rhs = this->world.all_reduce_scalar(dot(x, aty), ReduceOp::kSum);
  this->expect_adjoint(lhs, rhs, "all_gather / reduce_scatter");
}

// broadcast from the root (root's x ↦ every rank holds x) and the sum-reduce to the root.
TYPED_TEST(AdjointTest, BroadcastAndReduceTo) {
  using U = TypeParam;
  for (int root = 0; root < this->p; ++root) {
    const std::vector<U> x = random_vector<U>(this->distributed_seed(9 + root), this->n);
    const std::vector<U> y = random_vector<U>(this->distributed_seed(20 + root), this->n);
    std::vector<U> ax = x;
    this->world.broadcast(ax.data(), this->n, root);
    std::vector<U> aty = y;
    this->world.reduce_sum_to(aty.data(), this->n, root);
    const double lhs = this->world.all_reduce_scalar(dot(ax, y), ReduceOp::kSum);
    const double rhs = this->world.all_reduce_scalar(this->r == root ? dot(x, aty) : 0.0,
                                                     ReduceOp::kSum);
    this->expect_adjoint(lhs, rhs, "broadcast / reduce_to, root " + std::to_string(root));
  }
}

// send from a to b (a's x ↦ b's buffer); its adjoint sends b's y back to a.
TYPED_TEST(AdjointTest, SendAndRecv) {
  using U = TypeParam;
  for (int a = 0; a < this->p; ++a) {
    for (int b = 0; b < this->p; ++b) {
      if (a == b) continue;
      const std::vector<U> x = random_vector<U>(this->distributed_seed(40 + a), this->n);
      const std::vector<U> y = random_vector<U>(this->distributed_seed(60 + b), this->n);
      double lhs = 0.0, rhs = 0.0;
      std::vector<U> moved(static_cast<size_t>(this->n));
      if (this->r == a) this->world.send(x.data(), this->n, b);
      if (this->r == b) {
        this->world.recv(moved.data(), this->n, a);
        lhs = dot(moved, y);
        this->world.send(y.data(), this->n, a);
      }
      if (this->r == a) {
        this->world.recv(moved.data(), this->n, b);
        rhs = dot(x, moved);
      }
      lhs = this->world.all_reduce_scalar(lhs, ReduceOp::kSum);
      rhs = this->world.all_reduce_scalar(rhs, ReduceOp::kSum);
      this->expect_adjoint(lhs, rhs, "send / recv " + std::to_string(a) + " -> " +
                                         std::to_string(b));
    }
  }
}

// ---- the grid ----------------------------------------------------------------------------------

std::unique_ptr<ParallelGrid> mpi_grid(GridShape shape) {
  return std::make_unique<ParallelGrid>(std::make_unique<MpiCommunicator>(MPI_COMM_WORLD), shape);
}

std::string shape_text(const GridShape& s) {
  return "(tp=" + std::to_string(s.tp) + ", sp=" + std::to_string(s.sp) +
         ", dp=" + std::to_string(s.dp) + ")";
}

// The world ranks of a group, as its members report them through the group itself.
std::vector<int> exchanged_members(Communicator& group, int world_rank) {
  std::vector<int32_t> members(static_cast<size_t>(group.size()));
  const int32_t mine = world_rank;
  group.all_gather(&mine, members.data(), 1);
  return std::vector<int>(members.begin(), members.end());
}

std::vector<GridShape> shapes_of(int world_size) {
  std::vector<GridShape> shapes;
  for (int tp = 1; tp <= world_size; ++tp) {
    for (int sp = 1; tp * sp <= world_size; ++sp) {
      if (world_size % (tp * sp) == 0) shapes.push_back({tp, sp, world_size / (tp * sp)});
    }
  }
  return shapes;
}

TEST(ParallelGrid, EveryShapeOfTheWorldHasTheDeclaredOrderAndGroups) {
  const int p = MpiSession::world_size();
  const int r = MpiSession::world_rank();
  for (const GridShape& shape : shapes_of(p)) {
    SCOPED_TRACE("shape " + shape_text(shape) + ", world rank " + std::to_string(r));
    const auto grid = mpi_grid(shape);
    EXPECT_EQ(grid->world_rank(), r);
    EXPECT_EQ(r, grid->tp_rank() + shape.tp * (grid->sp_rank() + shape.sp * grid->dp_rank()));
    EXPECT_EQ(grid->coord(), ParallelGrid::coord_of(shape, r));
    for (const GridDim dim : {GridDim::kTp, GridDim::kSp, GridDim::kDp}) {
      Communicator& group = grid->group(dim);
      const std::vector<int> want = ParallelGrid::group_ranks(shape, dim, r);
      EXPECT_EQ(group.size(), static_cast<int>(want.size())) << grid_dim_name(dim);
      EXPECT_EQ(group.name(), want.size() > 1 ? "mpi" : "local") << grid_dim_name(dim);
      EXPECT_EQ(exchanged_members(group, r), want) << grid_dim_name(dim);
    }
    EXPECT_EQ(&grid->tp(), &grid->group(GridDim::kTp));
    EXPECT_EQ(grid->tp().rank(), grid->tp_rank());
    EXPECT_EQ(grid->sp().rank(), grid->sp_rank());
    EXPECT_EQ(grid->dp().rank(), grid->dp_rank());
    // Groups along different dimensions meet in exactly this rank.
    const double ones = grid->tp().all_reduce_scalar(1.0, ReduceOp::kSum) *
                        grid->sp().all_reduce_scalar(1.0, ReduceOp::kSum) *
                        grid->dp().all_reduce_scalar(1.0, ReduceOp::kSum);
    EXPECT_EQ(ones, static_cast<double>(p));
    // The sp × dp replicas: the world ranks sharing this rank's tp coordinate, by sp + sp·dp.
    std::vector<int> replicas;
    for (int d = 0; d < shape.dp; ++d)
      for (int s = 0; s < shape.sp; ++s)
        replicas.push_back(ParallelGrid::world_rank_of(shape, {grid->tp_rank(), s, d}));
    EXPECT_EQ(exchanged_members(grid->replicas(), r), replicas);
    EXPECT_EQ(grid->replicas().rank(), grid->sp_rank() + shape.sp * grid->dp_rank());
  }
}

struct RankLayout {
  GridCoord coord;
  std::vector<int> tp, sp, dp;  // world ranks of its groups
};

TEST(ParallelGrid, FourRankShapesMatchTheirTables) {
  if (MpiSession::world_size() != 4) GTEST_SKIP() << "the literal tables are for 4 ranks";
  const int r = MpiSession::world_rank();
  struct Case {
    GridShape shape;
    std::vector<RankLayout> ranks;  // by world rank
  };
  const std::vector<Case> cases = {
      {{4, 1, 1},
       {{{0, 0, 0}, {0, 1, 2, 3}, {0}, {0}},
        {{1, 0, 0}, {0, 1, 2, 3}, {1}, {1}},
        {{2, 0, 0}, {0, 1, 2, 3}, {2}, {2}},
        {{3, 0, 0}, {0, 1, 2, 3}, {3}, {3}}}},
      {{2, 2, 1},
       {{{0, 0, 0}, {0, 1}, {0, 2}, {0}},
        {{1, 0, 0}, {0, 1}, {1, 3}, {1}},
        {{0, 1, 0}, {2, 3}, {0, 2}, {2}},
        {{1, 1, 0}, {2, 3}, {1, 3}, {3}}}},
      {{1, 2, 2},
       {{{0, 0, 0}, {0}, {0, 1}, {0, 2}},
        {{0, 1, 0}, {1}, {0, 1}, {1, 3}},
        {{0, 0, 1}, {2}, {2, 3}, {0, 2}},
        {{0, 1, 1}, {3}, {2, 3}, {1, 3}}}},
      {{1, 1, 4},
       {{{0, 0, 0}, {0}, {0}, {0, 1, 2, 3}},
        {{0, 0, 1}, {1}, {1}, {0, 1, 2, 3}},
        {{0, 0, 2}, {2}, {2}, {0, 1, 2, 3}},
        {{0, 0, 3}, {3}, {3}, {0, 1, 2, 3}}}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE("shape " + shape_text(c.shape) + ", world rank " + std::to_string(r));
    const auto grid = mpi_grid(c.shape);
    const RankLayout& want = c.ranks[static_cast<size_t>(r)];
    EXPECT_EQ(grid->coord(), want.coord);
    EXPECT_EQ(exchanged_members(grid->tp(), r), want.tp);
    EXPECT_EQ(exchanged_members(grid->sp(), r), want.sp);
    EXPECT_EQ(exchanged_members(grid->dp(), r), want.dp);
    if (c.shape.tp == 2 && r == 0) std::cout << grid->table();
  }
}

TEST(ParallelGrid, TableListsEveryRank) {
  const int p = MpiSession::world_size();
  const auto grid = mpi_grid({p, 1, 1});
  const std::string table = grid->table();
  EXPECT_EQ(table.rfind("grid: tp=" + std::to_string(p) + " × sp=1 × dp=1 = " +
                            std::to_string(p) + (p == 1 ? " rank" : " ranks") +
                            ", order: tp fastest\n", 0),
            0u)
      << table;
  EXPECT_EQ(std::count(table.begin(), table.end(), '\n'), p + 2) << table;
  ASSERT_EQ(grid->host_names().size(), static_cast<size_t>(p));
  for (const std::string& host : grid->host_names()) {
    EXPECT_FALSE(host.empty());
    EXPECT_NE(table.find(host), std::string::npos) << table;
  }
}

TEST(ParallelGrid, ShapeThatDoesNotMatchTheWorldIsAnErrorOnEveryRank) {
  const int p = MpiSession::world_size();
  const std::string n = std::to_string(p + 1);
  expect_error<std::invalid_argument>(
      [&] { mpi_grid({p + 1, 1, 1}); },
      {"tp × sp × dp = " + n + " × 1 × 1 = " + n + " but " + std::to_string(p) +
       (p == 1 ? " rank was" : " ranks were") +
       " started: change parallel.tp/sp/dp or mpirun -np"});
  if (p == 4) {
    try {
      mpi_grid({2, 1, 1});
      ADD_FAILURE() << "a 2-rank grid on 4 ranks was accepted";
    } catch (const std::invalid_argument& error) {
      EXPECT_STREQ(error.what(), "tp × sp × dp = 2 × 1 × 1 = 2 but 4 ranks were started: "
                                 "change parallel.tp/sp/dp or mpirun -np");
    }
  }
  expect_error<std::invalid_argument>([&] { mpi_grid({0, p, 1}); }, {"parallel.tp = 0"});
}

TEST(ParallelGrid, RanksGivenDifferentShapesAllFail) {
  const int p = MpiSession::world_size();
  if (p < 2) GTEST_SKIP() << "needs two ranks";
  const GridShape shape = MpiSession::world_rank() == 0 ? GridShape{p, 1, 1} : GridShape{1, p, 1};
  expect_error<std::invalid_argument>([&] { mpi_grid(shape); },
                                      {"different grids", "same parallel.tp/sp/dp"});
}

TEST(ParallelGrid, MakeGridUsesMpiForSeveralRanks) {
  const int p = MpiSession::world_size();
  const auto grid = make_grid({1, 1, p});
  // One MPI rank stays local: a one-rank run makes no MPI calls.
  EXPECT_EQ(grid->world().name(), p > 1 ? "mpi" : "local");
  EXPECT_EQ(grid->world().size(), p);
  EXPECT_EQ(grid->dp().size(), p);
  EXPECT_EQ(grid->dp_rank(), MpiSession::world_rank());
  EXPECT_EQ(grid->tp().name(), "local");
  EXPECT_EQ(grid->dp().name(), p > 1 ? "mpi" : "local");
}

}  // namespace
}  // namespace freqkv
