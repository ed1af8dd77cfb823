// read_hf_config / write_hf_config, ModelConfig::validate and FreqKVConfig's derived sizes.
#include "model/hf_config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model_config.h"
#include "tests/test_support.h"

namespace freqkv {
namespace {

namespace fs = std::filesystem;

fs::path make_config_test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("freqkv_hf_config_" + std::string(info->test_suite_name()) + "_" +
                        info->name() + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// TinyLlama-1.1B's config.json, as published.
nlohmann::json tinyllama_config() {
  return nlohmann::json::parse(R"({
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": null,
    "rope_theta": 10000.0,
    "tie_word_embeddings": false,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
    "use_cache": true,
    "vocab_size": 32000
  })");
}

nlohmann::json minimal_config() {
  return {{"vocab_size", 256},
          {"hidden_size", 64},
          {"intermediate_size", 128},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 4}};
}

class HfConfigTest : public ::testing::Test {
 protected:
  void SetUp() override { path_ = (make_config_test_dir() / "config.json").string(); }

  ModelConfig read(const nlohmann::json& config) {
    write_text(config.dump(2));
    return read_hf_config(path_);
  }
  void write_text(const std::string& text) {
    std::ofstream out(path_, std::ios::trunc);
    out << text;
  }
  // Expects reading config to throw std::runtime_error mentioning the file and every fragment.
  void expect_rejected(const nlohmann::json& config, const std::vector<std::string>& fragments) {
    write_text(config.dump(2));
    expect_read_error(fragments);
  }
  void expect_read_error(const std::vector<std::string>& fragments) {
    try {
      read_hf_config(path_);
      ADD_FAILURE() << "expected read_hf_config to reject the config";
    } catch (const std::runtime_error& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find(path_), std::string::npos) << message;
      for (const std::string& fragment : fragments) {
        EXPECT_NE(message.find(fragment), std::string::npos)
            << "message '" << message << "' lacks '" << fragment << "'";
      }
    }
  }
  std::string path_;
};

