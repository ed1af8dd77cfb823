// SafetensorsReader / SafetensorsWriter: round trips, hand-built F16/BF16/F64 payloads, sharded
// checkpoints and every corrupt-input error.
#include "tests/test_support.h"
#include "model/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace freqkv {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, under gtest's temp dir.
fs::path make_test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("freqkv_safetensors_" + std::string(info->name()) + "_" +
                        std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A safetensors file from raw parts: the length field is the header's exact size unless given.
void write_raw_safetensors(const fs::path& path, const std::string& header,
                           const std::string& payload, uint64_t header_length_field = UINT64_MAX) {
  const uint64_t length = header_length_field == UINT64_MAX ? header.size() : header_length_field;
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &length, 8);
  write_bytes(path, bytes + header + payload);
}

template <typename T>
std::string as_bytes(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

// Runs action, expecting std::runtime_error whose message contains every fragment.
bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

TEST(SafetensorsWriter, RoundTripThroughReader) {
  const fs::path dir = make_test_dir();
  const fs::path path = dir / "model.safetensors";
  const std::vector<float> weight = {1.5f, -2.25f, 3.0f, 0.0f, 1e-30f, -7.0f};
  const std::vector<float> bias = {0.1f, 0.2f, 0.3f};
  const float scalar = 42.0f;

  SafetensorsWriter writer;
  writer.add("model.layers.0.weight", {2, 3}, weight.data());
  writer.add("bias", {3}, bias.data());
  writer.add("scalar", {}, &scalar);
  writer.add("empty", {0, 4}, nullptr);
  writer.set_metadata("step", "17");
  writer.write(path.string());
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));

  const SafetensorsReader reader = SafetensorsReader::open_file(path.string());
  EXPECT_EQ(reader.names(),
            (std::vector<std::string>{"bias", "empty", "model.layers.0.weight", "scalar"}));
  EXPECT_TRUE(reader.contains("bias"));
  EXPECT_FALSE(reader.contains("missing"));
  EXPECT_EQ(reader.shape("model.layers.0.weight"), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(reader.shape("scalar"), std::vector<int64_t>{});
  EXPECT_EQ(reader.numel("scalar"), 1);
  EXPECT_EQ(reader.numel("empty"), 0);
  EXPECT_EQ(reader.dtype("bias"), "F32");
  EXPECT_EQ(reader.read_f32("model.layers.0.weight"), weight);
  EXPECT_EQ(reader.read_f32("bias"), bias);
  EXPECT_EQ(reader.read_f32("scalar"), std::vector<float>{42.0f});
  EXPECT_TRUE(reader.read_f32("empty").empty());
  EXPECT_EQ(reader.metadata().at("format"), "pt");
  EXPECT_EQ(reader.metadata().at("step"), "17");

  std::vector<float> into(3);
  reader.read_f32_into("bias", into.data(), 3);
  EXPECT_EQ(into, bias);
}

TEST(SafetensorsWriter, StandardLayout) {
  // The layout the Python library produces and expects: 8-byte aligned header padded with spaces,
  // tensors contiguous in sorted-name order, little-endian float32.
  const fs::path dir = make_test_dir();
  const fs::path path = dir / "layout.safetensors";
  const std::vector<float> a = {1.0f, 2.0f};
  const std::vector<float> b = {3.0f, 4.0f, 5.0f};
  SafetensorsWriter writer;
  writer.add("b", {3}, b.data());
  writer.add("a", {2}, a.data());
  writer.write(path.string());

  const std::string bytes = read_bytes(path);
  uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data(), 8);
  EXPECT_EQ(header_length % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + header_length + 5 * sizeof(float));
  const std::string header_text = bytes.substr(8, header_length);
  // Only spaces follow the JSON object.
  const size_t json_end = header_text.find_last_of('}');
  ASSERT_NE(json_end, std::string::npos);
  EXPECT_EQ(header_text.find_first_not_of(' ', json_end + 1), std::string::npos);
  const nlohmann::json header = nlohmann::json::parse(header_text);
  EXPECT_EQ(header["__metadata__"], (nlohmann::json{{"format", "pt"}}));
  EXPECT_EQ(header["a"]["dtype"], "F32");
  EXPECT_EQ(header["a"]["shape"], (nlohmann::json{2}));
  EXPECT_EQ(header["a"]["data_offsets"], (nlohmann::json{0, 8}));
  EXPECT_EQ(header["b"]["data_offsets"], (nlohmann::json{8, 20}));
  std::vector<float> data(5);
  std::memcpy(data.data(), bytes.data() + 8 + header_length, 20);
  EXPECT_EQ(data, (std::vector<float>{1.0f, 2.0f, 3.0f, 4.0f, 5.0f}));
}

