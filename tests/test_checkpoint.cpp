// Checkpoint files (CheckpointWriter / CheckpointReader), serially, and the checkpoint directory
// (CheckpointDir): round trips whole, in row slabs and in blocks, attributes, atomic commit, and
// every kind of file that must be refused (missing, not HDF5, foreign HDF5, truncated,
// unfinished). Collective writing over MPI ranks is in test_checkpoint_mpi.cpp.
#include "tests/test_support.h"
#include "trainer/checkpoint_dir.h"
#include "trainer/checkpoint_file.h"

#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace freqkv {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, under gtest's temp dir.
fs::path make_test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("freqkv_checkpoint_" + std::string(info->test_suite_name()) + "_" +
                        info->name() + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Runs action, expecting std::runtime_error whose message contains every fragment.
// Distinct, non-integer values (with negatives and a denormal) so a misplaced row shows.
std::vector<float> test_values(size_t count, float seed) {
  std::vector<float> values(count);
  for (size_t i = 0; i < count; ++i) {
    values[i] = seed + 0.37f * static_cast<float>(i) * (i % 2 ? -1.0f : 1.0f);
  }
  if (count > 2) values[2] = 1e-41f;
  return values;
}

void expect_same_bits(const std::vector<float>& expected, const std::vector<float>& actual,
                      const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  EXPECT_EQ(std::memcmp(expected.data(), actual.data(), expected.size() * sizeof(float)), 0)
      << what << " differs";
}

// A committed checkpoint with one tensor of n floats, for tests about whole files.
void write_small_checkpoint(const std::string& path, size_t n = 64, float seed = 1.0f) {
  CheckpointWriter writer(path);
  writer.write_tensor("model/w", {static_cast<int64_t>(n)}, test_values(n, seed).data());
  writer.set_attribute("step", int64_t{7});
  writer.commit();
}

// An HDF5 file made with the raw API, with the root attributes a caller chooses, to stand for
// files written by other programs (or by a freqkv that crashed before its commit marker).
struct RawRootAttributes {
  const char* format = nullptr;  // written as a variable-length string, as h5py does
  bool with_version = false;
  int64_t version = 0;
  bool with_complete = false;
};

void write_raw_hdf5(const std::string& path, const RawRootAttributes& attributes) {
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  const hsize_t dims[1] = {4};
  const hid_t space = H5Screate_simple(1, dims, nullptr);
  const hid_t dataset = H5Dcreate2(file, "weights", H5T_IEEE_F32LE, space, H5P_DEFAULT,
                                   H5P_DEFAULT, H5P_DEFAULT);
  const float values[4] = {1, 2, 3, 4};
  EXPECT_GE(H5Dwrite(dataset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values), 0);
  H5Dclose(dataset);
  H5Sclose(space);

  const hid_t scalar = H5Screate(H5S_SCALAR);
  if (attributes.format != nullptr) {
    const hid_t string_type = H5Tcopy(H5T_C_S1);
    H5Tset_size(string_type, H5T_VARIABLE);
    const hid_t attribute = H5Acreate2(file, "format", string_type, scalar, H5P_DEFAULT, H5P_DEFAULT);
    EXPECT_GE(H5Awrite(attribute, string_type, &attributes.format), 0);
    H5Aclose(attribute);
    H5Tclose(string_type);
  }
  const auto write_int = [&](const char* key, int64_t value) {
    const hid_t attribute = H5Acreate2(file, key, H5T_STD_I64LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
    EXPECT_GE(H5Awrite(attribute, H5T_NATIVE_INT64, &value), 0);
    H5Aclose(attribute);
  };
  if (attributes.with_version) write_int("format_version", attributes.version);
  if (attributes.with_complete) write_int("complete", 1);
  H5Sclose(scalar);
  ASSERT_GE(H5Fclose(file), 0);
}

TEST(CheckpointFile, TensorsWrittenWholeRoundTrip) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "whole.h5").string();
  struct Case {
    std::string name;
    std::vector<int64_t> shape;
    size_t count;
  };
  const std::vector<Case> cases = {
      {"model/model.layers.0.self_attn.q_proj.weight", {3, 5}, 15},
      {"model/model.norm.weight", {7}, 7},
      {"optimizer/exp_avg/model.norm.weight", {7}, 7},
      {"optimizer/exp_avg_sq/model.layers.0.mlp.up_proj.weight", {2, 3, 4}, 24},
      {"optimizer/step_scale", {}, 1},
      {"a/b/c/d/deep", {1, 1, 1, 2}, 2},
      {"empty_rows", {0, 4}, 0},
      {"top_level", {4}, 4},
  };
  {
    CheckpointWriter writer(path);
    float seed = 0.5f;
    for (const Case& c : cases) writer.write_tensor(c.name, c.shape, test_values(c.count, seed += 1).data());
    writer.commit();
  }
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  const CheckpointReader reader = CheckpointReader::open(path);
  EXPECT_EQ(reader.path(), path);
  float seed = 0.5f;
  for (const Case& c : cases) {
    EXPECT_TRUE(reader.has_tensor(c.name)) << c.name;
    EXPECT_EQ(reader.shape(c.name), c.shape) << c.name;
    expect_same_bits(test_values(c.count, seed += 1), reader.read_tensor(c.name), c.name);
  }

  EXPECT_EQ(reader.tensor_names(),
            (std::vector<std::string>{"a/b/c/d/deep", "empty_rows",
                                      "model/model.layers.0.self_attn.q_proj.weight",
                                      "model/model.norm.weight",
                                      "optimizer/exp_avg/model.norm.weight",
                                      "optimizer/exp_avg_sq/model.layers.0.mlp.up_proj.weight",
                                      "optimizer/step_scale", "top_level"}));
  EXPECT_EQ(reader.tensor_names("optimizer"),
            (std::vector<std::string>{"optimizer/exp_avg/model.norm.weight",
                                      "optimizer/exp_avg_sq/model.layers.0.mlp.up_proj.weight",
                                      "optimizer/step_scale"}));
  EXPECT_EQ(reader.tensor_names("optimizer/exp_avg"),
            (std::vector<std::string>{"optimizer/exp_avg/model.norm.weight"}));
  EXPECT_TRUE(reader.tensor_names("lora").empty());
  EXPECT_FALSE(reader.has_tensor("optimizer"));         // a group
  EXPECT_FALSE(reader.has_tensor("optimizer/exp_avg"));  // a group
  EXPECT_FALSE(reader.has_tensor("model/missing.weight"));
  EXPECT_FALSE(reader.has_tensor("nowhere/at/all"));
}

