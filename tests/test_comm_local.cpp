// Single-process tests of the communication layer: LocalCommunicator (the group of one rank),
// the grid's rank order and shape validation, make_grid without MPI, and MpiSession's singleton
// init (a one-rank MPI world in a process that mpirun did not start).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "tests/test_support.h"
#include "comm/communicator.h"
#include "comm/mpi_communicator.h"
#include "comm/parallel_grid.h"

namespace freqkv {
namespace {

TEST(CommDType, SizesAndNames) {
  EXPECT_EQ(comm_dtype_size(CommDType::kF32), 4u);
  EXPECT_EQ(comm_dtype_size(CommDType::kF64), 8u);
  EXPECT_EQ(comm_dtype_size(CommDType::kBF16), 2u);
  EXPECT_EQ(comm_dtype_size(CommDType::kI32), 4u);
  EXPECT_EQ(comm_dtype_size(CommDType::kI64), 8u);
  EXPECT_STREQ(comm_dtype_name(CommDType::kBF16), "bf16");
  EXPECT_STREQ(reduce_op_name(ReduceOp::kMax), "max");
  EXPECT_EQ(CommDTypeOf<bf16>::value, CommDType::kBF16);
  EXPECT_EQ(CommDTypeOf<int64_t>::value, CommDType::kI64);
}

// ---- LocalCommunicator -------------------------------------------------------------------------

TEST(LocalCommunicator, CollectivesAreIdentitiesAndCopies) {
  LocalCommunicator comm;
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  EXPECT_EQ(comm.name(), "local");

  std::vector<float> data = {1.5f, -2.0f, 3.25f};
  comm.all_reduce_sum(data.data(), 3);
  comm.all_reduce_max(data.data(), 3);
  comm.broadcast(data.data(), 3, 0);
  comm.reduce_sum_to(data.data(), 3, 0);
  EXPECT_EQ(data, (std::vector<float>{1.5f, -2.0f, 3.25f}));

  std::vector<float> gathered(3, 0.0f);
  comm.all_gather(data.data(), gathered.data(), 3);
  EXPECT_EQ(gathered, data);
  std::vector<double> wide = {1.0, 2.0}, scattered(2, 0.0);
  comm.reduce_scatter_sum(wide.data(), scattered.data(), 2);
  EXPECT_EQ(scattered, wide);
  // In place: send is recv.
  comm.all_gather(gathered.data(), gathered.data(), 3);
  EXPECT_EQ(gathered, data);

  std::vector<bf16> half = {bf16(1.0f), bf16(2.0f)}, half_out(2);
  comm.all_gather(half.data(), half_out.data(), 2);
  EXPECT_EQ(half_out[1].bits, half[1].bits);

  EXPECT_EQ(comm.all_reduce_scalar(4.5, ReduceOp::kSum), 4.5);
  EXPECT_EQ(comm.all_reduce_scalar(-1.0, ReduceOp::kMax), -1.0);
  comm.barrier();
}

int copy_calls = 0;
size_t copied_bytes = 0;
void counting_copy(void* dst, const void* src, size_t bytes) {
  ++copy_calls;
  copied_bytes += bytes;
  std::memcpy(dst, src, bytes);
}

TEST(LocalCommunicator, UsesTheBackendCopyAndKeepsItInSplits) {
  copy_calls = 0;
  copied_bytes = 0;
  LocalCommunicator comm(&counting_copy);
  const int32_t send[4] = {1, 2, 3, 4};
  int32_t recv[4] = {};
  comm.all_gather(send, recv, 4);
  EXPECT_EQ(copy_calls, 1);
  EXPECT_EQ(copied_bytes, 16u);
  EXPECT_EQ(recv[3], 4);
  comm.all_gather(send, recv, 0);  // nothing to move
  EXPECT_EQ(copy_calls, 1);

  std::unique_ptr<Communicator> part = comm.split(3, 0, "tp");
  EXPECT_EQ(part->name(), "local");
  EXPECT_EQ(part->size(), 1);
  int64_t wide_send[2] = {7, 8}, wide_recv[2] = {};
  part->reduce_scatter_sum(wide_send, wide_recv, 2);
  EXPECT_EQ(copy_calls, 2);
  EXPECT_EQ(copied_bytes, 32u);
  EXPECT_EQ(wide_recv[1], 8);
}

TEST(LocalCommunicator, OtherRootsPeersAndCountsAreErrors) {
  LocalCommunicator comm;
  float data[2] = {};
  expect_invalid([&] { comm.broadcast(data, 2, 1); }, {"broadcast", "root 1", "one rank"});
  expect_invalid([&] { comm.reduce_sum_to(data, 2, -1); }, {"reduce_to", "root -1"});
  expect_invalid([&] { comm.send(data, 2, 1); }, {"send to peer 1", "no other rank"});
  expect_invalid([&] { comm.send(data, 2, 0); }, {"send to peer 0"});
  expect_invalid([&] { comm.recv(data, 2, 0); }, {"recv from peer 0"});
  expect_invalid([&] { comm.all_gather(data, data + 1, -1); }, {"all_gather", "-1"});
  expect_invalid([&] { comm.split(-1, 0, "dp"); }, {"'dp'", "color -1"});
}

// ---- the grid without MPI ----------------------------------------------------------------------

TEST(ParallelGrid, RankOrderIsTensorParallelFastest) {
  const GridShape shape{2, 3, 4};
  for (int r = 0; r < 24; ++r) {
    const GridCoord c = ParallelGrid::coord_of(shape, r);
    EXPECT_EQ(r, c.tp + 2 * (c.sp + 3 * c.dp));
    EXPECT_EQ(ParallelGrid::world_rank_of(shape, c), r);
  }
  // World rank 5 of (2, 2, 2) is (tp 1, sp 0, dp 1).
  const GridShape cube{2, 2, 2};
  EXPECT_EQ(ParallelGrid::coord_of(cube, 5), (GridCoord{1, 0, 1}));
  EXPECT_EQ(ParallelGrid::group_ranks(cube, GridDim::kTp, 5), (std::vector<int>{4, 5}));
  EXPECT_EQ(ParallelGrid::group_ranks(cube, GridDim::kSp, 5), (std::vector<int>{5, 7}));
  EXPECT_EQ(ParallelGrid::group_ranks(cube, GridDim::kDp, 5), (std::vector<int>{1, 5}));
}

TEST(ParallelGrid, ValidateNamesTheProductAndTheRankCount) {
  try {
    ParallelGrid::validate({2, 1, 1}, 4);
    ADD_FAILURE() << "2 × 1 × 1 accepted for 4 ranks";
  } catch (const std::invalid_argument& error) {
    EXPECT_STREQ(error.what(), "tp × sp × dp = 2 × 1 × 1 = 2 but 4 ranks were started: "
                               "change parallel.tp/sp/dp or mpirun -np");
  }
  try {
    ParallelGrid::validate({2, 2, 2}, 1);
    ADD_FAILURE() << "2 × 2 × 2 accepted for 1 rank";
  } catch (const std::invalid_argument& error) {
    EXPECT_STREQ(error.what(), "tp × sp × dp = 2 × 2 × 2 = 8 but 1 rank was started: "
                               "change parallel.tp/sp/dp or mpirun -np");
  }
  expect_invalid([] { ParallelGrid::validate({1, 0, 1}, 0); }, {"parallel.sp = 0"});
  expect_invalid([] { ParallelGrid::validate({1, 1, -2}, 2); }, {"parallel.dp = -2"});
  ParallelGrid::validate({2, 4, 8}, 64);
}

TEST(ParallelGrid, OneRankGridOfLocalCommunicators) {
  ParallelGrid grid(std::make_unique<LocalCommunicator>(), GridShape{});
  EXPECT_EQ(grid.world().name(), "local");
  for (Communicator* group : {&grid.tp(), &grid.sp(), &grid.dp()}) {
    EXPECT_EQ(group->name(), "local");
    EXPECT_EQ(group->size(), 1);
  }
  EXPECT_EQ(grid.coord(), (GridCoord{0, 0, 0}));
  ASSERT_EQ(grid.host_names().size(), 1u);
  const std::string table = grid.table();
  EXPECT_EQ(table.rfind("grid: tp=1 × sp=1 × dp=1 = 1 rank, order: tp fastest\n", 0), 0u)
      << table;
  EXPECT_NE(table.find("tp group"), std::string::npos) << table;
  EXPECT_NE(table.find(grid.host_names()[0]), std::string::npos) << table;

  expect_invalid([] { ParallelGrid(std::make_unique<LocalCommunicator>(), GridShape{2, 1, 1}); },
                 {"= 2 but 1 rank was started"});
  expect_invalid([] { ParallelGrid(nullptr, GridShape{}); }, {"no world communicator"});
}

TEST(ParallelGrid, MakeGridWithoutMpiIsOneLocalRank) {
  if (MpiSession::started_by_launcher()) GTEST_SKIP() << "run by an MPI launcher";
  if (MpiSession::active()) GTEST_SKIP() << "MPI is active in this process";
  const auto grid = make_grid(GridShape{});
  EXPECT_EQ(grid->world().name(), "local");
  EXPECT_EQ(grid->world().size(), 1);
  expect_invalid([] { make_grid(GridShape{1, 2, 1}); },
                 {"tp × sp × dp = 1 × 2 × 1 = 2 but 1 rank was started"});
}

// ---- MpiSession in a process that mpirun did not start --------------------------------------

TEST(MpiSession, SingletonInitGivesAOneRankWorldAndFinalisesOnce) {
  if (MpiSession::active()) GTEST_SKIP() << "MPI is already active in this process";
  {
    MpiSession session;
    EXPECT_TRUE(session.owns_mpi());
    EXPECT_TRUE(MpiSession::active());
    {
      MpiSession nested;  // MPI is up: neither initialises nor finalises
      EXPECT_FALSE(nested.owns_mpi());
    }
    EXPECT_TRUE(MpiSession::active());
    if (!MpiSession::started_by_launcher()) {
      EXPECT_EQ(MpiSession::world_size(), 1);
      EXPECT_EQ(MpiSession::world_rank(), 0);
    }

    MpiCommunicator world(MPI_COMM_WORLD);
    EXPECT_EQ(world.size(), MpiSession::world_size());
    bf16 values[2] = {bf16(1.5f), bf16(-2.0f)};
    world.all_reduce_sum(values, 2);
    EXPECT_EQ(static_cast<float>(values[0]), 1.5f * static_cast<float>(world.size()));
    if (world.size() == 1) {
      int64_t gathered = 0;
      const int64_t mine = 42;
      world.all_gather(&mine, &gathered, 1);
      EXPECT_EQ(gathered, 42);
      // One MPI rank: make_grid stays local (no MPI traffic for a one-rank run).
      EXPECT_EQ(make_grid(GridShape{})->world().name(), "local");
    }
  }
  EXPECT_FALSE(MpiSession::active());
  MpiSession::finalize();  // a second finalize is nothing
  try {
    MpiSession::initialize();
    ADD_FAILURE() << "MPI initialised a second time";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("already finalised"), std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace freqkv
