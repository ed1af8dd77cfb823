// TokenFile / write_token_file: round trips per dtype, raw layout, bad sizes and ranges.
#include "tests/test_support.h"
#include "data/token_file.h"

#include <gtest/gtest.h>
#include <unistd.h>

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

fs::path make_token_test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("freqkv_tokens_" + std::string(info->name()) + "_" +
                        std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

TEST(TokenDType, Parse) {
  EXPECT_EQ(parse_token_dtype("uint16"), TokenDType::U16);
  EXPECT_EQ(parse_token_dtype("uint32"), TokenDType::U32);
  EXPECT_EQ(parse_token_dtype("int32"), TokenDType::I32);
  EXPECT_STREQ(token_dtype_name(TokenDType::U32), "uint32");
  EXPECT_EQ(token_dtype_size(TokenDType::U16), 2);
  EXPECT_EQ(token_dtype_size(TokenDType::I32), 4);
  expect_error<std::invalid_argument>([] { parse_token_dtype("u16"); },
                                      {"'u16'", "uint16", "uint32", "int32"});
}

struct RoundTripCase {
  TokenDType dtype;
  std::vector<int32_t> tokens;
};

TEST(TokenFile, RoundTripEachDtype) {
  const fs::path dir = make_token_test_dir();
  const std::vector<RoundTripCase> cases = {
      {TokenDType::U16, {0, 1, 2, 50256, 65535, 7}},
      {TokenDType::U32, {0, 128000, 65536, std::numeric_limits<int32_t>::max(), 3}},
      {TokenDType::I32, {-1, 0, 32000, std::numeric_limits<int32_t>::min(), 9}},
  };
  for (const RoundTripCase& test_case : cases) {
    const fs::path path = dir / (std::string(token_dtype_name(test_case.dtype)) + ".bin");
    write_token_file(path.string(), test_case.tokens, test_case.dtype);
    EXPECT_FALSE(fs::exists(path.string() + ".tmp"));
    EXPECT_EQ(fs::file_size(path),
              test_case.tokens.size() * static_cast<size_t>(token_dtype_size(test_case.dtype)));

    const TokenFile file = TokenFile::open(path.string(), test_case.dtype);
    ASSERT_EQ(file.size(), static_cast<int64_t>(test_case.tokens.size()));
    EXPECT_EQ(file.dtype(), test_case.dtype);
    EXPECT_EQ(file.path(), path.string());
    for (int64_t i = 0; i < file.size(); ++i) EXPECT_EQ(file.at(i), test_case.tokens[i]);
    std::vector<int32_t> all(test_case.tokens.size());
    file.read(0, file.size(), all.data());
    EXPECT_EQ(all, test_case.tokens);
    std::vector<int32_t> middle(2);
    file.read(2, 2, middle.data());
    EXPECT_EQ(middle, (std::vector<int32_t>{test_case.tokens[2], test_case.tokens[3]}));
  }
}

TEST(TokenFile, FlatLittleEndianWithoutHeader) {
  const fs::path dir = make_token_test_dir();
  write_token_file((dir / "u16.bin").string(), {1, 258}, TokenDType::U16);
  EXPECT_EQ(read_bytes(dir / "u16.bin"), std::string("\x01\x00\x02\x01", 4));
  write_token_file((dir / "u32.bin").string(), {0x01020304}, TokenDType::U32);
  EXPECT_EQ(read_bytes(dir / "u32.bin"), std::string("\x04\x03\x02\x01", 4));

  // Bytes written by some other tool read back as tokens.
  write_bytes(dir / "raw.bin", std::string("\xff\xff\x00\x01", 4));
  const TokenFile file = TokenFile::open((dir / "raw.bin").string(), TokenDType::U16);
  EXPECT_EQ(file.at(0), 65535);
  EXPECT_EQ(file.at(1), 256);
}

TEST(TokenFile, CopiesShareTheMapping) {
  const fs::path dir = make_token_test_dir();
  write_token_file((dir / "t.bin").string(), {4, 5, 6}, TokenDType::I32);
  TokenFile copy = TokenFile::open((dir / "t.bin").string(), TokenDType::I32);
  {
    const TokenFile original = TokenFile::open((dir / "t.bin").string(), TokenDType::I32);
    copy = original;
  }
  EXPECT_EQ(copy.at(2), 6);
}

TEST(TokenFile, EmptyFileHasNoTokens) {
  const fs::path dir = make_token_test_dir();
  write_token_file((dir / "empty.bin").string(), {}, TokenDType::U16);
  const TokenFile file = TokenFile::open((dir / "empty.bin").string(), TokenDType::U16);
  EXPECT_EQ(file.size(), 0);
  file.read(0, 0, nullptr);
  EXPECT_THROW(file.at(0), std::out_of_range);
}

TEST(TokenFile, SizeNotAMultipleOfTheElementSize) {
  const fs::path dir = make_token_test_dir();
  const std::string path = (dir / "odd.bin").string();
  write_bytes(path, std::string(5, '\x01'));
  expect_error<std::runtime_error>([&] { TokenFile::open(path, TokenDType::U16); },
                                   {path, "5 bytes", "uint16"});
  write_bytes(path, std::string(6, '\x01'));
  EXPECT_EQ(TokenFile::open(path, TokenDType::U16).size(), 3);
  expect_error<std::runtime_error>([&] { TokenFile::open(path, TokenDType::U32); },
                                   {path, "6 bytes", "uint32"});
  expect_error<std::runtime_error>([&] { TokenFile::open(path, TokenDType::I32); },
                                   {path, "6 bytes", "int32"});
}

TEST(TokenFile, MissingFile) {
  const fs::path dir = make_token_test_dir();
  const std::string path = (dir / "absent.bin").string();
  expect_error<std::runtime_error>([&] { TokenFile::open(path, TokenDType::U16); },
                                   {path, "cannot open"});
}

TEST(TokenFile, Uint32AboveInt32Max) {
  const fs::path dir = make_token_test_dir();
  const std::string path = (dir / "big.bin").string();
  const uint32_t values[2] = {7u, 0x80000000u};
  write_bytes(path, std::string(reinterpret_cast<const char*>(values), sizeof(values)));
  const TokenFile file = TokenFile::open(path, TokenDType::U32);
  EXPECT_EQ(file.at(0), 7);
  expect_error<std::runtime_error>([&] { file.at(1); }, {path, "token 1", "2147483648", "INT32_MAX"});
  std::vector<int32_t> out(2);
  EXPECT_THROW(file.read(0, 2, out.data()), std::runtime_error);
}

TEST(TokenFile, ReadOutOfRange) {
  const fs::path dir = make_token_test_dir();
  const std::string path = (dir / "t.bin").string();
  write_token_file(path, {1, 2, 3, 4}, TokenDType::U16);
  const TokenFile file = TokenFile::open(path, TokenDType::U16);
  std::vector<int32_t> out(8);
  expect_error<std::out_of_range>([&] { file.read(2, 3, out.data()); },
                                  {path, "[2, 5)", "4 tokens"});
  EXPECT_THROW(file.read(-1, 1, out.data()), std::out_of_range);
  EXPECT_THROW(file.read(0, -1, out.data()), std::out_of_range);
  EXPECT_THROW(file.at(4), std::out_of_range);
  EXPECT_THROW(file.at(-1), std::out_of_range);
  file.read(4, 0, out.data());  // an empty read at the end is fine
}

TEST(WriteTokenFile, RejectsValuesTheDtypeCannotStore) {
  const fs::path dir = make_token_test_dir();
  const std::string path = (dir / "t.bin").string();
  expect_error<std::invalid_argument>(
      [&] { write_token_file(path, {1, 70000}, TokenDType::U16); }, {"token 1", "70000", "uint16"});
  expect_error<std::invalid_argument>(
      [&] { write_token_file(path, {-5}, TokenDType::U32); }, {"token 0", "-5", "uint32"});
  expect_error<std::invalid_argument>(
      [&] { write_token_file(path, {-5}, TokenDType::U16); }, {"token 0", "-5", "uint16"});
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

}  // namespace
}  // namespace freqkv