TEST(CheckpointFile, TensorsWrittenInRowSlabsRoundTrip) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "slabs.h5").string();
  const std::vector<float> matrix = test_values(10 * 6, 3.0f);    // [10, 6]
  const std::vector<float> vector = test_values(9, -2.0f);        // [9]
  const std::vector<float> cube = test_values(5 * 2 * 3, 11.0f);  // [5, 2, 3]
  {
    CheckpointWriter writer(path);
    writer.create_tensor("model/matrix", {10, 6});
    writer.create_tensor("model/vector", {9});
    writer.create_tensor("optimizer/cube", {5, 2, 3});
    // Out of order, overlapping, and an empty slab (as a rank without rows would write).
    writer.write_rows("model/matrix", 7, 3, matrix.data() + 7 * 6);
    writer.write_rows("model/matrix", 0, 4, matrix.data());
    writer.write_rows("model/matrix", 3, 4, matrix.data() + 3 * 6);
    writer.write_rows("model/matrix", 10, 0, nullptr);
    // A 1-D tensor's rows are its elements.
    writer.write_rows("model/vector", 5, 4, vector.data() + 5);
    writer.write_rows("model/vector", 0, 5, vector.data());
    for (int64_t row = 4; row >= 0; --row) {
      writer.write_rows("optimizer/cube", row, 1, cube.data() + row * 6);
    }
    writer.commit();
  }

  const CheckpointReader reader = CheckpointReader::open(path);
  expect_same_bits(matrix, reader.read_tensor("model/matrix"), "matrix");
  expect_same_bits(vector, reader.read_tensor("model/vector"), "vector");
  expect_same_bits(cube, reader.read_tensor("optimizer/cube"), "cube");

  std::vector<float> rows(3 * 6);
  reader.read_rows("model/matrix", 2, 3, rows.data());
  expect_same_bits(std::vector<float>(matrix.begin() + 2 * 6, matrix.begin() + 5 * 6), rows,
                   "matrix rows [2, 5)");
  std::vector<float> elements(4);
  reader.read_rows("model/vector", 3, 4, elements.data());
  expect_same_bits(std::vector<float>(vector.begin() + 3, vector.begin() + 7), elements,
                   "vector elements [3, 7)");
  std::vector<float> last_row(6);
  reader.read_rows("optimizer/cube", 4, 1, last_row.data());
  expect_same_bits(std::vector<float>(cube.begin() + 4 * 6, cube.end()), last_row, "cube row 4");
  reader.read_rows("model/matrix", 10, 0, nullptr);  // nothing to read is fine
}