TEST(SafetensorsWriter, OverwritesAtomically) {
  const fs::path dir = make_test_dir();
  const fs::path path = dir / "out.safetensors";
  const std::vector<float> first = {1.0f};
  const std::vector<float> second = {2.0f, 3.0f};
  SafetensorsWriter one;
  one.add("x", {1}, first.data());
  one.write(path.string());
  SafetensorsWriter two;
  two.add("x", {2}, second.data());
  two.write(path.string());
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));
  EXPECT_EQ(SafetensorsReader::open_file(path.string()).read_f32("x"), second);
}

TEST(SafetensorsWriter, RejectsBadTensors) {
  const std::vector<float> values = {1.0f};
  SafetensorsWriter writer;
  writer.add("x", {1}, values.data());
  EXPECT_THROW(writer.add("x", {1}, values.data()), std::invalid_argument);
  EXPECT_THROW(writer.add("y", {-1}, values.data()), std::invalid_argument);
  EXPECT_THROW(writer.add("__metadata__", {1}, values.data()), std::invalid_argument);
  EXPECT_THROW(writer.add("", {1}, values.data()), std::invalid_argument);
  EXPECT_THROW(writer.add("z", {2}, nullptr), std::invalid_argument);
}

TEST(SafetensorsReader, ConvertsF16IncludingSubnormalsInfAndNan) {
  const fs::path dir = make_test_dir();
  const fs::path path = dir / "f16.safetensors";
  const std::vector<uint16_t> halves = {
      0x3C00,  // 1
      0xC000,  // -2
      0x3555,  // 0.333251953125
      0x0001,  // smallest subnormal 2^-24
      0x03FF,  // largest subnormal 1023 * 2^-24
      0x8001,  // -2^-24
      0x0400,  // smallest normal 2^-14
      0x7BFF,  // 65504, the largest finite half
      0x7C00,  // +inf
      0xFC00,  // -inf
      0x7E00,  // nan
      0x8000,  // -0
  };
  // A one-byte U8 tensor first puts the F16 payload at an odd address.
  const nlohmann::json header = {
      {"pad", {{"dtype", "U8"}, {"shape", {1}}, {"data_offsets", {0, 1}}}},
      {"h", {{"dtype", "F16"}, {"shape", {3, 4}}, {"data_offsets", {1, 25}}}}};
  write_raw_safetensors(path, header.dump(), std::string(1, '\x7f') + as_bytes(halves));

  const SafetensorsReader reader = SafetensorsReader::open_file(path.string());
  EXPECT_EQ(reader.dtype("h"), "F16");
  EXPECT_EQ(reader.shape("h"), (std::vector<int64_t>{3, 4}));
  const std::vector<float> values = reader.read_f32("h");
  ASSERT_EQ(values.size(), 12u);
  EXPECT_EQ(values[0], 1.0f);
  EXPECT_EQ(values[1], -2.0f);
  EXPECT_EQ(values[2], 0.333251953125f);
  EXPECT_EQ(values[3], std::ldexp(1.0f, -24));
  EXPECT_EQ(values[4], std::ldexp(1023.0f, -24));
  EXPECT_EQ(values[5], -std::ldexp(1.0f, -24));
  EXPECT_EQ(values[6], std::ldexp(1.0f, -14));
  EXPECT_EQ(values[7], 65504.0f);
  EXPECT_EQ(values[8], std::numeric_limits<float>::infinity());
  EXPECT_EQ(values[9], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(values[10]));
  EXPECT_TRUE(same_bits(values[11], -0.0f));
}

