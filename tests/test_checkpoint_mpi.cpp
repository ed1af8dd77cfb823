// Collective checkpoint files under mpirun (freqkv_mpi_test, 2 and 4 ranks): the ranks of a
// communicator write one HDF5 file together, each its own blocks of the logical tensors (row
// slabs, column blocks as tensor parallelism splits them, tensors owned by one rank as ZeRO
// shards them), and any rank reads any block back. Also: commit() refuses a tensor with a region
// no rank wrote, and ranks making different calls get one error everywhere instead of a hang.
//
// Every rank runs every test; checks are EXPECT_* so no rank leaves a collective the others enter.
#include "trainer/checkpoint_file.h"

#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace freqkv {
namespace {

namespace fs = std::filesystem;

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// text of rank 0, on every rank.
std::string broadcast_from_rank0(std::string text) {
  uint64_t length = text.size();
  MPI_Bcast(&length, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  text.resize(length);
  MPI_Bcast(text.data(), static_cast<int>(length), MPI_CHAR, 0, MPI_COMM_WORLD);
  return text;
}

// A fresh directory per test that every rank names alike (rank 0's pid makes it unique per run).
fs::path make_shared_test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string name = "freqkv_checkpoint_mpi_" + std::string(info->name()) + "_" +
                           std::to_string(::getpid());
  const fs::path dir = fs::path(::testing::TempDir()) / broadcast_from_rank0(name);
  if (world_rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return dir;
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (const int64_t dim : shape) count *= dim;
  return count;
}

// The logical (unsharded) values of a tensor: distinct, non-integer, signs alternating, so a
// misplaced block shows. Every rank computes them alike.
std::vector<float> logical_values(const std::vector<int64_t>& shape, float seed) {
  std::vector<float> values(static_cast<size_t>(element_count(shape)));
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = seed + 0.37f * static_cast<float>(i) * (i % 2 ? -1.0f : 1.0f);
  }
  return values;
}

// The block at offset of count of a row-major tensor of the given shape, row-major.
std::vector<float> block_of(const std::vector<float>& values, const std::vector<int64_t>& shape,
                            const std::vector<int64_t>& offset, const std::vector<int64_t>& count) {
  std::vector<float> block;
  const size_t dims = shape.size();
  if (element_count(count) == 0) return block;
  std::vector<int64_t> index(dims, 0);  // position inside the block
  while (true) {
    int64_t flat = 0;
    for (size_t d = 0; d < dims; ++d) flat = flat * shape[d] + offset[d] + index[d];
    block.push_back(values[static_cast<size_t>(flat)]);
    size_t d = dims;
    while (d > 0 && ++index[d - 1] == count[d - 1]) index[--d] = 0;
    if (d == 0) break;
  }
  return block;
}

// [begin, end) of part `part` of n items split into `parts` nearly equal parts.
std::pair<int64_t, int64_t> part_range(int64_t n, int part, int parts) {
  return {n * part / parts, n * (part + 1) / parts};
}

void expect_same_bits(const std::vector<float>& expected, const std::vector<float>& actual,
                      const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  EXPECT_EQ(std::memcmp(expected.data(), actual.data(), expected.size() * sizeof(float)), 0)
      << what << " differs";
}

// Runs action on every rank, expecting a std::runtime_error whose message holds every fragment
// and is the same text on every rank. Returns the message.
std::string expect_same_error_on_every_rank(const std::function<void()>& action,
                                            const std::vector<std::string>& fragments) {
  std::string message;
  try {
    action();
    ADD_FAILURE() << "expected an exception mentioning '" << fragments.front() << "'";
  } catch (const std::runtime_error& error) {
    message = error.what();
  }
  for (const std::string& fragment : fragments) {
    EXPECT_NE(message.find(fragment), std::string::npos)
        << "message '" << message << "' lacks '" << fragment << "'";
  }
  EXPECT_EQ(message, broadcast_from_rank0(message)) << "the ranks raised different errors";
  return message;
}

// A tensor of the first test: its name, shape and the seed of its logical values.
struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  float seed;
};