TEST(CheckpointFile, TensorsWrittenAndReadInBlocksRoundTrip) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "blocks.h5").string();
  const std::vector<float> matrix = test_values(4 * 7, 2.0f);        // [4, 7]
  const std::vector<float> cube = test_values(3 * 4 * 5, -6.0f);     // [3, 4, 5]
  // The block of a row-major [rows, columns] matrix at (row, column) of (n_rows, n_columns).
  const auto matrix_block = [&](int64_t row, int64_t column, int64_t n_rows, int64_t n_columns) {
    std::vector<float> block;
    for (int64_t r = row; r < row + n_rows; ++r) {
      for (int64_t c = column; c < column + n_columns; ++c) block.push_back(matrix[r * 7 + c]);
    }
    return block;
  };
  std::vector<float> cube_block;  // [1, 2, 3] at [1, 1, 2]
  for (int64_t j = 1; j < 3; ++j) {
    for (int64_t k = 2; k < 5; ++k) cube_block.push_back(cube[(1 * 4 + j) * 5 + k]);
  }
  {
    // A null MPI communicator makes a serial writer (no MPI needed).
    CheckpointWriter writer(path, MPI_COMM_NULL);
    EXPECT_FALSE(writer.collective());
    writer.create_tensor("model/matrix", {4, 7});
    // Column blocks, as tensor parallelism splits row-parallel weights, then one overlap.
    writer.write_block("model/matrix", {0, 0}, {4, 3}, matrix_block(0, 0, 4, 3).data());
    writer.write_block("model/matrix", {0, 5}, {4, 2}, matrix_block(0, 5, 4, 2).data());
    writer.write_block("model/matrix", {0, 2}, {4, 3}, matrix_block(0, 2, 4, 3).data());
    writer.write_block("model/matrix", {1, 7}, {3, 0}, nullptr);  // empty: nothing
    writer.create_tensor("optimizer/cube", {3, 4, 5});
    writer.write_block("optimizer/cube", {0, 0, 0}, {3, 4, 5}, cube.data());
    writer.create_tensor("optimizer/scale", {});
    const float scale = 0.25f;
    writer.write_block("optimizer/scale", {}, {}, &scale);
    writer.commit();
  }
  const CheckpointReader reader = CheckpointReader::open(path);
  expect_same_bits(matrix, reader.read_tensor("model/matrix"), "matrix");
  expect_same_bits(cube, reader.read_tensor("optimizer/cube"), "cube");
  EXPECT_EQ(reader.read_tensor("optimizer/scale"), std::vector<float>{0.25f});

  std::vector<float> block(2 * 4);
  reader.read_block("model/matrix", {1, 3}, {2, 4}, block.data());
  expect_same_bits(matrix_block(1, 3, 2, 4), block, "matrix block at [1, 3] of [2, 4]");
  std::vector<float> inner(cube_block.size());
  reader.read_block("optimizer/cube", {1, 1, 2}, {1, 2, 3}, inner.data());
  expect_same_bits(cube_block, inner, "cube block at [1, 1, 2] of [1, 2, 3]");
  float value = 0.0f;
  reader.read_block("optimizer/scale", {}, {}, &value);
  EXPECT_EQ(value, 0.25f);
  reader.read_block("model/matrix", {4, 0}, {0, 7}, nullptr);  // nothing to read is fine

  expect_error([&] { reader.read_block("model/matrix", {0}, {4}, block.data()); },
               {path, "'model/matrix'", "[4, 7]", "has 1 and 1 dimensions, the tensor has 2"});
  expect_error([&] { reader.read_block("model/matrix", {2, 5}, {2, 3}, block.data()); },
               {"'model/matrix'", "block at offset [2, 5] of count [2, 3]", "not within",
                "dimension 1"});
  expect_error([&] { reader.read_block("model/matrix", {0, 0}, {1, 1}, nullptr); },
               {"'model/matrix'", "null data"});
}