TEST(SafetensorsReader, ConvertsBF16ByShifting) {
  const fs::path dir = make_test_dir();
  const fs::path path = dir / "bf16.safetensors";
  const std::vector<uint16_t> bf16 = {0x3F80, 0xC040, 0x4049, 0x7F80, 0xFF80, 0x0001, 0x7FC0};
  const nlohmann::json header = {
      {"b", {{"dtype", "BF16"}, {"shape", {7}}, {"data_offsets", {0, 14}}}}};
  write_raw_safetensors(path, header.dump(), as_bytes(bf16));

  const std::vector<float> values = SafetensorsReader::open_file(path.string()).read_f32("b");
  ASSERT_EQ(values.size(), 7u);
  EXPECT_EQ(values[0], 1.0f);
  EXPECT_EQ(values[1], -3.0f);
  EXPECT_EQ(values[2], 3.140625f);
  EXPECT_EQ(values[3], std::numeric_limits<float>::infinity());
  EXPECT_EQ(values[4], -std::numeric_limits<float>::infinity());
  EXPECT_EQ(values[5], std::ldexp(1.0f, -133));  // a float subnormal
  EXPECT_TRUE(std::isnan(values[6]));
}

TEST(SafetensorsReader, ConvertsF64AndRejectsIntegerDtypes) {
  const fs::path dir = make_test_dir();
  const fs::path path = dir / "mixed.safetensors";
  const std::vector<double> doubles = {0.1, -1e10, 3.0};
  const std::vector<int64_t> ints = {1, 2};
  const nlohmann::json header = {
      {"d", {{"dtype", "F64"}, {"shape", {3}}, {"data_offsets", {0, 24}}}},
      {"i", {{"dtype", "I64"}, {"shape", {2}}, {"data_offsets", {24, 40}}}}};
  write_raw_safetensors(path, header.dump(), as_bytes(doubles) + as_bytes(ints));

  const SafetensorsReader reader = SafetensorsReader::open_file(path.string());
  EXPECT_EQ(reader.read_f32("d"), (std::vector<float>{0.1f, -1e10f, 3.0f}));
  EXPECT_EQ(reader.dtype("i"), "I64");
  EXPECT_EQ(reader.shape("i"), std::vector<int64_t>{2});
  expect_error([&] { reader.read_f32("i"); }, {"'i'", "I64", "cannot be read as float"});
}

TEST(SafetensorsReader, UnknownNameAndWrongDestinationSize) {
  const fs::path dir = make_test_dir();
  const fs::path path = dir / "model.safetensors";
  const std::vector<float> values = {1.0f, 2.0f, 3.0f, 4.0f};
  SafetensorsWriter writer;
  writer.add("w", {2, 2}, values.data());
  writer.write(path.string());
  const SafetensorsReader reader = SafetensorsReader::open_file(path.string());

  expect_error([&] { reader.shape("lm_head.weight"); }, {"lm_head.weight", path.string()});
  expect_error([&] { reader.read_f32("lm_head.weight"); }, {"lm_head.weight", path.string()});
  std::vector<float> small(3);
  expect_error([&] { reader.read_f32_into("w", small.data(), 3); },
               {"'w'", "[2, 2]", "4 elements", "3"});
}

// ---- model directories ---------------------------------------------------------------------

void write_tensor_file(const fs::path& path,
                       const std::vector<std::pair<std::string, std::vector<float>>>& tensors) {
  SafetensorsWriter writer;
  for (const auto& [name, values] : tensors) {
    writer.add(name, {static_cast<int64_t>(values.size())}, values.data());
  }
  writer.write(path.string());
}

void write_index(const fs::path& dir, const nlohmann::json& weight_map) {
  const nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
  write_bytes(dir / "model.safetensors.index.json", index.dump(2));
}

TEST(SafetensorsReader, ModelDirWithSingleFile) {
  const fs::path dir = make_test_dir();
  write_tensor_file(dir / "model.safetensors", {{"x", {1.0f, 2.0f}}});
  const SafetensorsReader reader = SafetensorsReader::open_model_dir(dir.string());
  EXPECT_EQ(reader.names(), std::vector<std::string>{"x"});
  EXPECT_EQ(reader.read_f32("x"), (std::vector<float>{1.0f, 2.0f}));
  expect_error([&] { reader.dtype("y"); }, {"'y'", dir.string()});
}

