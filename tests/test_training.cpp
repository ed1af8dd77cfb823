// The training loop end to end on a tiny model: stopping and resuming is bitwise identical to a
// straight run, LoRA trains only what it should, the loss falls, export round-trips, and a
// corrupt checkpoint is refused.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "data/token_file.h"
#include "kernels/cpu/cpu_kernels.h"
#include "model/hf_checkpoint.h"
#include "model/hf_config.h"
#include "trainer/checkpoint_dir.h"
#include "trainer/model_checkpoint.h"
#include "trainer/training_run.h"

namespace freqkv {
namespace {

namespace fs = std::filesystem;

class TrainingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("freqkv_training_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    ModelConfig c;
    c.vocab_size = 40;
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 4;
    c.max_position_embeddings = 32;
    write_hf_config(c, (dir_ / "config.json").string());
    // A learnable stream: a repeating pattern with some noise.
    std::mt19937 rng(3);
    std::vector<int32_t> tokens;
    for (int i = 0; i < 6000; ++i) tokens.push_back(rng() % 10 == 0 ? rng() % 40 : (i * 7) % 23);
    write_token_file((dir_ / "tokens.bin").string(), tokens, TokenDType::U16);
  }
  void TearDown() override { fs::remove_all(dir_); }

  TrainConfig config(std::vector<std::string> extra) const {
    std::vector<std::string> o = {
        "model.init_config=" + (dir_ / "config.json").string(),
        "data.train=[" + (dir_ / "tokens.bin").string() + "]",
        "data.seq_len=40",
        "data.batch_size=2",
        "data.grad_accum=2",
        "freqkv.cache=16",
        "freqkv.sink=2",
        "freqkv.ratio=0.5",
        "optimizer.lr=3e-3",
        "optimizer.weight_decay=0.01",
        "schedule.steps=6",
        "schedule.warmup_steps=2",
        "schedule.kind=cosine",
        "lora.enabled=false",
        "checkpoint.every=2",
        "checkpoint.keep_last=0",
        "logging.run_dir=" + (dir_ / "run").string(),
    };
    o.insert(o.end(), extra.begin(), extra.end());
    return load_train_config("", o);
  }

  std::vector<std::string> metric_losses(const std::string& run_dir) const {
    std::vector<std::string> losses;  // as printed: full precision, compared exactly
    std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j.contains("loss")) losses.push_back(j["step"].dump() + ":" + j["loss"].dump());
    }
    return losses;
  }

  fs::path dir_;
};

TEST_F(TrainingTest, ResumingIsBitwiseIdenticalToAStraightRun) {
  const std::string straight = (dir_ / "straight").string(), split = (dir_ / "split").string();
  {
    CpuKernels<float> k;
    TrainingRun<float>(config({"logging.run_dir=" + straight}), k).run();
  }
  {
    CpuKernels<float> k;
    const TrainSummary s = TrainingRun<float>(config({"logging.run_dir=" + split}), k).run(3);
    EXPECT_EQ(s.last_step, 3);
  }
  {
    CpuKernels<float> k;
    const TrainSummary s =
        TrainingRun<float>(config({"logging.run_dir=" + split, "checkpoint.resume=latest"}), k).run();
    EXPECT_EQ(s.first_step, 4);
    EXPECT_EQ(s.last_step, 6);
  }
  const std::vector<std::string> a = metric_losses(straight), b = metric_losses(split);
  ASSERT_EQ(a.size(), 6u);
  EXPECT_EQ(a, b);
  const CheckpointReader ra = CheckpointReader::open(CheckpointDir(straight + "/checkpoints").latest());
  const CheckpointReader rb = CheckpointReader::open(CheckpointDir(split + "/checkpoints").latest());
  EXPECT_EQ(ra.int_attribute("step"), 6);
  EXPECT_EQ(rb.int_attribute("step"), 6);
  const std::vector<std::string> names = ra.tensor_names();
  ASSERT_EQ(names, rb.tensor_names());
  EXPECT_GT(names.size(), 20u);
  for (const std::string& n : names) EXPECT_EQ(ra.read_tensor(n), rb.read_tensor(n)) << n;
}