TEST(CheckpointFile, BlocksNeverWrittenAreNamedAtCommit) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "gaps.h5").string();
  CheckpointWriter writer(path);
  writer.create_tensor("model/w", {4, 6});
  const std::vector<float> values = test_values(4 * 6, 1.0f);
  // Columns [0, 3) of every row, and columns [3, 6) of rows 0 and 1: [2, 4) x [3, 6) is missing.
  writer.write_block("model/w", {0, 0}, {4, 3}, values.data());
  writer.write_block("model/w", {0, 3}, {2, 3}, values.data());
  expect_error([&] { writer.write_block("model/w", {0, 4}, {1, 3}, values.data()); },
               {"'model/w'", "[4, 6]", "block at offset [0, 4] of count [1, 3]", "not within"});
  expect_error([&] { writer.write_block("model/w", {0, -1}, {1, 1}, values.data()); },
               {"block at offset [0, -1]", "not within"});
  expect_error([&] { writer.write_block("model/w", {0, 0, 0}, {1, 1, 1}, values.data()); },
               {"'model/w'", "has 3 and 3 dimensions, the tensor has 2"});
  expect_error([&] { writer.write_block("model/w", {0, 0}, {1, 1}, nullptr); }, {"null data"});
  expect_error([&] { writer.write_block("model/none", {0}, {1}, values.data()); },
               {"'model/none'", "no such tensor"});
  expect_error([&] { writer.commit(); },
               {"cannot commit", path, "'model/w'", "[4, 6]", "elements never written",
                "block at offset [2, 3] of count [2, 3]"});
  EXPECT_FALSE(fs::exists(path));
  // A scalar created but never written.
  writer.create_tensor("model/scalar", {});
  writer.write_block("model/w", {2, 3}, {2, 3}, values.data());
  expect_error([&] { writer.commit(); }, {"'model/scalar'", "[]", "was never written"});
  writer.write_tensor("model/other_scalar", {}, values.data());
  const float scalar = 3.0f;
  writer.write_block("model/scalar", {}, {}, &scalar);
  writer.commit();
  EXPECT_EQ(CheckpointReader::open(path).read_tensor("model/scalar"), std::vector<float>{3.0f});
}