TEST(SafetensorsReader, ShardedModelDir) {
  const fs::path dir = make_test_dir();
  const std::string shard1 = "model-00001-of-00002.safetensors";
  const std::string shard2 = "model-00002-of-00002.safetensors";
  write_tensor_file(dir / shard1, {{"embed", {1.0f, 2.0f}}, {"layer0", {3.0f}}});
  write_tensor_file(dir / shard2, {{"layer1", {4.0f, 5.0f, 6.0f}}, {"norm", {7.0f}}});
  write_index(dir, {{"embed", shard1}, {"layer0", shard1}, {"layer1", shard2}, {"norm", shard2}});

  const SafetensorsReader reader = SafetensorsReader::open_model_dir(dir.string());
  EXPECT_EQ(reader.names(), (std::vector<std::string>{"embed", "layer0", "layer1", "norm"}));
  EXPECT_EQ(reader.read_f32("embed"), (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ(reader.read_f32("layer1"), (std::vector<float>{4.0f, 5.0f, 6.0f}));
  EXPECT_EQ(reader.read_f32("norm"), std::vector<float>{7.0f});
  EXPECT_EQ(fs::path(reader.file_of("layer0")).filename(), shard1);
  EXPECT_EQ(fs::path(reader.file_of("norm")).filename(), shard2);
  expect_error([&] { reader.read_f32("lm_head"); }, {"lm_head", dir.string()});
}

TEST(SafetensorsReader, ModelDirWithoutWeights) {
  const fs::path dir = make_test_dir();
  expect_error([&] { SafetensorsReader::open_model_dir(dir.string()); },
               {(dir / "model.safetensors").string(),
                (dir / "model.safetensors.index.json").string()});
}

TEST(SafetensorsReader, IndexNamingMissingShard) {
  const fs::path dir = make_test_dir();
  write_tensor_file(dir / "a.safetensors", {{"x", {1.0f}}});
  write_index(dir, {{"x", "a.safetensors"}, {"y", "gone.safetensors"}});
  expect_error([&] { SafetensorsReader::open_model_dir(dir.string()); },
               {"gone.safetensors", "'y'", "does not exist"});
}

TEST(SafetensorsReader, TensorDuplicatedAcrossShards) {
  const fs::path dir = make_test_dir();
  write_tensor_file(dir / "a.safetensors", {{"x", {1.0f}}});
  write_tensor_file(dir / "b.safetensors", {{"x", {2.0f}}, {"y", {3.0f}}});
  write_index(dir, {{"x", "a.safetensors"}, {"y", "b.safetensors"}});
  expect_error([&] { SafetensorsReader::open_model_dir(dir.string()); },
               {"'x'", "twice", "a.safetensors", "b.safetensors"});
}

TEST(SafetensorsReader, IndexPointingAtWrongShard) {
  const fs::path dir = make_test_dir();
  write_tensor_file(dir / "a.safetensors", {{"x", {1.0f}}});
  write_tensor_file(dir / "b.safetensors", {{"y", {2.0f}}});
  write_index(dir, {{"x", "a.safetensors"}, {"y", "a.safetensors"}, {"z", "b.safetensors"}});
  expect_error([&] { SafetensorsReader::open_model_dir(dir.string()); },
               {"'y'", "a.safetensors", "stored in", "b.safetensors"});
  // A tensor that no shard holds at all.
  write_index(dir, {{"x", "a.safetensors"}, {"y", "b.safetensors"}, {"z", "b.safetensors"}});
  expect_error([&] { SafetensorsReader::open_model_dir(dir.string()); },
               {"'z'", "b.safetensors", "does not contain"});
}

TEST(SafetensorsReader, BadIndex) {
  const fs::path dir = make_test_dir();
  write_bytes(dir / "model.safetensors.index.json", "{\"weight_map\": [1, 2");
  expect_error([&] { SafetensorsReader::open_model_dir(dir.string()); },
               {"model.safetensors.index.json", "not valid JSON"});
  write_bytes(dir / "model.safetensors.index.json", "{\"metadata\": {}}");
  expect_error([&] { SafetensorsReader::open_model_dir(dir.string()); }, {"weight_map"});
  write_bytes(dir / "model.safetensors.index.json", "{\"weight_map\": {\"x\": 3}}");
  expect_error([&] { SafetensorsReader::open_model_dir(dir.string()); }, {"'x'", "shard"});
}

// ---- corrupt files ---------------------------------------------------------------------------

class CorruptSafetensors : public ::testing::Test {
 protected:
  void SetUp() override { path_ = (make_test_dir() / "bad.safetensors").string(); }
  // Writes a header with one entry "t" and 8 payload bytes, then expects open_file to fail.
  void expect_entry_error(const nlohmann::json& entry, const std::vector<std::string>& fragments) {
    write_raw_safetensors(path_, nlohmann::json{{"t", entry}}.dump(), std::string(8, '\0'));
    std::vector<std::string> expected = fragments;
    expected.push_back(path_);
    expected.push_back("'t'");
    expect_error([&] { SafetensorsReader::open_file(path_); }, expected);
  }
  std::string path_;
};

TEST_F(CorruptSafetensors, MissingFile) {
  expect_error([&] { SafetensorsReader::open_file(path_ + ".nope"); },
               {path_ + ".nope", "cannot open"});
}

TEST_F(CorruptSafetensors, TooSmallForLengthField) {
  write_bytes(path_, "abc");
  expect_error([&] { SafetensorsReader::open_file(path_); }, {path_, "3 bytes", "too small"});
}

TEST_F(CorruptSafetensors, HeaderLengthBeyondFileSize) {
  write_raw_safetensors(path_, "{}", "", 1000);
  expect_error([&] { SafetensorsReader::open_file(path_); }, {path_, "1000", "exceeds"});
}

TEST_F(CorruptSafetensors, HeaderIsNotJson) {
  write_raw_safetensors(path_, "{\"t\": {\"dtype\": ", "");
  expect_error([&] { SafetensorsReader::open_file(path_); }, {path_, "not valid JSON"});
}

TEST_F(CorruptSafetensors, HeaderIsNotAnObject) {
  write_raw_safetensors(path_, "[1, 2]", "");
  expect_error([&] { SafetensorsReader::open_file(path_); }, {path_, "expected a JSON object"});
}

TEST_F(CorruptSafetensors, EntryIsNotAnObject) {
  expect_entry_error(42, {"expected an object"});
}

TEST_F(CorruptSafetensors, MissingFields) {
  expect_entry_error({{"shape", {2}}, {"data_offsets", {0, 8}}}, {"missing \"dtype\""});
  expect_entry_error({{"dtype", "F32"}, {"data_offsets", {0, 8}}}, {"missing \"shape\""});
  expect_entry_error({{"dtype", "F32"}, {"shape", {2}}}, {"missing \"data_offsets\""});
}

TEST_F(CorruptSafetensors, WrongFieldTypes) {
  expect_entry_error({{"dtype", 7}, {"shape", {2}}, {"data_offsets", {0, 8}}},
                     {"\"dtype\"", "expected a string"});
  expect_entry_error({{"dtype", "F32"}, {"shape", "2"}, {"data_offsets", {0, 8}}},
                     {"\"shape\"", "non-negative integers"});
  expect_entry_error({{"dtype", "F32"}, {"shape", {2, -1}}, {"data_offsets", {0, 8}}},
                     {"\"shape\"", "non-negative integers"});
  expect_entry_error({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0}}},
                     {"\"data_offsets\"", "[begin, end]"});
  expect_entry_error({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {-8, 0}}},
                     {"\"data_offsets\"", "[begin, end]"});
}

