// The whole model on the GPU: LlamaModel<bf16> on the CUDA backend against LlamaModel<float> on
// the CPU backend, with FreqKV compressing across several chunks, and a short training run on
// each from the same start.
//
// Both models get exactly the same weights (the fp32 reference's, rounded to bf16, are loaded
// into both), so what differs is only the arithmetic: bf16 storage of every activation and
// gradient on the GPU against fp32 on the CPU. The bounds are those of bf16 (8 significant bits,
// a relative rounding of 2^-9 ≈ 0.2% per stored value, compounded through two layers, the
// compressions and the classifier): the loss within 2% and each parameter's gradient within 5% of
// its norm. An error in a kernel, a layout or an index shows up as tens of percent or NaN.
//
// The tests need a CUDA device and skip themselves (GTEST_SKIP) without one; ctest label: gpu.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/token_file.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_backend.h"
#include "model/hf_config.h"
#include "model/llama_model.h"
#include "trainer/training_run.h"

namespace freqkv {
namespace {

namespace fs = std::filesystem;

// hidden 64, 2 layers, 4 query heads sharing 2 KV heads of 16, vocabulary 256.
ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 256;
  c.hidden_size = 64;
  c.intermediate_size = 160;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 32;
  return c;
}

// Cache 32, sink 2, ratio 0.5: 15 compressed rows, 15 new tokens per chunk, so T = 96 has six
// chunks and five compressions chained through the memory.
FreqKVConfig tiny_freqkv() {
  FreqKVConfig f;
  f.cache = 32;
  f.sink = 2;
  f.ratio = 0.5;
  return f;
}

constexpr int64_t kSeqLen = 96;
constexpr int64_t kBatch = 2;

float round_bf16(float x) { return bf16::to_float(bf16::from_float(x)); }

double norm_of(const std::vector<float>& x) {
  double sum = 0;
  for (float v : x) sum += static_cast<double>(v) * v;
  return std::sqrt(sum);
}

double distance(const std::vector<float>& a, const std::vector<float>& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    sum += d * d;
  }
  return std::sqrt(sum);
}