TEST(CheckpointFile, AttributesRoundTrip) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "attributes.h5").string();
  const std::string unicode = "r\xc3\xa9sum\xc3\xa9 \xe2\x86\x92 ok";
  {
    CheckpointWriter writer(path);
    writer.set_attribute("model_name", std::string("llama-7b"));
    writer.set_attribute("empty", std::string());
    writer.set_attribute("unicode", unicode);
    writer.set_attribute("step", int64_t{1000});
    writer.set_attribute("negative", int64_t{-5});
    writer.set_attribute("largest", std::numeric_limits<int64_t>::max());
    writer.set_attribute("smallest", std::numeric_limits<int64_t>::min());
    writer.set_attribute("replaced", std::string("first"));
    writer.set_attribute("replaced", int64_t{2});  // a key set again takes the new value and kind
    writer.commit();
  }
  const CheckpointReader reader = CheckpointReader::open(path);
  EXPECT_EQ(reader.string_attribute("model_name"), "llama-7b");
  EXPECT_EQ(reader.string_attribute("empty"), "");
  EXPECT_EQ(reader.string_attribute("unicode"), unicode);
  EXPECT_EQ(reader.int_attribute("step"), 1000);
  EXPECT_EQ(reader.int_attribute("negative"), -5);
  EXPECT_EQ(reader.int_attribute("largest"), std::numeric_limits<int64_t>::max());
  EXPECT_EQ(reader.int_attribute("smallest"), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(reader.int_attribute("replaced"), 2);
  EXPECT_EQ(reader.string_attribute("format"), kCheckpointFormat);
  EXPECT_EQ(reader.int_attribute("format_version"), kCheckpointFormatVersion);
  EXPECT_EQ(reader.int_attribute("complete"), 1);
  EXPECT_TRUE(reader.has_attribute("step"));
  EXPECT_FALSE(reader.has_attribute("learning_rate"));

  expect_error([&] { reader.int_attribute("model_name"); },
               {"attribute 'model_name'", path, "a string, not an integer"});
  expect_error([&] { reader.string_attribute("step"); },
               {"attribute 'step'", path, "an integer, not a string"});
  expect_error([&] { reader.int_attribute("learning_rate"); },
               {path, "no attribute 'learning_rate'"});
}

TEST(CheckpointFile, WriterRejectsMisuse) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "misuse.h5").string();
  CheckpointWriter writer(path);
  writer.create_tensor("model/w", {4, 3});
  writer.write_tensor("model/scalar", {}, std::vector<float>{2.5f}.data());
  const std::vector<float> rows = test_values(4 * 3, 0.0f);

  expect_error([&] { writer.create_tensor("model/w", {4, 3}); }, {path, "'model/w'", "twice"});
  expect_error([&] { writer.create_tensor("model/bad", {4, -1}); },
               {"'model/bad'", "negative dimension", "[4, -1]"});
  for (const std::string bad : {"", "/model/x", "model//x", "model/x/", "model/./x", "../x"}) {
    expect_error([&] { writer.create_tensor(bad, {1}); }, {"invalid tensor name '" + bad + "'"});
  }
  expect_error([&] { writer.create_tensor("model/w/inner", {1}); },
               {"'model/w/inner'", "'model/w' is already a tensor"});
  expect_error([&] { writer.create_tensor("model", {1}); }, {"'model'", "already a group"});
  expect_error([&] { writer.write_rows("model/v", 0, 1, rows.data()); },
               {path, "'model/v'", "no such tensor"});
  expect_error([&] { writer.write_rows("model/w", 2, 3, rows.data()); },
               {"'model/w'", "[4, 3]", "3 rows at row offset 2", "its 4 rows"});
  expect_error([&] { writer.write_rows("model/w", -1, 1, rows.data()); }, {"row offset -1"});
  expect_error([&] { writer.write_rows("model/w", 0, 1, nullptr); }, {"'model/w'", "null data"});
  expect_error([&] { writer.write_rows("model/scalar", 0, 1, rows.data()); },
               {"'model/scalar'", "scalar"});
  for (const char* reserved : {"format", "format_version", "complete", ""}) {
    expect_error([&] { writer.set_attribute(reserved, int64_t{1}); }, {"reserved"});
    expect_error([&] { writer.set_attribute(reserved, std::string("x")); }, {"reserved"});
  }
  expect_error([&] { writer.set_attribute("note", std::string("a\0b", 3)); }, {"'note'", "NUL"});

  // A tensor with rows never written is not published; writing them makes the commit succeed.
  writer.write_rows("model/w", 0, 1, rows.data());
  writer.write_rows("model/w", 2, 1, rows.data() + 2 * 3);
  expect_error([&] { writer.commit(); },
               {"cannot commit", path, "'model/w'", "[4, 3]", "never written", "[1, 2)", "[3, 4)"});
  EXPECT_FALSE(fs::exists(path));
  writer.write_rows("model/w", 1, 1, rows.data() + 3);
  writer.write_rows("model/w", 3, 1, rows.data() + 3 * 3);
  writer.commit();
  EXPECT_TRUE(fs::exists(path));
  expect_error([&] { writer.create_tensor("model/late", {1}); }, {path, "already committed"});
  expect_error([&] { writer.commit(); }, {path, "already committed"});

  const CheckpointReader reader = CheckpointReader::open(path);
  expect_same_bits(rows, reader.read_tensor("model/w"), "model/w");
  EXPECT_EQ(reader.read_tensor("model/scalar"), std::vector<float>{2.5f});
}