TEST(CheckpointMpi, EveryRankWritesItsBlocksAndEveryRankReadsEverything) {
  const int rank = world_rank();
  const int ranks = world_size();
  const int64_t p = ranks;
  const fs::path dir = make_shared_test_dir();
  const std::string path = (dir / "step_00000010.h5").string();

  const TensorPlan rows{"model/rows", {2 * p + 3, 5}, 1.0f};
  const TensorPlan columns{"model/columns", {4, 3 * p + 1}, 2.0f};
  const TensorPlan cube{"optimizer/exp_avg/cube", {3, 4, 2 * p + 1}, 3.0f};
  const TensorPlan owned_by_last{"optimizer/exp_avg_sq/owned_by_last", {5, 3}, 4.0f};
  const TensorPlan owned_by_first{"optimizer/master/owned_by_first", {11}, 5.0f};
  const TensorPlan tiles{"model/tiles", {2 * p, 6}, 6.0f};
  const TensorPlan halo{"model/halo", {3 * p, 4}, 7.0f};
  const TensorPlan norm{"model/norm", {6}, 8.0f};
  const TensorPlan scalar{"optimizer/step_scale", {}, 9.0f};
  const TensorPlan empty{"model/empty", {0, 4}, 0.0f};
  const std::vector<const TensorPlan*> plans = {&rows, &columns, &cube, &owned_by_last,
                                                &owned_by_first, &tiles, &halo, &norm,
                                                &scalar, &empty};
  {
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    EXPECT_TRUE(writer.collective());
    EXPECT_EQ(writer.final_path(), path);

    // Row slabs, dim 0 (data parallel shards, column-parallel weights).
    writer.create_tensor(rows.name, rows.shape);
    const std::vector<float> rows_values = logical_values(rows.shape, rows.seed);
    const auto [row_begin, row_end] = part_range(rows.shape[0], rank, ranks);
    writer.write_rows(rows.name, row_begin, row_end - row_begin,
                      rows_values.data() + row_begin * rows.shape[1]);

    // Column blocks, dim 1 (row-parallel weights such as o_proj and down_proj under tp).
    writer.create_tensor(columns.name, columns.shape);
    const auto [column_begin, column_end] = part_range(columns.shape[1], rank, ranks);
    const std::vector<int64_t> column_offset = {0, column_begin};
    const std::vector<int64_t> column_count = {columns.shape[0], column_end - column_begin};
    writer.write_block(columns.name, column_offset, column_count,
                       block_of(logical_values(columns.shape, columns.seed), columns.shape,
                                column_offset, column_count)
                           .data());

    // Blocks along the last of three dimensions.
    writer.create_tensor(cube.name, cube.shape);
    const auto [depth_begin, depth_end] = part_range(cube.shape[2], rank, ranks);
    const std::vector<int64_t> cube_offset = {0, 0, depth_begin};
    const std::vector<int64_t> cube_count = {cube.shape[0], cube.shape[1], depth_end - depth_begin};
    writer.write_block(cube.name, cube_offset, cube_count,
                       block_of(logical_values(cube.shape, cube.seed), cube.shape, cube_offset,
                                cube_count)
                           .data());

    // ZeRO style: the owner writes the whole tensor, every other rank writes nothing.
    writer.create_tensor(owned_by_last.name, owned_by_last.shape);
    if (rank == ranks - 1) {
      writer.write_rows(owned_by_last.name, 0, owned_by_last.shape[0],
                        logical_values(owned_by_last.shape, owned_by_last.seed).data());
    } else {
      writer.write_rows(owned_by_last.name, 0, 0, nullptr);
    }
    writer.create_tensor(owned_by_first.name, owned_by_first.shape);
    if (rank == 0) {
      writer.write_block(owned_by_first.name, {0}, owned_by_first.shape,
                         logical_values(owned_by_first.shape, owned_by_first.seed).data());
    } else {
      writer.write_block(owned_by_first.name, {owned_by_first.shape[0]}, {0}, nullptr);
    }

    // Two writes per rank: its two rows, left half then right half.
    writer.create_tensor(tiles.name, tiles.shape);
    const std::vector<float> tiles_values = logical_values(tiles.shape, tiles.seed);
    for (const int64_t column : {int64_t{0}, int64_t{3}}) {
      const std::vector<int64_t> offset = {2 * rank, column};
      const std::vector<int64_t> count = {2, 3};
      writer.write_block(tiles.name, offset, count,
                         block_of(tiles_values, tiles.shape, offset, count).data());
    }

    // Overlapping writes of the same values: each rank also writes its neighbour's first row.
    writer.create_tensor(halo.name, halo.shape);
    const std::vector<float> halo_values = logical_values(halo.shape, halo.seed);
    const int64_t halo_begin = 3 * rank;
    const int64_t halo_rows = std::min<int64_t>(4, halo.shape[0] - halo_begin);
    writer.write_rows(halo.name, halo_begin, halo_rows,
                      halo_values.data() + halo_begin * halo.shape[1]);

    // Replicated tensors: rank 0's values are written, the others' are not read.
    const std::vector<float> not_rank0_values(6, -1000.0f - static_cast<float>(rank));
    writer.write_tensor(norm.name, norm.shape,
                        rank == 0 ? logical_values(norm.shape, norm.seed).data()
                                  : not_rank0_values.data());
    writer.write_tensor(scalar.name, scalar.shape,
                        rank == 0 ? logical_values(scalar.shape, scalar.seed).data() : nullptr);
    writer.write_tensor(empty.name, empty.shape, nullptr);

    writer.set_attribute("step", int64_t{10});
    writer.set_attribute("config_yaml", std::string("model:\n  path: /models/tiny\n"));
    writer.set_attribute("replaced", std::string("first"));
    writer.set_attribute("replaced", int64_t{2});
    EXPECT_TRUE(fs::exists(path + ".tmp"));
    EXPECT_FALSE(fs::exists(path));
    writer.commit();
    // Right after commit() returns, every rank sees the final file and no tmp file.
    EXPECT_TRUE(fs::exists(path));
    EXPECT_FALSE(fs::exists(path + ".tmp"));
    EXPECT_THROW(writer.commit(), std::runtime_error);  // already committed (a local check)
  }

  // Every rank reads the whole file back.
  const CheckpointReader reader = CheckpointReader::open(path);
  std::vector<std::string> expected_names;
  for (const TensorPlan* plan : plans) expected_names.push_back(plan->name);
  std::sort(expected_names.begin(), expected_names.end());
  EXPECT_EQ(reader.tensor_names(), expected_names);
  for (const TensorPlan* plan : plans) {
    EXPECT_EQ(reader.shape(plan->name), plan->shape) << plan->name;
    expect_same_bits(logical_values(plan->shape, plan->seed), reader.read_tensor(plan->name),
                     plan->name + " on rank " + std::to_string(rank));
  }
  EXPECT_EQ(reader.int_attribute("step"), 10);
  EXPECT_EQ(reader.string_attribute("config_yaml"), "model:\n  path: /models/tiny\n");
  EXPECT_EQ(reader.int_attribute("replaced"), 2);
  EXPECT_EQ(reader.string_attribute("format"), kCheckpointFormat);
  EXPECT_EQ(reader.int_attribute("complete"), 1);

  // Resharding: each rank reads another split than the one that wrote the tensor.
  const std::vector<float> rows_values = logical_values(rows.shape, rows.seed);
  const auto [column_begin, column_end] = part_range(rows.shape[1], rank, ranks);
  const std::vector<int64_t> offset = {0, column_begin};
  const std::vector<int64_t> count = {rows.shape[0], column_end - column_begin};
  std::vector<float> block(static_cast<size_t>(element_count(count)));
  reader.read_block(rows.name, offset, count, block.data());
  expect_same_bits(block_of(rows_values, rows.shape, offset, count), block, "rows read by columns");

  const std::vector<float> columns_values = logical_values(columns.shape, columns.seed);
  const auto [row_begin, row_end] = part_range(columns.shape[0], ranks - 1 - rank, ranks);
  std::vector<float> row_block(static_cast<size_t>((row_end - row_begin) * columns.shape[1]));
  reader.read_rows(columns.name, row_begin, row_end - row_begin, row_block.data());
  expect_same_bits(block_of(columns_values, columns.shape, {row_begin, 0},
                            {row_end - row_begin, columns.shape[1]}),
                   row_block, "columns read by rows");

  const std::vector<int64_t> tile_offset = {1, rank % 3, 1};
  const std::vector<int64_t> tile_count = {2, 1, 2 * p - 1};
  std::vector<float> tile(static_cast<size_t>(element_count(tile_count)));
  reader.read_block(cube.name, tile_offset, tile_count, tile.data());
  expect_same_bits(
      block_of(logical_values(cube.shape, cube.seed), cube.shape, tile_offset, tile_count), tile,
      "an inner block of the cube");
  float value = 0.0f;
  reader.read_block(scalar.name, {}, {}, &value);
  EXPECT_EQ(value, scalar.seed);
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(CheckpointMpi, FileReadSeriallyEqualsTheLogicalTensors) {
  const int rank = world_rank();
  const int ranks = world_size();
  const fs::path dir = make_shared_test_dir();
  const std::string collective_path = (dir / "collective.h5").string();
  const std::string serial_path = (dir / "serial.h5").string();
  const std::vector<int64_t> matrix_shape = {3 * ranks + 1, 7};
  const std::vector<int64_t> wide_shape = {5, 4 * ranks + 3};
  const std::vector<float> matrix = logical_values(matrix_shape, -2.0f);
  const std::vector<float> wide = logical_values(wide_shape, 12.0f);
  {
    CheckpointWriter writer(collective_path, MPI_COMM_WORLD);
    writer.create_tensor("model/matrix", matrix_shape);
    const auto [row_begin, row_end] = part_range(matrix_shape[0], rank, ranks);
    writer.write_rows("model/matrix", row_begin, row_end - row_begin,
                      matrix.data() + row_begin * matrix_shape[1]);
    writer.create_tensor("model/wide", wide_shape);
    const auto [column_begin, column_end] = part_range(wide_shape[1], rank, ranks);
    const std::vector<int64_t> offset = {0, column_begin};
    const std::vector<int64_t> count = {wide_shape[0], column_end - column_begin};
    writer.write_block("model/wide", offset, count,
                       block_of(wide, wide_shape, offset, count).data());
    writer.set_attribute("step", int64_t{3});
    writer.commit();
  }
  if (rank == 0) {
    // One process alone, as `freqkv export` or a one-rank resume would read it.
    CheckpointWriter serial(serial_path);
    EXPECT_FALSE(serial.collective());
    serial.write_tensor("model/matrix", matrix_shape, matrix.data());
    serial.write_tensor("model/wide", wide_shape, wide.data());
    serial.set_attribute("step", int64_t{3});
    serial.commit();

    const CheckpointReader collective = CheckpointReader::open(collective_path);
    const CheckpointReader reference = CheckpointReader::open(serial_path);
    expect_same_bits(matrix, collective.read_tensor("model/matrix"), "matrix");
    expect_same_bits(wide, collective.read_tensor("model/wide"), "wide");
    EXPECT_EQ(collective.tensor_names(), reference.tensor_names());
    for (const std::string& name : reference.tensor_names()) {
      EXPECT_EQ(collective.shape(name), reference.shape(name)) << name;
      expect_same_bits(reference.read_tensor(name), collective.read_tensor(name), name);
    }
    EXPECT_EQ(collective.int_attribute("step"), 3);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(CheckpointMpi, RegionNoRankWroteFailsCommitOnEveryRank) {
  const int rank = world_rank();
  const int ranks = world_size();
  const int64_t p = ranks;
  const fs::path dir = make_shared_test_dir();
  const std::string path = (dir / "holes.h5").string();
  {
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    writer.create_tensor("model/complete", {4, 4});
    const std::vector<float> complete = logical_values({4, 4}, 1.0f);
    const auto [row_begin, row_end] = part_range(4, rank, ranks);
    writer.write_rows("model/complete", row_begin, row_end - row_begin,
                      complete.data() + row_begin * 4);
    // Each rank writes its two columns, but the last rank only rows [0, 3) of them.
    writer.create_tensor("model/holes", {4, 2 * p});
    const int64_t rows_written = rank == ranks - 1 ? 3 : 4;
    writer.write_block("model/holes", {0, 2 * rank}, {rows_written, 2},
                       std::vector<float>(static_cast<size_t>(rows_written * 2), 0.5f).data());
    // Every rank writes elements [0, 2): 2p >= 4 elements written in all, yet [2, 4) never.
    writer.create_tensor("model/overlap_gap", {4});
    writer.write_rows("model/overlap_gap", 0, 2, std::vector<float>{1.0f, 2.0f}.data());

    expect_same_error_on_every_rank(
        [&] { writer.commit(); },
        {"cannot commit checkpoint '" + path + "'", "tensor 'model/holes' of shape [4, " +
             std::to_string(2 * p) + "]",
         "never written by any of the " + std::to_string(p) + " ranks",
         "block at offset [3, " + std::to_string(2 * p - 2) + "] of count [1, 2]",
         "and 1 more incomplete tensor"});
    EXPECT_FALSE(fs::exists(path));
    EXPECT_FALSE(fs::exists(path + ".tmp"));
    // The error ended the writer on every rank.
    EXPECT_THROW(writer.create_tensor("model/late", {1}), std::runtime_error);
  }
  {
    // Overlapping writes are counted once: a sum of the ranks' counts would miss this gap.
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    writer.create_tensor("model/overlap_gap", {4});
    writer.write_rows("model/overlap_gap", 0, 2, std::vector<float>{1.0f, 2.0f}.data());
    expect_same_error_on_every_rank(
        [&] { writer.commit(); },
        {"tensor 'model/overlap_gap' of shape [4]", "has rows never written by any of the " +
             std::to_string(p) + " ranks: [2, 4)"});
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(CheckpointMpi, DifferentCallsOnDifferentRanksFailEverywhereInsteadOfHanging) {
  const int rank = world_rank();
  const int ranks = world_size();
  const fs::path dir = make_shared_test_dir();
  const std::string path = (dir / "mismatch.h5").string();
  const std::string last = std::to_string(ranks - 1);
  // How the message names ranks 0 .. ranks - 2.
  const std::string others =
      ranks == 2 ? "rank 0: " : "ranks 0-" + std::to_string(ranks - 2) + ": ";

  {  // Shapes differ.
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    writer.create_tensor("model/agreed", {2});
    const std::vector<int64_t> shape =
        rank == ranks - 1 ? std::vector<int64_t>{4, 2} : std::vector<int64_t>{4, 3};
    expect_same_error_on_every_rank(
        [&] { writer.create_tensor("model/w", shape); },
        {"checkpoint '" + path + "'", "different calls",
         others + "create_tensor('model/w', [4, 3])",
         "rank " + last + ": create_tensor('model/w', [4, 2])", "same order"});
    EXPECT_THROW(writer.write_rows("model/agreed", 0, 0, nullptr), std::runtime_error);
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  {  // Names differ.
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    expect_same_error_on_every_rank(
        [&] { writer.create_tensor(rank == 0 ? "model/a" : "model/b", {3}); },
        {"rank 0: create_tensor('model/a', [3])", "create_tensor('model/b', [3])"});
  }
  {  // Different calls altogether: one rank sets an attribute while the others write.
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    writer.create_tensor("model/v", {3});
    expect_same_error_on_every_rank(
        [&] {
          if (rank == ranks - 1) {
            writer.set_attribute("step", int64_t{5});
          } else {
            writer.write_rows("model/v", 0, 3, std::vector<float>{1, 2, 3}.data());
          }
        },
        {others + "a write of tensor 'model/v'", "rank " + last + ": set_attribute('step', 5)"});
  }
  {  // Attribute values differ.
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    expect_same_error_on_every_rank(
        [&] { writer.set_attribute("step", int64_t{rank == 0 ? 7 : 8}); },
        {"rank 0: set_attribute('step', 7)", "set_attribute('step', 8)"});
  }
  {  // One rank commits early.
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    expect_same_error_on_every_rank(
        [&] {
          if (rank == 0) {
            writer.commit();
          } else {
            writer.create_tensor("model/late", {1});
          }
        },
        {"rank 0: commit()", "create_tensor('model/late', [1])"});
  }
  {  // Same call, but one rank's block lies outside the tensor: its error, on every rank.
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    writer.create_tensor("model/w", {4, 3});
    const std::vector<int64_t> offset = {0, rank == ranks - 1 ? 2 : 0};
    expect_same_error_on_every_rank(
        [&] {
          writer.write_block("model/w", offset, {4, 2}, std::vector<float>(8, 1.0f).data());
        },
        {"tensor 'model/w' of shape [4, 3]", "block at offset [0, 2] of count [4, 2]",
         "not within the tensor", "raised on rank " + last + " of " + std::to_string(ranks)});
  }
  // Paths differ: the constructor fails on every rank, and creates nothing.
  const std::string own_path = (dir / ("rank" + std::to_string(rank) + ".h5")).string();
  expect_same_error_on_every_rank([&] { CheckpointWriter writer(own_path, MPI_COMM_WORLD); },
                                  {"different calls", "rank 0: CheckpointWriter('"});
  EXPECT_FALSE(fs::exists(own_path + ".tmp"));
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(CheckpointMpi, UncommittedWriterLeavesNoFileAndKeepsThePreviousOne) {
  const int rank = world_rank();
  const fs::path dir = make_shared_test_dir();
  const std::string path = (dir / "step.h5").string();
  const std::vector<float> first = logical_values({8}, 1.0f);
  {
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    writer.write_tensor("model/w", {8}, first.data());
    writer.commit();
  }
  {  // Every rank leaves the scope without committing.
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    writer.write_tensor("model/w", {8}, logical_values({8}, -5.0f).data());
    EXPECT_TRUE(fs::exists(path + ".tmp"));
  }
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  expect_same_bits(first, CheckpointReader::open(path).read_tensor("model/w"), "previous file");

  // Every rank unwinds an exception the writer did not raise: no collective close (the handles
  // are left to HDF5 until MPI finalises), but rank 0 still removes the tmp file.
  try {
    CheckpointWriter writer(path, MPI_COMM_WORLD);
    writer.write_tensor("model/w", {8}, logical_values({8}, -7.0f).data());
    throw std::logic_error("the training step failed on rank " + std::to_string(rank));
  } catch (const std::logic_error&) {
  }
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  expect_same_bits(first, CheckpointReader::open(path).read_tensor("model/w"), "previous file");
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(CheckpointMpi, SubCommunicatorsAndOneRankCommunicators) {
  const int rank = world_rank();
  const int ranks = world_size();
  const fs::path dir = make_shared_test_dir();

  // A one-rank communicator is a serial writer: each rank writes its own file.
  const std::string own_path = (dir / ("self_" + std::to_string(rank) + ".h5")).string();
  {
    CheckpointWriter writer(own_path, MPI_COMM_SELF);
    EXPECT_FALSE(writer.collective());
    writer.write_tensor("model/w", {3}, logical_values({3}, static_cast<float>(rank)).data());
    writer.commit();
  }
  expect_same_bits(logical_values({3}, static_cast<float>(rank)),
                   CheckpointReader::open(own_path).read_tensor("model/w"), "own file");

  // Two groups (even and odd ranks), each writing its own file together.
  MPI_Comm half = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, rank % 2, rank, &half);
  int half_rank = 0;
  int half_size = 1;
  MPI_Comm_rank(half, &half_rank);
  MPI_Comm_size(half, &half_size);
  const std::vector<int64_t> shape = {6, 4};
  const auto half_path = [&](int color) {
    return (dir / ("half_" + std::to_string(color) + ".h5")).string();
  };
  {
    CheckpointWriter writer(half_path(rank % 2), half);
    EXPECT_EQ(writer.collective(), half_size > 1);
    const std::vector<float> values = logical_values(shape, 10.0f * static_cast<float>(rank % 2));
    writer.create_tensor("model/w", shape);
    const auto [begin, end] = part_range(shape[0], half_rank, half_size);
    writer.write_rows("model/w", begin, end - begin, values.data() + begin * shape[1]);
    writer.commit();
  }
  MPI_Comm_free(&half);
  MPI_Barrier(MPI_COMM_WORLD);
  for (int color = 0; color < std::min(ranks, 2); ++color) {
    expect_same_bits(logical_values(shape, 10.0f * static_cast<float>(color)),
                     CheckpointReader::open(half_path(color)).read_tensor("model/w"),
                     "file of group " + std::to_string(color));
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace freqkv