TEST(CudaModelTest, LossAndEveryGradientMatchTheCpuModel) {
  if (!cuda_device_available()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig config = tiny_config();
  const FreqKVConfig freqkv = tiny_freqkv();
  ASSERT_GT(FreqKVSchedule::build(kSeqLen, freqkv).compressions.size(), 2u)
      << "the test must compress across several chunks";

  CpuKernels<float> cpu;
  LlamaModel<float> reference(config, freqkv, cpu);
  reference.init_random(/*seed=*/7, /*std=*/0.05);
  const std::unique_ptr<Kernels<bf16>> gpu = make_cuda_kernels(0);
  LlamaModel<bf16> model(config, freqkv, *gpu);
  const ParamTable& table = reference.param_table();
  for (size_t i = 0; i < table.size(); ++i) {
    std::vector<float> weights = reference.get_param(i);
    for (float& w : weights) w = round_bf16(w);
    reference.set_param(i, weights.data());
    model.set_param(i, weights.data());
  }

  std::mt19937 rng(11);
  std::vector<int32_t> inputs(kBatch * kSeqLen), targets(kBatch * kSeqLen);
  for (size_t i = 0; i < inputs.size(); ++i) {
    inputs[i] = static_cast<int32_t>(rng() % config.vocab_size);
    targets[i] = static_cast<int32_t>(rng() % config.vocab_size);
  }
  targets[5] = -1;  // an ignored position, as padding would be
  const double grad_scale = 1.0 / static_cast<double>(kBatch * kSeqLen - 1);

  reference.zero_grads();
  model.zero_grads();
  const LossSum want = reference.forward(inputs.data(), targets.data(), kBatch, kSeqLen, grad_scale);
  const LossSum got = model.forward(inputs.data(), targets.data(), kBatch, kSeqLen, grad_scale);
  reference.backward();
  model.backward();

  ASSERT_EQ(got.count, want.count);
  const double want_loss = want.sum / static_cast<double>(want.count);
  const double got_loss = got.sum / static_cast<double>(got.count);
  ASSERT_TRUE(std::isfinite(got_loss));
  EXPECT_NEAR(got_loss, want_loss, 2e-2 * std::abs(want_loss))
      << "GPU loss " << got_loss << ", CPU fp32 loss " << want_loss;

  for (size_t i = 0; i < table.size(); ++i) {
    const std::vector<float> want_grad = reference.get_grad(i);
    const std::vector<float> got_grad = model.get_grad(i);
    ASSERT_EQ(got_grad.size(), want_grad.size()) << table[i].name;
    const double scale = norm_of(want_grad);
    ASSERT_GT(scale, 0.0) << table[i].name << ": the reference gradient is zero";
    const double relative = distance(got_grad, want_grad) / scale;
    EXPECT_LE(relative, 5e-2) << table[i].name << ": |gpu - cpu| / |cpu| = " << relative
                              << " (|cpu| = " << scale << ")";
  }
}

// 20 AdamW steps of full fine-tuning from the same initialisation (the same seed; the GPU keeps
// its weights in bf16) on the same data: the loss curves must track each other.
class CudaTrainingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Per process: ctest runs this test under several configurations at once (emulated, twice).
    dir_ = fs::path(::testing::TempDir()) / ("freqkv_cuda_training_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    write_hf_config(tiny_config(), (dir_ / "config.json").string());
    // A learnable stream: a repeating pattern with some noise.
    std::mt19937 rng(3);
    std::vector<int32_t> tokens;
    for (int i = 0; i < 20000; ++i) tokens.push_back(rng() % 10 == 0 ? rng() % 256 : (i * 7) % 61);
    write_token_file((dir_ / "tokens.bin").string(), tokens, TokenDType::U16);
  }
  void TearDown() override { fs::remove_all(dir_); }

  TrainConfig config(const std::string& run_name) const {
    const FreqKVConfig f = tiny_freqkv();
    return load_train_config(
        "", {"model.init_config=" + (dir_ / "config.json").string(),
             "model.init_seed=5",
             "data.train=[" + (dir_ / "tokens.bin").string() + "]",
             "data.seq_len=" + std::to_string(kSeqLen),
             "data.batch_size=4",
             "data.grad_accum=1",
             "freqkv.cache=" + std::to_string(f.cache),
             "freqkv.sink=" + std::to_string(f.sink),
             "freqkv.ratio=0.5",
             "optimizer.lr=3e-3",
             "optimizer.weight_decay=0.01",
             "schedule.steps=20",
             "schedule.warmup_steps=2",
             "lora.enabled=false",
             "checkpoint.every=0",
             "checkpoint.keep_last=1",
             "logging.every=1",
             "logging.run_dir=" + (dir_ / run_name).string()});
  }

  // The loss of every step, from the run's metrics.jsonl.
  std::vector<double> losses(const std::string& run_name) const {
    std::vector<double> values;
    std::ifstream in(dir_ / run_name / "metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j.contains("loss")) values.push_back(j["loss"].get<double>());
    }
    return values;
  }

  fs::path dir_;
};

TEST_F(CudaTrainingTest, TwentyStepsTrackTheCpuRun) {
  if (!cuda_device_available()) GTEST_SKIP() << "no CUDA device";
  {
    CpuKernels<float> cpu;
    TrainingRun<float>(config("cpu"), cpu).run();
  }
  {
    const std::unique_ptr<Kernels<bf16>> gpu = make_cuda_kernels(0);
    TrainingRun<bf16>(config("gpu"), *gpu).run();
  }
  const std::vector<double> cpu = losses("cpu"), gpu = losses("gpu");
  ASSERT_EQ(cpu.size(), 20u);
  ASSERT_EQ(gpu.size(), 20u);
  for (size_t step = 0; step < cpu.size(); ++step) {
    ASSERT_TRUE(std::isfinite(gpu[step])) << "step " << step + 1;
    EXPECT_NEAR(gpu[step], cpu[step], 0.05 * cpu[step])
        << "step " << step + 1 << ": GPU loss " << gpu[step] << ", CPU fp32 loss " << cpu[step];
  }
  EXPECT_NEAR(gpu.back(), cpu.back(), 0.05 * cpu.back()) << "last step";
  // Both runs learned something, so the comparison is not between two flat curves.
  EXPECT_LT(cpu.back(), cpu.front() - 0.3) << "the CPU run did not learn";
  EXPECT_LT(gpu.back(), gpu.front() - 0.3) << "the GPU run did not learn";
}

}  // namespace
}  // namespace freqkv