TEST(CheckpointFile, ReaderRejectsBadRequests) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "requests.h5").string();
  write_small_checkpoint(path, 8);
  const CheckpointReader reader = CheckpointReader::open(path);
  std::vector<float> out(16);
  expect_error([&] { reader.read_tensor("model/missing"); }, {path, "no tensor 'model/missing'"});
  expect_error([&] { reader.shape("elsewhere/x"); }, {path, "no tensor 'elsewhere/x'"});
  expect_error([&] { reader.read_tensor("model"); }, {path, "'model'", "a group, not a tensor"});
  expect_error([&] { reader.read_rows("model/w", 6, 3, out.data()); },
               {path, "'model/w'", "[8]", "3 rows at row offset 6"});
  expect_error([&] { reader.tensor_names("model/w"); }, {path, "'model/w' is a tensor"});
  expect_error([&] { reader.has_tensor("model//w"); }, {"invalid tensor name 'model//w'"});
}

TEST(CheckpointFile, UncommittedWriterLeavesNoFile) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "step.h5").string();
  {
    CheckpointWriter writer(path);
    writer.write_tensor("model/w", {3}, test_values(3, 1.0f).data());
    EXPECT_TRUE(fs::exists(path + ".tmp"));
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  // An abandoned rewrite leaves the previous file as it was.
  write_small_checkpoint(path, 16, 5.0f);
  {
    CheckpointWriter writer(path);
    writer.write_tensor("model/w", {16}, test_values(16, -9.0f).data());
  }
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  expect_same_bits(test_values(16, 5.0f), CheckpointReader::open(path).read_tensor("model/w"),
                   "previous checkpoint");

  // Assigning over an uncommitted writer abandons it too.
  const std::string other_path = (dir / "other.h5").string();
  CheckpointWriter writer(other_path);
  writer = CheckpointWriter((dir / "third.h5").string());
  EXPECT_FALSE(fs::exists(other_path + ".tmp"));
  EXPECT_TRUE(fs::exists(dir / "third.h5.tmp"));
}

TEST(CheckpointFile, CommitReplacesAnExistingFile) {
  const fs::path dir = make_test_dir();
  const std::string path = (dir / "nested" / "run" / "step.h5").string();  // parents are created
  write_small_checkpoint(path, 32, 1.0f);
  write_small_checkpoint(path, 48, 2.0f);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const CheckpointReader reader = CheckpointReader::open(path);
  EXPECT_EQ(reader.shape("model/w"), std::vector<int64_t>{48});
  expect_same_bits(test_values(48, 2.0f), reader.read_tensor("model/w"), "second write");
  EXPECT_EQ(reader.int_attribute("step"), 7);
}