TEST_F(TrainingTest, RecomputeGivesTheSameRunInLessPeakMemory) {
  // Each step reports the backend's memory; recomputation keeps one layer's activations instead
  // of all of them, so its peak is lower, and its losses are those of the plain run.
  const auto run = [&](const std::string& name, bool recompute) {
    CpuKernels<float> k;
    TrainingRun<float>(config({"logging.run_dir=" + (dir_ / name).string(),
                               std::string("recompute=") + (recompute ? "true" : "false"),
                               "data.seq_len=200", "checkpoint.every=0"}),
                       k)
        .run(3);
    std::vector<nlohmann::json> lines;
    std::ifstream in(dir_ / name / "metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j.contains("loss")) lines.push_back(j);
    }
    return lines;
  };
  const std::vector<nlohmann::json> plain = run("plain", false), replayed = run("recompute", true);
  ASSERT_EQ(plain.size(), 3u);
  ASSERT_EQ(replayed.size(), 3u);
  for (size_t s = 0; s < plain.size(); ++s) {
    EXPECT_NEAR(plain[s]["loss"].get<double>(), replayed[s]["loss"].get<double>(),
                1e-6 * plain[s]["loss"].get<double>());
    const int64_t memory = plain[s]["memory_bytes"], peak = plain[s]["peak_memory_bytes"];
    EXPECT_GT(memory, 0);
    EXPECT_GE(peak, memory);
    EXPECT_LT(replayed[s]["peak_memory_bytes"].get<int64_t>(), peak) << "step " << s + 1;
  }
  std::printf("peak memory per step: %lld bytes plain, %lld with recomputation\n",
              static_cast<long long>(plain.back()["peak_memory_bytes"].get<int64_t>()),
              static_cast<long long>(replayed.back()["peak_memory_bytes"].get<int64_t>()));
}

TEST_F(TrainingTest, LossFalls) {
  CpuKernels<float> k;
  const TrainSummary s =
      TrainingRun<float>(config({"schedule.steps=40", "checkpoint.every=0"}), k).run();
  const std::vector<std::string> losses = metric_losses((dir_ / "run").string());
  const double first = std::stod(losses.front().substr(losses.front().find(':') + 1));
  EXPECT_LT(s.last_loss, first - 0.5) << "first " << first << " last " << s.last_loss;
}

TEST_F(TrainingTest, LoraTrainsAdaptersAndChosenModulesOnly) {
  CpuKernels<float> k;
  TrainingRun<float> run(config({"lora.enabled=true", "lora.rank=2", "lora.trainable=[norm]",
                                 "checkpoint.every=0"}),
                         k);
  LlamaModel<float>& model = run.model();
  std::vector<std::vector<float>> before;
  for (size_t i = 0; i < model.param_table().size(); ++i) before.push_back(model.get_param(i));
  run.run();
  for (size_t i = 0; i < model.param_table().size(); ++i) {
    const ParamSpec& s = model.param_table()[i];
    const bool trained = s.is_lora() || s.name.find("norm") != std::string::npos;
    if (trained) {
      EXPECT_NE(model.get_param(i), before[i]) << s.name;
    } else {
      EXPECT_EQ(model.get_param(i), before[i]) << s.name;
    }
  }
}

TEST_F(TrainingTest, ExportedModelGivesTheSameLoss) {
  CpuKernels<float> k;
  TrainingRun<float> run(config({"lora.enabled=true", "lora.rank=2", "checkpoint.every=0"}), k);
  const TrainSummary s = run.run();

  // Export as `freqkv export` does: checkpoint -> model -> merged HF directory.
  const CheckpointReader reader = CheckpointReader::open(s.last_checkpoint);
  FreqKVConfig f = run.model().freqkv_config();
  LlamaModel<float> trained(checkpoint_model_config(reader), f, k, checkpoint_lora_config(reader));
  load_checkpoint_weights(reader, trained);
  const std::string out = (dir_ / "export").string();
  save_hf_model(trained, out);
  save_peft_adapter(trained, (dir_ / "adapter").string());

  LlamaModel<float> exported(read_hf_config(out + "/config.json"), f, k);
  load_hf_weights(exported, SafetensorsReader::open_model_dir(out));
  const SafetensorsReader adapter = SafetensorsReader::open_file((dir_ / "adapter/adapter_model.safetensors").string());
  EXPECT_TRUE(adapter.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));

  const TokenFile tokens = TokenFile::open((dir_ / "tokens.bin").string(), TokenDType::U16);
  std::vector<int32_t> in(80), target(80);
  tokens.read(100, 80, in.data());
  tokens.read(101, 80, target.data());
  const double a = trained.forward(in.data(), target.data(), 2, 40, 0.0).sum;
  const double b = exported.forward(in.data(), target.data(), 2, 40, 0.0).sum;
  EXPECT_NEAR(a, b, 1e-5 * std::abs(a));
}

TEST_F(TrainingTest, CorruptCheckpointIsRefusedOnResume) {
  {
    CpuKernels<float> k;
    TrainingRun<float>(config({}), k).run(2);
  }
  const std::string path = CheckpointDir((dir_ / "run/checkpoints").string()).latest();
  ASSERT_FALSE(path.empty());
  fs::resize_file(path, fs::file_size(path) / 2);
  CpuKernels<float> k;
  try {
    TrainingRun<float>(config({"checkpoint.resume=" + path}), k);
    FAIL() << "a truncated checkpoint was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace freqkv