TEST_F(HfConfigTest, ReadsTinyLlama) {
  const ModelConfig config = read(tinyllama_config());
  EXPECT_EQ(config.vocab_size, 32000);
  EXPECT_EQ(config.hidden_size, 2048);
  EXPECT_EQ(config.intermediate_size, 5632);
  EXPECT_EQ(config.num_hidden_layers, 22);
  EXPECT_EQ(config.num_attention_heads, 32);
  EXPECT_EQ(config.num_key_value_heads, 4);  // GQA: 8 query heads per key/value head
  EXPECT_EQ(config.head_dim, 64);
  EXPECT_DOUBLE_EQ(config.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(config.rope_theta, 10000.0);
  EXPECT_FALSE(config.tie_word_embeddings);
  EXPECT_EQ(config.max_position_embeddings, 2048);
  EXPECT_EQ(config.bos_token_id, 1);
  EXPECT_EQ(config.eos_token_id, 2);
}

TEST_F(HfConfigTest, Defaults) {
  const ModelConfig config = read(minimal_config());
  EXPECT_EQ(config.num_key_value_heads, 4);
  EXPECT_EQ(config.head_dim, 16);
  EXPECT_DOUBLE_EQ(config.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(config.rope_theta, 10000.0);
  EXPECT_FALSE(config.tie_word_embeddings);
  EXPECT_EQ(config.max_position_embeddings, 4096);
  EXPECT_EQ(config.bos_token_id, 1);
  EXPECT_EQ(config.eos_token_id, 2);
}

TEST_F(HfConfigTest, NullMeansDefaultAndExplicitHeadDim) {
  nlohmann::json config = minimal_config();
  config["head_dim"] = nullptr;
  config["num_key_value_heads"] = nullptr;
  config["rope_scaling"] = nullptr;
  EXPECT_EQ(read(config).head_dim, 16);
  EXPECT_EQ(read(config).num_key_value_heads, 4);
  config["head_dim"] = 32;  // may differ from hidden_size / heads
  config["num_key_value_heads"] = 2;
  const ModelConfig explicit_config = read(config);
  EXPECT_EQ(explicit_config.head_dim, 32);
  EXPECT_EQ(explicit_config.num_key_value_heads, 2);
}

TEST_F(HfConfigTest, EosListTakesFirstAndOtherOptionalFields) {
  nlohmann::json config = minimal_config();
  config["eos_token_id"] = {128001, 128008, 128009};
  config["bos_token_id"] = 128000;
  config["rope_theta"] = 500000;  // an integer is fine for a float field
  config["tie_word_embeddings"] = true;
  config["attention_bias"] = false;
  config["mlp_bias"] = false;
  const ModelConfig read_config = read(config);
  EXPECT_EQ(read_config.eos_token_id, 128001);
  EXPECT_EQ(read_config.bos_token_id, 128000);
  EXPECT_DOUBLE_EQ(read_config.rope_theta, 500000.0);
  EXPECT_TRUE(read_config.tie_word_embeddings);
}

TEST_F(HfConfigTest, WriteThenReadRoundTrip) {
  ModelConfig config;
  config.vocab_size = 1000;
  config.hidden_size = 96;
  config.intermediate_size = 256;
  config.num_hidden_layers = 3;
  config.num_attention_heads = 6;
  config.num_key_value_heads = 2;
  config.head_dim = 16;
  config.rms_norm_eps = 1e-5;
  config.rope_theta = 123456.5;
  config.tie_word_embeddings = true;
  config.max_position_embeddings = 512;
  config.bos_token_id = 5;
  config.eos_token_id = 6;
  write_hf_config(config, path_);
  EXPECT_FALSE(fs::exists(path_ + ".tmp"));

  std::ifstream in(path_);
  const nlohmann::json written = nlohmann::json::parse(in);
  EXPECT_EQ(written["architectures"], nlohmann::json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(written["model_type"], "llama");
  EXPECT_EQ(written["hidden_act"], "silu");
  EXPECT_EQ(written["torch_dtype"], "float32");

  const ModelConfig back = read_hf_config(path_);
  EXPECT_EQ(back.vocab_size, config.vocab_size);
  EXPECT_EQ(back.hidden_size, config.hidden_size);
  EXPECT_EQ(back.intermediate_size, config.intermediate_size);
  EXPECT_EQ(back.num_hidden_layers, config.num_hidden_layers);
  EXPECT_EQ(back.num_attention_heads, config.num_attention_heads);
  EXPECT_EQ(back.num_key_value_heads, config.num_key_value_heads);
  EXPECT_EQ(back.head_dim, config.head_dim);
  EXPECT_EQ(back.rms_norm_eps, config.rms_norm_eps);
  EXPECT_EQ(back.rope_theta, config.rope_theta);
  EXPECT_EQ(back.tie_word_embeddings, config.tie_word_embeddings);
  EXPECT_EQ(back.max_position_embeddings, config.max_position_embeddings);
  EXPECT_EQ(back.bos_token_id, config.bos_token_id);
  EXPECT_EQ(back.eos_token_id, config.eos_token_id);
}

TEST_F(HfConfigTest, MissingRequiredField) {
  nlohmann::json config = minimal_config();
  config.erase("intermediate_size");
  expect_rejected(config, {"intermediate_size", "missing"});
}

TEST_F(HfConfigTest, WrongTypes) {
  nlohmann::json config = minimal_config();
  config["hidden_size"] = "64";
  expect_rejected(config, {"hidden_size", "expected an integer"});
  config = minimal_config();
  config["num_hidden_layers"] = 2.5;
  expect_rejected(config, {"num_hidden_layers", "expected an integer"});
  config = minimal_config();
  config["rms_norm_eps"] = "1e-5";
  expect_rejected(config, {"rms_norm_eps", "expected a number"});
  config = minimal_config();
  config["tie_word_embeddings"] = 1;
  expect_rejected(config, {"tie_word_embeddings", "true or false"});
  config = minimal_config();
  config["eos_token_id"] = nlohmann::json::array();
  expect_rejected(config, {"eos_token_id", "empty list"});
  config = minimal_config();
  config["eos_token_id"] = {"</s>"};
  expect_rejected(config, {"eos_token_id", "expected an integer"});
}

TEST_F(HfConfigTest, UnsupportedFeatures) {
  nlohmann::json config = tinyllama_config();
  config["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  expect_rejected(config, {"rope_scaling", "not supported", "linear"});
  config = tinyllama_config();
  config["hidden_act"] = "gelu";
  expect_rejected(config, {"hidden_act", "gelu", "silu"});
  config = tinyllama_config();
  config["attention_bias"] = true;
  expect_rejected(config, {"attention_bias", "not supported"});
  config = tinyllama_config();
  config["mlp_bias"] = true;
  expect_rejected(config, {"mlp_bias", "not supported"});
}

TEST_F(HfConfigTest, InconsistentSizes) {
  nlohmann::json config = minimal_config();
  config["num_key_value_heads"] = 3;
  expect_rejected(config, {"num_attention_heads (4)", "num_key_value_heads (3)", "divisible"});
  config = minimal_config();
  config["head_dim"] = 15;
  expect_rejected(config, {"head_dim", "even", "15"});
  config = minimal_config();
  config["vocab_size"] = 0;
  expect_rejected(config, {"vocab_size", "positive"});
  config = minimal_config();
  config["hidden_size"] = 66;  // not divisible by 4 heads, no head_dim to say otherwise
  expect_rejected(config, {"hidden_size", "num_attention_heads"});
}

TEST_F(HfConfigTest, UnreadableFiles) {
  write_text("{\"vocab_size\": 12,");
  expect_read_error({"not valid JSON"});
  write_text("[1, 2, 3]");
  expect_read_error({"expected a JSON object"});
  fs::remove(path_);
  expect_read_error({"cannot open"});
}

TEST(ModelConfigValidate, NamesFieldAndValue) {
  ModelConfig config;
  config.vocab_size = 10;
  config.hidden_size = 8;
  config.intermediate_size = 16;
  config.num_hidden_layers = 1;
  config.num_attention_heads = 2;
  config.num_key_value_heads = 2;
  config.head_dim = 4;
  EXPECT_NO_THROW(config.validate());

  config.num_hidden_layers = -1;
  try {
    config.validate();
    ADD_FAILURE() << "expected num_hidden_layers = -1 to be rejected";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("num_hidden_layers"), std::string::npos);
    EXPECT_NE(std::string(error.what()).find("-1"), std::string::npos);
  }
  config.num_hidden_layers = 1;
  config.rms_norm_eps = 0.0;
  EXPECT_THROW(config.validate(), std::invalid_argument);
  config.rms_norm_eps = 1e-6;
  config.rope_theta = -1.0;
  EXPECT_THROW(config.validate(), std::invalid_argument);
}

// ---- FreqKVConfig ----------------------------------------------------------------------------

void expect_freqkv_rejected(const FreqKVConfig& config, const std::vector<std::string>& fragments) {
  try {
    config.validate();
    ADD_FAILURE() << "expected C=" << config.cache << " S=" << config.sink
                  << " r=" << config.ratio << " to be rejected";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message '" << message << "' lacks '" << fragment << "'";
    }
  }
}

TEST(FreqKVConfig, PaperDefaults) {
  const FreqKVConfig config;  // C = 4096, S = 4, r = 0.5
  EXPECT_EQ(config.cache, 4096);
  EXPECT_EQ(config.sink, 4);
  EXPECT_EQ(config.compressible(), 4092);
  EXPECT_EQ(config.compressed(), 2046);
  EXPECT_EQ(config.step(), 2046);
  EXPECT_NO_THROW(config.validate());
}

TEST(FreqKVConfig, CompressedIsPlainFloorOfTheDoubleProduct) {
  EXPECT_EQ(freqkv_config(4096, 4, 0.3).compressed(), 1227);  // floor(1227.6)
  // 100 * 0.29 is 28.999999999999996 in double arithmetic; Python's int() gives 28, so do we.
  const FreqKVConfig config = freqkv_config(104, 4, 0.29);
  EXPECT_EQ(config.compressed(), 28);
  EXPECT_EQ(config.step(), 72);
  EXPECT_NO_THROW(config.validate());
  EXPECT_EQ(freqkv_config(8, 0, 0.5).compressed(), 4);
}

TEST(FreqKVConfig, Rejections) {
  expect_freqkv_rejected(freqkv_config(4096, -1, 0.5), {"S=-1", "sink"});
  expect_freqkv_rejected(freqkv_config(16, 16, 0.5), {"C=16", "S=16", "smaller than the cache"});
  expect_freqkv_rejected(freqkv_config(16, 20, 0.5), {"sink"});
  expect_freqkv_rejected(freqkv_config(16, 4, 0.0), {"ratio", "(0, 1]"});
  expect_freqkv_rejected(freqkv_config(16, 4, 1.5), {"ratio", "(0, 1]"});
  expect_freqkv_rejected(freqkv_config(16, 4, std::nan("")), {"ratio"});
  // F = 1, L = floor(0.5) = 0.
  expect_freqkv_rejected(freqkv_config(5, 4, 0.5), {"L = ", "= 0 < 1", "increase"});
  // r = 1 keeps everything: L = F, step = 0.
  expect_freqkv_rejected(freqkv_config(16, 4, 1.0), {"step", "= 0 < 1", "ratio"});
}

}  // namespace
}  // namespace freqkv