TEST(CheckpointFile, TruncatedFileIsRejected) {
  const fs::path dir = make_test_dir();
  const std::string good_path = (dir / "good.h5").string();
  write_small_checkpoint(good_path, 1 << 14);
  const std::string bytes = read_bytes(good_path);
  const std::string truncated_path = (dir / "truncated.h5").string();
  write_bytes(truncated_path, bytes.substr(0, bytes.size() / 2));
  expect_error([&] { CheckpointReader::open(truncated_path); },
               {"'" + truncated_path + "'", "truncated or corrupt"});
  CheckpointReader::open(good_path);  // the original is fine
}

TEST(CheckpointFile, NonHdf5FilesAreRejected) {
  const fs::path dir = make_test_dir();
  const std::string text_path = (dir / "notes.h5").string();
  write_bytes(text_path, "step 100: loss 2.31\n");
  expect_error([&] { CheckpointReader::open(text_path); },
               {"'" + text_path + "'", "not a freqkv checkpoint", "not an HDF5 file"});
  const std::string empty_path = (dir / "empty.h5").string();
  write_bytes(empty_path, "");
  expect_error([&] { CheckpointReader::open(empty_path); }, {"'" + empty_path + "'"});
  const std::string missing_path = (dir / "missing.h5").string();
  expect_error([&] { CheckpointReader::open(missing_path); },
               {"'" + missing_path + "'", "does not exist"});
  expect_error([&] { CheckpointReader::open(dir.string()); },
               {"'" + dir.string() + "'", "not a regular file"});
}

TEST(CheckpointFile, ForeignAndUnfinishedHdf5FilesAreRejected) {
  const fs::path dir = make_test_dir();
  const std::string plain = (dir / "plain.h5").string();
  write_raw_hdf5(plain, {});
  expect_error([&] { CheckpointReader::open(plain); },
               {"'" + plain + "'", "not a freqkv checkpoint (no 'format' attribute)",
                "another program"});

  const std::string other_format = (dir / "other_format.h5").string();
  write_raw_hdf5(other_format, {"keras-weights", true, 1, true});
  expect_error([&] { CheckpointReader::open(other_format); },
               {"'" + other_format + "'", "not a freqkv checkpoint", "'keras-weights'"});

  const std::string newer = (dir / "newer.h5").string();
  write_raw_hdf5(newer, {kCheckpointFormat, true, 2, true});
  expect_error([&] { CheckpointReader::open(newer); },
               {"'" + newer + "'", "format_version 2", "reads only version 1"});

  const std::string no_version = (dir / "no_version.h5").string();
  write_raw_hdf5(no_version, {kCheckpointFormat, false, 0, true});
  expect_error([&] { CheckpointReader::open(no_version); },
               {"'" + no_version + "'", "no 'format_version'"});

  const std::string unfinished = (dir / "unfinished.h5").string();
  write_raw_hdf5(unfinished, {kCheckpointFormat, true, 1, false});
  expect_error([&] { CheckpointReader::open(unfinished); },
               {"'" + unfinished + "'", "incomplete", "'complete' marker"});

  // Everything a checkpoint needs, written by another tool with variable-length strings (h5py's
  // default): accepted.
  const std::string compatible = (dir / "compatible.h5").string();
  write_raw_hdf5(compatible, {kCheckpointFormat, true, 1, true});
  const CheckpointReader reader = CheckpointReader::open(compatible);
  EXPECT_EQ(reader.string_attribute("format"), kCheckpointFormat);
  EXPECT_EQ(reader.read_tensor("weights"), (std::vector<float>{1, 2, 3, 4}));
}

TEST(CheckpointDir, PathForStep) {
  const CheckpointDir checkpoints("/runs/a");
  EXPECT_EQ(checkpoints.path_for_step(100), "/runs/a/step_00000100.h5");
  EXPECT_EQ(checkpoints.path_for_step(0), "/runs/a/step_00000000.h5");
  EXPECT_EQ(checkpoints.path_for_step(123456789), "/runs/a/step_123456789.h5");
  expect_error([&] { checkpoints.path_for_step(-1); }, {"negative step -1", "/runs/a"});
  EXPECT_THROW(CheckpointDir(""), std::runtime_error);
}