TEST_F(CorruptSafetensors, UnsupportedDtype) {
  expect_entry_error({{"dtype", "F12"}, {"shape", {2}}, {"data_offsets", {0, 8}}},
                     {"unsupported dtype 'F12'"});
}

TEST_F(CorruptSafetensors, OffsetsOutOfRange) {
  expect_entry_error({{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}},
                     {"out of range", "8 bytes"});
  expect_entry_error({{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {8, 4}}},
                     {"out of range"});
}

TEST_F(CorruptSafetensors, OffsetsNotMatchingShape) {
  expect_entry_error({{"dtype", "F32"}, {"shape", {3}}, {"data_offsets", {0, 8}}},
                     {"span 8 bytes", "[3]", "F32", "needs 12"});
  expect_entry_error({{"dtype", "F16"}, {"shape", {2, 2}}, {"data_offsets", {0, 4}}},
                     {"span 4 bytes", "[2, 2]", "needs 8"});
}

TEST_F(CorruptSafetensors, OverlappingTensors) {
  const nlohmann::json header = {
      {"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
      {"b", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {4, 8}}}}};
  write_raw_safetensors(path_, header.dump(), std::string(8, '\0'));
  expect_error([&] { SafetensorsReader::open_file(path_); }, {path_, "overlap", "'a'", "'b'"});
}

}  // namespace
}  // namespace freqkv
