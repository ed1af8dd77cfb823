// Training configuration: embedded defaults, file and --set merging, unknown keys, value checks,
// the recipes in configs/, the resolved-YAML round trip and the learning-rate schedule.
#include "tests/test_support.h"
#include "trainer/train_config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace freqkv {
namespace {

namespace fs = std::filesystem;

// The repository root (this file lives in tests/).
const fs::path kRepoRoot = fs::path(__FILE__).parent_path().parent_path();

// The keys every run must set: a model and training data.
const std::vector<std::string> kRequired = {"model.init_config=model.json", "data.train=[a.bin]"};

std::vector<std::string> with_required(std::vector<std::string> overrides) {
  overrides.insert(overrides.begin(), kRequired.begin(), kRequired.end());
  return overrides;
}

TrainConfig load_text(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return load_train_config_from_string(yaml, with_required(overrides), "test.yaml");
}

fs::path write_config(const std::string& name, const std::string& text) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("freqkv_config_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path path = dir / name;
  std::ofstream(path) << text;
  return path;
}

// Leaf key paths of the embedded defaults, from their layout (two spaces per level).
std::vector<std::string> default_leaf_keys() {
  std::vector<std::string> keys, path;
  std::istringstream lines(default_config_yaml());
  std::vector<std::pair<size_t, std::string>> entries;  // (depth, key) of every key line
  std::vector<bool> is_section;                         // no value after the colon
  for (std::string line; std::getline(lines, line);) {
    const size_t indent = line.find_first_not_of(' ');
    if (indent == std::string::npos || line[indent] == '#') continue;
    const size_t colon = line.find(':');
    entries.push_back({indent / 2, line.substr(indent, colon - indent)});
    const std::string after = line.substr(colon + 1, line.find("  #") - colon - 1);
    is_section.push_back(after.find_first_not_of(' ') == std::string::npos);
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    path.resize(entries[i].first);
    path.push_back(entries[i].second);
    if (is_section[i]) continue;
    std::string joined;
    for (const std::string& part : path) joined += (joined.empty() ? "" : ".") + part;
    keys.push_back(joined);
  }
  return keys;
}

TEST(TrainConfig, DefaultsLoadAndMatchTheStructInitialisers) {
  const TrainConfig loaded = load_text("");
  // TrainConfig's member initialisers mirror the embedded defaults; they must agree.
  TrainConfig expected;
  expected.model.init_config = "model.json";
  expected.data.train = {"a.bin"};
  EXPECT_TRUE(loaded == expected) << loaded.resolved_yaml;

  EXPECT_EQ(loaded.device, TrainDevice::Cpu);
  EXPECT_EQ(loaded.precision, TrainPrecision::FP32);
  EXPECT_TRUE(loaded.freqkv.enabled);
  EXPECT_EQ(loaded.freqkv.cache, 4096);
  EXPECT_EQ(loaded.freqkv.sink, 4);
  EXPECT_EQ(loaded.freqkv.ratio, 0.5);
  EXPECT_EQ(loaded.freqkv_compression, CompressionImpl::Auto);
  EXPECT_EQ(loaded.data.token_dtype, TokenDType::U16);
  EXPECT_EQ(loaded.data.seq_len, 8192);
  EXPECT_EQ(loaded.data.eos_token, -1);
  EXPECT_EQ(loaded.optimizer.lr, 2e-5);
  EXPECT_EQ(loaded.optimizer.eps, 1e-8);
  EXPECT_EQ(loaded.schedule.kind, LrScheduleKind::Constant);
  EXPECT_EQ(loaded.schedule.warmup_steps, 20);
  EXPECT_EQ(loaded.lora.targets,
            (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"}));
  EXPECT_EQ(loaded.lora.trainable, (std::vector<std::string>{"embed_tokens", "norm"}));
  EXPECT_EQ(loaded.checkpoint.resume, "");
  EXPECT_EQ(loaded.logging.run_dir, "runs/default");
}

TEST(TrainConfig, DefaultsDocumentEveryKey) {
  // Every key line carries a comment, and every leaf shows up in the resolved config.
  const std::vector<std::string> keys = default_leaf_keys();
  EXPECT_GE(keys.size(), 45u);
  std::istringstream lines(default_config_yaml());
  for (std::string line; std::getline(lines, line);) {
    const size_t indent = line.find_first_not_of(' ');
    if (indent == std::string::npos || line[indent] == '#') continue;
    EXPECT_NE(line.find("  # "), std::string::npos) << "no comment on: " << line;
  }
  const std::string resolved = load_text("").resolved_yaml;
  for (const std::string& key : keys) {
    const std::string leaf = key.substr(key.rfind('.') + 1);
    EXPECT_NE(resolved.find(leaf + ":"), std::string::npos) << key;
  }
}

TEST(TrainConfig, ReadmeMentionsEveryKey) {
  std::ifstream in(kRepoRoot / "configs" / "README.md");
  ASSERT_TRUE(in) << "configs/README.md is missing";
  std::stringstream text;
  text << in.rdbuf();
  const std::string readme = text.str();
  for (const std::string& key : default_leaf_keys()) {
    EXPECT_NE(readme.find("`" + key + "`"), std::string::npos)
        << "configs/README.md does not document `" << key << "`";
  }
}

TEST(TrainConfig, RecipesLoad) {
  const std::vector<std::string> required = {"model.path=/models/llama", "data.train=[train.bin]"};
  const TrainConfig llama2 =
      load_train_config((kRepoRoot / "configs/llama2-7b-freqkv.yaml").string(), required);
  EXPECT_EQ(llama2.device, TrainDevice::Cuda);
  EXPECT_EQ(llama2.precision, TrainPrecision::BF16);
  EXPECT_EQ(llama2.model.path, "/models/llama");
  EXPECT_EQ(llama2.freqkv.cache, 4096);
  EXPECT_EQ(llama2.freqkv.sink, 4);
  EXPECT_EQ(llama2.freqkv.ratio, 0.5);
  EXPECT_EQ(llama2.data.seq_len, 8192);
  EXPECT_EQ(llama2.optimizer.lr, 2e-5);
  EXPECT_EQ(llama2.optimizer.grad_clip, 1.0);
  EXPECT_EQ(llama2.schedule.warmup_steps, 20);
  EXPECT_EQ(llama2.schedule.kind, LrScheduleKind::Constant);
  EXPECT_EQ(llama2.lora.rank, 8);
  EXPECT_EQ(llama2.lora.alpha, 16.0);

  const TrainConfig llama3 =
      load_train_config((kRepoRoot / "configs/llama3-8b-freqkv.yaml").string(), required);
  EXPECT_EQ(llama3.freqkv.cache, 8192);
  EXPECT_EQ(llama3.data.token_dtype, TokenDType::U32);

  // The tiny recipe needs no overrides; its paths are relative to the repository root.
  const TrainConfig tiny = load_train_config((kRepoRoot / "configs/tiny-cpu.yaml").string(), {});
  EXPECT_TRUE(fs::exists(kRepoRoot / tiny.model.init_config));
  EXPECT_EQ(tiny.device, TrainDevice::Cpu);
  EXPECT_EQ(tiny.data.seq_len, 1024);
  EXPECT_EQ(tiny.data.batch_size, 2);
  EXPECT_EQ(tiny.freqkv.cache, 256);
  EXPECT_EQ(tiny.optimizer.lr, 1e-3);
  EXPECT_EQ(tiny.schedule.warmup_steps, 10);
  EXPECT_EQ(tiny.data.validation.every, 50);
  EXPECT_EQ(tiny.data.validation.fraction, 0.05);
}

TEST(TrainConfig, RecipesNeedTheirPlaceholdersSet) {
  expect_invalid(
      [] {
        load_train_config((kRepoRoot / "configs/llama2-7b-freqkv.yaml").string(),
                          {"data.train=[a.bin]"});
      },
      {"model.path", "model.init_config", "both are empty"});
  expect_invalid(
      [] {
        load_train_config((kRepoRoot / "configs/llama2-7b-freqkv.yaml").string(),
                          {"model.path=/m"});
      },
      {"data.train", "at least one"});
}

TEST(TrainConfig, FileMergesOverDefaults) {
  const fs::path path = write_config("merge.yaml",
                                     "optimizer:\n"
                                     "  lr: 3.0e-4\n"
                                     "data:\n"
                                     "  seq_len: 4096\n"
                                     "  validation:\n"
                                     "    files: [val.bin]\n"
                                     "    every: 50\n");
  const TrainConfig config = load_train_config(path.string(), kRequired);
  EXPECT_EQ(config.optimizer.lr, 3e-4);
  EXPECT_EQ(config.optimizer.beta2, 0.999);  // untouched keys of a section keep their defaults
  EXPECT_EQ(config.data.seq_len, 4096);
  EXPECT_EQ(config.data.batch_size, 1);
  EXPECT_EQ(config.data.validation.files, std::vector<std::string>{"val.bin"});
  EXPECT_EQ(config.data.validation.every, 50);
  EXPECT_EQ(config.data.validation.batches, 4);
}

TEST(TrainConfig, SetOverridesFileAndParsesYamlValues) {
  const fs::path path = write_config("set.yaml", "optimizer:\n  lr: 1.0e-4\n");
  const TrainConfig config = load_train_config(
      path.string(), with_required({"optimizer.lr=3e-4", "lora.targets=[q_proj,v_proj]",
                                    "data.train=[x.bin, y.bin]", "freqkv.enabled=false",
                                    "checkpoint.resume=latest", "data.validation.files=[]",
                                    "schedule.kind=cosine", "precision=fp64"}));
  EXPECT_EQ(config.optimizer.lr, 3e-4);
  EXPECT_EQ(config.lora.targets, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(config.data.train, (std::vector<std::string>{"x.bin", "y.bin"}));
  EXPECT_FALSE(config.freqkv.enabled);
  EXPECT_EQ(config.checkpoint.resume, "latest");
  EXPECT_EQ(config.schedule.kind, LrScheduleKind::Cosine);
  EXPECT_EQ(config.precision, TrainPrecision::FP64);

  // Later overrides win; an empty value is the empty string.
  const TrainConfig later = load_text("", {"checkpoint.resume=latest", "checkpoint.resume="});
  EXPECT_EQ(later.checkpoint.resume, "");
  // A whole section can be given as a YAML mapping.
  const TrainConfig section = load_text("", {"parallel={tp: 2, dp: 4}"});
  EXPECT_EQ(section.parallel.tp, 2);
  EXPECT_EQ(section.parallel.sp, 1);
  EXPECT_EQ(section.parallel.dp, 4);
}

TEST(TrainConfig, UnknownKeysInFileNameThePathTheFileAndTheValidKeys) {
  const fs::path path = write_config("unknown.yaml",
                                     "data:\n"
                                     "  validation:\n"
                                     "    evry: 10\n");
  expect_invalid([&] { load_train_config(path.string(), kRequired); },
                 {"'data.validation.evry'", path.string() + ":3", "did you mean",
                  "valid keys of section 'data.validation'", "files, fraction, every, batches"});
  expect_invalid([] { load_text("optimiser:\n  lr: 1.0\n"); },
                 {"'optimiser'", "test.yaml:1", "valid top-level keys", "optimizer"});
  expect_invalid([] { load_text("model:\n  path: a\n  path: b\n"); }, {"model.path", "twice"});
  expect_invalid([] { load_text("optimizer: 3\n"); },
                 {"'optimizer'", "is a section", "lr, beta1"});
  expect_invalid([] { load_text("optimizer:\n  lr:\n    value: 1\n"); },
                 {"'optimizer.lr'", "not a section"});
  expect_invalid([] { load_text("- a\n- b\n"); }, {"test.yaml", "mapping"});
  expect_invalid([] { load_text("model: [\n"); }, {"test.yaml", "YAML syntax error"});
}

TEST(TrainConfig, UnknownKeysInSetNameThePath) {
  expect_invalid([] { load_text("", {"optimizer.lrr=3e-4"}); },
                 {"'optimizer.lrr'", "--set optimizer.lrr=3e-4", "did you mean 'optimizer.lr'",
                  "valid keys of section 'optimizer'", "weight_decay"});
  expect_invalid([] { load_text("", {"optimiser.lr=1"}); },
                 {"'optimiser'", "valid top-level keys"});
  expect_invalid([] { load_text("", {"optimizer.lr.x=1"}); },
                 {"'optimizer.lr'", "is a value, not a section"});
  expect_invalid([] { load_text("", {"lr"}); }, {"malformed override 'lr'", "key.path=value"});
  expect_invalid([] { load_text("", {"optimizer..lr=1"}); }, {"malformed override"});
  expect_invalid([] { load_text("", {"lora.targets=[q_proj"}); },
                 {"--set lora.targets=[q_proj", "YAML syntax error"});
}

TEST(TrainConfig, WrongTypesNameKeyValueAndSource) {
  const fs::path path = write_config("types.yaml", "data:\n  seq_len: long\n");
  expect_invalid([&] { load_train_config(path.string(), kRequired); },
                 {"'data.seq_len'", "'long'", path.string() + ":2", "expected an integer"});
  expect_invalid([] { load_text("", {"optimizer.lr=fast"}); },
                 {"'optimizer.lr'", "'fast'", "--set optimizer.lr=fast", "expected a number"});
  expect_invalid([] { load_text("", {"data.seq_len=1.5"}); }, {"data.seq_len", "integer"});
  expect_invalid([] { load_text("", {"data.seq_len=1e4"}); }, {"data.seq_len", "integer"});
  expect_invalid([] { load_text("", {"data.batch_size=0"}); }, {"data.batch_size", ">= 1"});
  expect_invalid([] { load_text("", {"freqkv.sink=-1"}); }, {"freqkv.sink", ">= 0"});
  expect_invalid([] { load_text("", {"optimizer.lr=-1e-4"}); }, {"optimizer.lr", "positive"});
  expect_invalid([] { load_text("", {"optimizer.lr=nan"}); }, {"optimizer.lr", "number"});
  expect_invalid([] { load_text("", {"optimizer.beta2=1.0"}); }, {"optimizer.beta2", "[0, 1)"});
  expect_invalid([] { load_text("", {"freqkv.ratio=0"}); }, {"freqkv.ratio", "'0'", "(0, 1]"});
  expect_invalid([] { load_text("", {"freqkv.ratio=1.5"}); }, {"freqkv.ratio", "(0, 1]"});
  expect_invalid([] { load_text("", {"freqkv.enabled=maybe"}); },
                 {"freqkv.enabled", "'maybe'", "true or false"});
  expect_invalid([] { load_text("", {"data.train=a.bin"}); },
                 {"data.train", "'a.bin'", "expected a list", "[a.bin]"});
  expect_invalid([] { load_text("", {"model.path=[a, b]"}); }, {"model.path", "expected a string"});
  expect_invalid([] { load_text("", {"data.eos_token=-2"}); }, {"data.eos_token", ">= -1"});
  expect_invalid([] { load_text("", {"data.validation.fraction=1"}); },
                 {"data.validation.fraction", "[0, 1)"});
  expect_invalid([] { load_text("", {"lora.dropout=0.1"}); },
                 {"lora.dropout", "'0.1'", "not supported"});
  // FreqKV's own constraints, with the derived values.
  expect_invalid([] { load_text("", {"freqkv.cache=4", "freqkv.sink=4"}); },
                 {"freqkv", "sink size must be smaller"});
  expect_invalid([] { load_text("", {"freqkv.cache=6", "freqkv.ratio=0.1"}); },
                 {"freqkv", "L = floor"});
  // With FreqKV off its settings are not checked against each other.
  EXPECT_NO_THROW(load_text("", {"freqkv.enabled=false", "freqkv.cache=4", "freqkv.sink=4"}));
}

TEST(TrainConfig, EnumValues) {
  expect_invalid([] { load_text("", {"device=tpu"}); }, {"'device'", "'tpu'", "cpu | cuda"});
  expect_invalid([] { load_text("", {"precision=fp16"}); },
                 {"'precision'", "'fp16'", "fp32 | fp64 | bf16"});
  expect_invalid([] { load_text("", {"precision=bf16"}); }, {"precision", "bf16", "cuda"});
  expect_invalid([] { load_text("", {"device=cuda"}); }, {"precision", "'fp32'", "bf16"});
  expect_invalid([] { load_text("", {"schedule.kind=step"}); },
                 {"'schedule.kind'", "'step'", "constant | cosine | linear"});
  expect_invalid([] { load_text("", {"data.token_dtype=int8"}); },
                 {"data.token_dtype", "'int8'", "uint16 | uint32 | int32"});
  expect_invalid([] { load_text("", {"lora.targets=[q_proj, qkv_proj]"}); },
                 {"lora.targets", "qkv_proj", "gate_proj up_proj down_proj"});
  expect_invalid([] { load_text("", {"lora.targets=[q_proj, q_proj]"}); },
                 {"lora.targets", "twice"});
  expect_invalid([] { load_text("", {"lora.targets=[]"}); }, {"lora.targets", "no layer"});
  expect_invalid([] { load_text("", {"freqkv.compression=dct"}); },
                 {"'freqkv.compression'", "'dct'", "auto | gemm | fft"});
  EXPECT_EQ(load_text("", {"freqkv.compression=fft"}).freqkv_compression, CompressionImpl::Fft);
  EXPECT_EQ(load_text("", {"freqkv.compression=gemm"}).freqkv_compression, CompressionImpl::Gemm);

  const TrainConfig cuda = load_text("", {"device=cuda", "precision=bf16",
                                          "data.token_dtype=int32", "schedule.kind=linear"});
  EXPECT_EQ(cuda.device, TrainDevice::Cuda);
  EXPECT_EQ(cuda.precision, TrainPrecision::BF16);
  EXPECT_EQ(cuda.data.token_dtype, TokenDType::I32);
  EXPECT_EQ(cuda.schedule.kind, LrScheduleKind::Linear);
  EXPECT_STREQ(train_device_name(cuda.device), "cuda");
  EXPECT_STREQ(train_precision_name(cuda.precision), "bf16");
  EXPECT_STREQ(lr_schedule_kind_name(cuda.schedule.kind), "linear");
  // LoRA off: no adapter targets are needed.
  EXPECT_FALSE(load_text("", {"lora.enabled=false", "lora.targets=[]"}).lora.enabled);
}

TEST(TrainConfig, CrossKeyChecks) {
  expect_invalid([] { load_text("", {"model.path=/m"}); },
                 {"exactly one", "both are set", "/m", "model.json"});
  expect_invalid([] { load_text("", {"schedule.steps=10", "schedule.warmup_steps=11"}); },
                 {"schedule.warmup_steps", "exceeds schedule.steps = 10"});
  expect_invalid([] { load_text("", {"data.validation.every=10"}); },
                 {"data.validation.every", "fraction"});
  expect_invalid(
      [] { load_text("", {"data.validation.files=[v.bin]", "data.validation.fraction=0.1"}); },
      {"data.validation.fraction", "not both"});
  expect_invalid([] { load_text("", {"lora.trainable=[embed_tokens, '']"}); },
                 {"lora.trainable", "every parameter"});
  expect_invalid([] { load_text("", {"logging.run_dir="}); }, {"logging.run_dir", "empty"});
}

TEST(TrainConfig, ResolvedYamlRoundTrips) {
  const std::vector<std::vector<std::string>> cases = {
      {},
      {"optimizer.lr=3e-4", "lora.targets=[q_proj,v_proj]", "data.train=[a b.bin, 'c:d.bin']",
       "model.init_config=\"null\"", "checkpoint.resume=runs/x/step-100",
       "data.validation.fraction=.05", "data.validation.every=7", "schedule.kind=cosine",
       "schedule.min_lr_ratio=0.1", "lora.alpha=32", "data.seed=18446744073709551",
       "logging.metrics_file=\"with # hash and \\\"quotes\\\"\""},
  };
  for (const std::vector<std::string>& overrides : cases) {
    const TrainConfig first = load_text("", overrides);
    const TrainConfig second =
        load_train_config_from_string(first.resolved_yaml, {}, "resolved.yaml");
    EXPECT_TRUE(first == second) << first.resolved_yaml << "\n---\n" << second.resolved_yaml;
    EXPECT_EQ(first.resolved_yaml, second.resolved_yaml);
  }
  const TrainConfig quoted = load_text("", {"model.init_config=\"null\"",
                                            "logging.metrics_file=\"a # b\""});
  EXPECT_EQ(quoted.model.init_config, "null");
  EXPECT_EQ(quoted.logging.metrics_file, "a # b");
  // Numbers keep the spelling they were given, and the defaults' comments are kept.
  const std::string resolved = load_text("", {"optimizer.lr=3e-4"}).resolved_yaml;
  EXPECT_NE(resolved.find("  lr: 3e-4  # peak learning rate\n"), std::string::npos) << resolved;
  // A changed config gives a different struct.
  EXPECT_TRUE(load_text("") != load_text("", {"data.seed=7"}));
}

TEST(TrainConfig, MissingFile) {
  EXPECT_THROW(load_train_config("/nonexistent/config.yaml", {}), std::runtime_error);
  try {
    load_train_config("/nonexistent/config.yaml", {});
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("/nonexistent/config.yaml"), std::string::npos);
  }
}

TEST(LearningRate, WarmupThenConstant) {
  TrainConfig config = load_text("", {"optimizer.lr=1e-3", "schedule.warmup_steps=4",
                                      "schedule.steps=100"});
  EXPECT_DOUBLE_EQ(learning_rate(config, 1), 0.25e-3);
  EXPECT_DOUBLE_EQ(learning_rate(config, 2), 0.5e-3);
  EXPECT_DOUBLE_EQ(learning_rate(config, 4), 1e-3);
  EXPECT_DOUBLE_EQ(learning_rate(config, 5), 1e-3);
  EXPECT_DOUBLE_EQ(learning_rate(config, 100), 1e-3);
  EXPECT_DOUBLE_EQ(learning_rate(config, 1000), 1e-3);
  EXPECT_THROW(learning_rate(config, 0), std::invalid_argument);

  // The authors' recipe: 2e-5 reached at step 20, from 1e-6 at step 1.
  const TrainConfig recipe = load_text("");
  EXPECT_DOUBLE_EQ(learning_rate(recipe, 1), 1e-6);
  EXPECT_DOUBLE_EQ(learning_rate(recipe, 10), 1e-5);
  EXPECT_DOUBLE_EQ(learning_rate(recipe, 20), 2e-5);
  EXPECT_DOUBLE_EQ(learning_rate(recipe, 500), 2e-5);

  config.schedule.warmup_steps = 0;  // no warm-up: the peak from step 1
  EXPECT_DOUBLE_EQ(learning_rate(config, 1), 1e-3);
}

TEST(LearningRate, CosineDecay) {
  // Warm-up 10, decay over steps 10..110 from 1e-3 to 1e-4.
  const TrainConfig config =
      load_text("", {"optimizer.lr=1e-3", "schedule.warmup_steps=10", "schedule.steps=110",
                     "schedule.kind=cosine", "schedule.min_lr_ratio=0.1"});
  EXPECT_DOUBLE_EQ(learning_rate(config, 5), 0.5e-3);
  EXPECT_DOUBLE_EQ(learning_rate(config, 10), 1e-3);
  // Step 60: halfway, cos(pi/2) = 0 -> 1e-4 + 0.9e-3 * 0.5.
  EXPECT_NEAR(learning_rate(config, 60), 0.55e-3, 1e-15);
  // Step 35: a quarter, 1e-4 + 0.9e-3 * 0.5 * (1 + cos(pi/4)).
  EXPECT_NEAR(learning_rate(config, 35), 1e-4 + 0.45e-3 * (1.0 + std::sqrt(0.5)), 1e-15);
  EXPECT_NEAR(learning_rate(config, 110), 1e-4, 1e-15);
  EXPECT_NEAR(learning_rate(config, 200), 1e-4, 1e-15);  // after the end: the floor
}

TEST(LearningRate, LinearDecay) {
  const TrainConfig config =
      load_text("", {"optimizer.lr=2e-3", "schedule.warmup_steps=0", "schedule.steps=100",
                     "schedule.kind=linear"});
  EXPECT_NEAR(learning_rate(config, 1), 2e-3 * 0.99, 1e-15);
  EXPECT_NEAR(learning_rate(config, 25), 1.5e-3, 1e-15);
  EXPECT_NEAR(learning_rate(config, 50), 1e-3, 1e-15);
  EXPECT_NEAR(learning_rate(config, 100), 0.0, 1e-15);
  // Warm-up as long as the run: the warm-up alone, ending at the peak.
  const TrainConfig all_warmup =
      load_text("", {"optimizer.lr=2e-3", "schedule.warmup_steps=10", "schedule.steps=10",
                     "schedule.kind=linear"});
  EXPECT_DOUBLE_EQ(learning_rate(all_warmup, 10), 2e-3);
  EXPECT_DOUBLE_EQ(learning_rate(all_warmup, 11), 0.0);
}

}  // namespace
}  // namespace freqkv