TEST(CheckpointDir, ListLatestPruneResolve) {
  const fs::path dir = make_test_dir();
  const CheckpointDir checkpoints(dir.string());

  // Nothing yet (and a directory that does not exist has nothing either).
  EXPECT_TRUE(checkpoints.list().empty());
  EXPECT_EQ(checkpoints.latest(), "");
  expect_error([&] { checkpoints.resolve("latest"); },
               {"no checkpoint in '" + dir.string() + "' to resume from"});
  EXPECT_TRUE(CheckpointDir((dir / "absent").string()).list().empty());

  for (const int64_t step : {100, 200, 300}) {
    write_small_checkpoint(checkpoints.path_for_step(step), 8, static_cast<float>(step));
  }
  // A writer that crashed mid-write, foreign files, and a damaged newest checkpoint.
  const std::string stale_tmp = checkpoints.path_for_step(400) + ".tmp";
  write_bytes(stale_tmp, "half a checkpoint");
  write_bytes(dir / "notes.txt", "hello");
  write_bytes(dir / "step_abc.h5", "not a step");
  write_bytes(dir / "model.h5", "someone else's");
  fs::create_directories(dir / "step_00000600.h5");  // a directory, not a checkpoint
  const std::string corrupt = checkpoints.path_for_step(500);
  const std::string good_bytes = read_bytes(checkpoints.path_for_step(300));
  write_bytes(corrupt, good_bytes.substr(0, good_bytes.size() / 2));

  const std::vector<std::pair<int64_t, std::string>> expected_list = {
      {100, checkpoints.path_for_step(100)},
      {200, checkpoints.path_for_step(200)},
      {300, checkpoints.path_for_step(300)},
      {500, corrupt}};
  EXPECT_EQ(checkpoints.list(), expected_list);

  ::testing::internal::CaptureStderr();
  EXPECT_EQ(checkpoints.latest(), checkpoints.path_for_step(300));
  const std::string warning = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(warning.find("warning"), std::string::npos) << warning;
  EXPECT_NE(warning.find(corrupt), std::string::npos) << warning;

  ::testing::internal::CaptureStderr();
  EXPECT_EQ(checkpoints.resolve("latest"), checkpoints.path_for_step(300));
  ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(checkpoints.resolve(checkpoints.path_for_step(100)), checkpoints.path_for_step(100));
  const std::string missing = (dir / "step_00000999.h5").string();
  expect_error([&] { checkpoints.resolve(missing); }, {"'" + missing + "'", "does not exist"});

  expect_error([&] { checkpoints.prune(0); }, {dir.string(), "keep_last must be at least 1"});
  ::testing::internal::CaptureStderr();
  checkpoints.prune(2);
  ::testing::internal::GetCapturedStderr();
  // The two newest valid checkpoints stay; the damaged newer one is left for inspection.
  EXPECT_EQ(checkpoints.list(), (std::vector<std::pair<int64_t, std::string>>{
                                    {200, checkpoints.path_for_step(200)},
                                    {300, checkpoints.path_for_step(300)},
                                    {500, corrupt}}));
  EXPECT_FALSE(fs::exists(stale_tmp));
  EXPECT_TRUE(fs::exists(dir / "notes.txt"));
  EXPECT_TRUE(fs::exists(dir / "step_abc.h5"));
  EXPECT_TRUE(fs::exists(dir / "model.h5"));

  ::testing::internal::CaptureStderr();
  checkpoints.prune(1);
  EXPECT_EQ(checkpoints.latest(), checkpoints.path_for_step(300));
  ::testing::internal::GetCapturedStderr();
  EXPECT_FALSE(fs::exists(checkpoints.path_for_step(200)));
  expect_same_bits(test_values(8, 300.0f),
                   CheckpointReader::open(checkpoints.path_for_step(300)).read_tensor("model/w"),
                   "kept checkpoint");
}

}  // namespace
}  // namespace freqkv
