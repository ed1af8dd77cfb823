// Sequence and data parallelism against the single-rank model, under mpirun (2 and 4 ranks):
//   - loss and every gradient of the model with its FreqKV chunks split over sp ranks (double
//     precision: equal to rounding; float: within fp32 rounding);
//   - short training runs give the same loss curve under every grid that fits the world size;
//   - a checkpoint written under one grid resumes under another and continues identically.
// Every rank runs the single-rank reference itself (with no communicator), so nothing but the
// parallel run crosses ranks.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "comm/mpi_communicator.h"
#include "comm/parallel_grid.h"
#include "data/token_file.h"
#include "kernels/cpu/cpu_kernels.h"
#include "model/hf_config.h"
#include "trainer/training_run.h"
#include "tests/test_support.h"

namespace freqkv {
namespace {

namespace fs = std::filesystem;

MpiCommunicator& world() {
  static MpiCommunicator comm(MPI_COMM_WORLD, "world");
  return comm;
}

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 40;  // divisible by every tp tried, as are heads and FFN columns
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 4;
  c.rope_theta = 500.0;
  return c;
}

struct Batch {
  int64_t batch, seq_len;
  std::vector<int32_t> inputs, targets;  // full sequences
};

Batch make_batch(int64_t batch, int64_t seq_len, int64_t vocab, uint64_t seed) {
  Batch b{batch, seq_len, {}, {}};
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < batch * seq_len; ++i) {
    b.inputs.push_back(static_cast<int32_t>(rng() % vocab));
    b.targets.push_back(i % 5 == 2 ? -1 : static_cast<int32_t>(rng() % vocab));
  }
  return b;
}

// Loss sum and gradients of the whole batch: on one rank, or with the chunks split over `sp`
// (each rank feeds its shard's tokens; gradients and losses are summed over the group).
template <typename T>
std::pair<double, std::vector<std::vector<double>>> loss_and_grads(const ModelConfig& c,
                                                                   const FreqKVConfig& f,
                                                                   const LoraConfig& lora,
                                                                   const Batch& data,
                                                                   const ModelParallel& parallel,
                                                                   bool recompute = false) {
  CpuKernels<T> k;
  Communicator* sp = parallel.sp;
  LlamaModel<T> model(c, f, k, lora, parallel);
  model.set_recompute(recompute);
  model.init_random(77, 0.3);
  if (lora.enabled) {  // non-zero B so that every adapter factor carries gradient
    for (size_t i = 0; i < model.param_table().size(); ++i) {
      if (model.param_table()[i].role != ParamRole::kLoraB) continue;
      std::vector<double> v(static_cast<size_t>(model.param_table()[i].numel()));
      for (size_t e = 0; e < v.size(); ++e) v[e] = 0.05 * std::sin(1.0 + e);
      model.set_param(i, v.data());
    }
  }
  if (parallel.tp && parallel.tp->size() > 1) {  // the weights really are split
    const size_t q = static_cast<size_t>(model.param_table().find("model.layers.0.self_attn.q_proj.weight"));
    EXPECT_TRUE(model.sharded(q));
    EXPECT_EQ(model.local_numel(q) * parallel.tp->size(), model.param_table()[q].numel());
  }
  const SequenceShard sh = model.sequence_shard(data.seq_len);
  std::vector<int32_t> inputs, targets;
  for (int64_t b = 0; b < data.batch; ++b) {
    const auto in = data.inputs.begin() + b * data.seq_len + sh.token_begin;
    const auto tg = data.targets.begin() + b * data.seq_len + sh.token_begin;
    inputs.insert(inputs.end(), in, in + sh.tokens);
    targets.insert(targets.end(), tg, tg + sh.tokens);
  }
  model.zero_grads();
  double loss = model.forward(inputs.data(), targets.data(), data.batch, data.seq_len, 0.01).sum;
  model.backward();
  if (sp) {
    sp->all_reduce_sum(model.grads(), model.arena_numel());
    loss = sp->all_reduce_scalar(loss, ReduceOp::kSum);
  }
  std::vector<std::vector<double>> grads;  // logical: tensor-parallel shards gathered
  for (size_t i = 0; i < model.param_table().size(); ++i) grads.push_back(model.get_grad_f64(i));
  return {loss, grads};
}

double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-300);
}

template <typename T>
void expect_parallel_matches_single_rank(const FreqKVConfig& f, const LoraConfig& lora,
                                         int64_t seq_len, double tolerance, GridShape shape,
                                         bool tied = false, bool recompute = false) {
  ModelConfig c = small_config();
  c.tie_word_embeddings = tied;
  const Batch data = make_batch(2, seq_len, c.vocab_size, 5);
  const auto [ref_loss, ref_grads] = loss_and_grads<T>(c, f, lora, data, ModelParallel{});
  ParallelGrid grid(std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world"), shape);
  ModelParallel parallel;
  parallel.tp = &grid.tp();
  parallel.sp = &grid.sp();
  const auto [loss, grads] = loss_and_grads<T>(c, f, lora, data, parallel, recompute);
  EXPECT_NEAR(loss, ref_loss, tolerance * std::abs(ref_loss));
  const ParamTable table = llama_param_table(c, lora);
  ASSERT_EQ(grads.size(), table.size());
  for (size_t i = 0; i < grads.size(); ++i)
    EXPECT_LE(relative_error(grads[i], ref_grads[i]), tolerance) << table[i].name;
}

int ranks() { return world().size(); }

LoraConfig some_lora() {
  LoraConfig lora;
  lora.enabled = true;
  lora.rank = 2;
  lora.targets = {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"};  // column and row layers
  return lora;
}

TEST(SequenceParallel, LossAndGradientsMatchOneRankInDouble) {
  // C = 8, S = 2, r = 0.5: L = 3, step = 3; T = 26: chunks 8, 3 x 6: every rank count up to 4
  // gets whole chunks, memories and sinks cross every boundary.
  expect_parallel_matches_single_rank<double>(freqkv_config(8, 2, 0.5), LoraConfig(), 26, 1e-12,
                                              {1, ranks(), 1});
}

TEST(SequenceParallel, NoSinkUnevenChunksAndLoraInDouble) {
  expect_parallel_matches_single_rank<double>(freqkv_config(10, 0, 0.3), some_lora(), 37, 1e-12,
                                              {1, ranks(), 1});
}

TEST(SequenceParallel, LossAndGradientsMatchOneRankInFloat) {
  expect_parallel_matches_single_rank<float>(freqkv_config(8, 2, 0.5), LoraConfig(), 26, 1e-5,
                                             {1, ranks(), 1});
}

TEST(TensorParallel, LossAndGradientsMatchOneRankInDouble) {
  expect_parallel_matches_single_rank<double>(freqkv_config(8, 2, 0.5), LoraConfig(), 26, 1e-12,
                                              {ranks(), 1, 1});
}

TEST(TensorParallel, LoraAndTiedEmbeddingsInDouble) {
  expect_parallel_matches_single_rank<double>(freqkv_config(10, 0, 0.3), some_lora(), 37, 1e-12,
                                              {ranks(), 1, 1}, true);
}

TEST(TensorParallel, LossAndGradientsMatchOneRankInFloat) {
  expect_parallel_matches_single_rank<float>(freqkv_config(8, 2, 0.5), some_lora(), 26, 1e-5,
                                             {ranks(), 1, 1});
}

TEST(TensorAndSequenceParallel, TwoByTwoMatchesOneRankInDouble) {
  if (ranks() != 4) GTEST_SKIP() << "needs 4 ranks";
  expect_parallel_matches_single_rank<double>(freqkv_config(8, 2, 0.5), some_lora(), 26, 1e-12,
                                              {2, 2, 1});
}

TEST(SequenceParallel, LongMemoryChainsInDouble) {
  // C = 8, S = 2, r = 0.5, T = 62: 19 chunks, so every middle rank passes its memory on through
  // several compressions (M_out = A M_in + b with A a power of P's memory columns).
  expect_parallel_matches_single_rank<double>(freqkv_config(8, 2, 0.5), some_lora(), 62, 1e-12,
                                              {1, ranks(), 1});
}

// Activation recomputation replays each layer in backward: tensor-parallel all-reduces run again,
// sequence-parallel rows (sinks, memories) come from what the first run kept.
TEST(SequenceParallel, RecomputeMatchesOneRankInDouble) {
  expect_parallel_matches_single_rank<double>(freqkv_config(8, 2, 0.5), some_lora(), 26, 1e-12,
                                              {1, ranks(), 1}, false, true);
}

TEST(TensorParallel, RecomputeMatchesOneRankInDouble) {
  expect_parallel_matches_single_rank<double>(freqkv_config(10, 0, 0.3), some_lora(), 37, 1e-12,
                                              {ranks(), 1, 1}, true, true);
}

TEST(TensorAndSequenceParallel, TwoByTwoRecomputeMatchesOneRankInDouble) {
  if (ranks() != 4) GTEST_SKIP() << "needs 4 ranks";
  expect_parallel_matches_single_rank<double>(freqkv_config(8, 2, 0.5), some_lora(), 26, 1e-12,
                                              {2, 2, 1}, false, true);
}

TEST(SequenceParallel, TooFewChunksForTheRanksIsAClearError) {
  CpuKernels<double> k;
  ModelParallel parallel;
  parallel.sp = &world();
  LlamaModel<double> model(small_config(), freqkv_config(8, 2, 0.5), k, LoraConfig(), parallel);
  if (world().size() > 1) {
    EXPECT_THROW(model.sequence_shard(8), std::invalid_argument);  // one chunk only
  }
}

TEST(ZeroOne, OptimiserStateIsShardedAcrossDataParallelRanks) {
  CpuKernels<float> k;
  LlamaModel<float> model(small_config(), freqkv_config(8, 2, 0.5), k);
  model.init_random(3);
  AdamW<float> sharded(model, AdamWOptions{}, &world(), true);
  const ParamTable& table = model.param_table();
  int64_t mine = 0;
  for (size_t i : sharded.param_indices()) {
    EXPECT_EQ(sharded.owner(i), world().rank());
    mine += table[i].numel();
  }
  const double total = world().all_reduce_scalar(static_cast<double>(mine), ReduceOp::kSum);
  const double largest = world().all_reduce_scalar(static_cast<double>(mine), ReduceOp::kMax);
  EXPECT_EQ(total, static_cast<double>(table.total_numel()));  // every parameter exactly once
  // Balanced: no rank holds much more than its share (plus the largest single tensor).
  EXPECT_LE(largest, total / world().size() + static_cast<double>(table[0].numel()));
}

// ---- training under every grid -------------------------------------------------------------------

class GridTraining : public ::testing::Test {
 protected:
  void SetUp() override {
    // One directory for all ranks (rank 0 makes the files, the others wait).
    dir_ = fs::path(::testing::TempDir()) / ("freqkv_grid_" + std::to_string(getppid()));
    if (world().rank() == 0) {
      fs::remove_all(dir_);
      fs::create_directories(dir_);
      ModelConfig c = small_config();
      write_hf_config(c, (dir_ / "config.json").string());
      std::mt19937 rng(9);
      std::vector<int32_t> tokens;
      for (int i = 0; i < 5000; ++i) tokens.push_back(rng() % 9 == 0 ? rng() % 40 : (i * 5) % 31);
      write_token_file((dir_ / "tokens.bin").string(), tokens, TokenDType::U16);
    }
    world().barrier();
  }
  void TearDown() override {
    world().barrier();
    if (world().rank() == 0) fs::remove_all(dir_);
  }

  TrainConfig config(const std::string& run, std::vector<std::string> extra) const {
    std::vector<std::string> o = {"model.init_config=" + (dir_ / "config.json").string(),
                                  "data.train=[" + (dir_ / "tokens.bin").string() + "]",
                                  "data.seq_len=26",
                                  "data.batch_size=4",
                                  "data.grad_accum=2",
                                  "freqkv.cache=8",
                                  "freqkv.sink=2",
                                  "freqkv.ratio=0.5",
                                  "optimizer.lr=2e-3",
                                  "schedule.steps=6",
                                  "schedule.warmup_steps=2",
                                  "lora.enabled=false",
                                  "checkpoint.every=3",
                                  "checkpoint.keep_last=0",
                                  "logging.run_dir=" + (dir_ / run).string()};
    o.insert(o.end(), extra.begin(), extra.end());
    return load_train_config("", o);
  }

  std::vector<double> losses(const std::string& run) const {
    std::vector<double> out;
    std::ifstream in(dir_ / run / "metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j.contains("loss")) out.push_back(j["loss"].get<double>());
    }
    return out;
  }

  fs::path dir_;
};

TEST_F(GridTraining, EveryGridGivesTheSameLossCurveAndCheckpointsReshard) {
  const int n = world().size();
  // The single-rank run, on rank 0 alone.
  if (world().rank() == 0) {
    CpuKernels<float> k;
    TrainingRun<float>(config("single", {}), k).run();
  }
  world().barrier();
  const std::vector<double> reference = losses("single");
  EXPECT_EQ(reference.size(), 6u);

  std::vector<GridShape> shapes = {{1, n, 1}, {1, 1, n}, {n, 1, 1}};
  if (n == 4) shapes.insert(shapes.end(), {{1, 2, 2}, {2, 2, 1}, {2, 1, 2}});
  for (const GridShape& shape : shapes) {
    // The defaults (ZeRO-1, gradients reduced over sp × dp during the backward); and, where
    // several ranks share a gradient, ZeRO-1 off, reduction after the backward over sp then dp,
    // with activation recomputation.
    for (const bool defaults : {true, false}) {
    if (!defaults && shape.sp * shape.dp == 1) continue;
    const std::string run = "tp" + std::to_string(shape.tp) + "_sp" + std::to_string(shape.sp) +
                            "_dp" + std::to_string(shape.dp) + (defaults ? "" : "_variant");
    {
      ParallelGrid grid(std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world"), shape);
      CpuKernels<float> k;
      const std::vector<std::string> variant = {"parallel.zero1=false",
                                                "parallel.overlap_grad_reduce=false",
                                                "recompute=true"};
      TrainingRun<float>(config(run, defaults ? std::vector<std::string>{} : variant), k,
                         TrainGroups{&grid.world(), &grid.tp(), &grid.sp(), &grid.dp(),
                                     defaults ? &grid.replicas() : nullptr})
          .run();
    }
    world().barrier();
    const std::vector<double> got = losses(run);
    ASSERT_EQ(got.size(), reference.size()) << run;
    for (size_t s = 0; s < got.size(); ++s)
      EXPECT_NEAR(got[s], reference[s], 2e-5 * std::abs(reference[s])) << run << " step " << s + 1;
    }
  }

  // Reshard: one step at a time under tp = n (ZeRO-1 off), dp = n (ZeRO-1 on: sharded
  // optimiser state), one rank, sp = n, then tp = 2 x dp = 2 or tp = n again; each resumes the
  // checkpoint the previous grid wrote.
  const std::string run = "reshard";
  const std::vector<std::pair<GridShape, int64_t>> legs = {
      {{n, 1, 1}, 2}, {{1, 1, n}, 3}, {{1, 1, 1}, 4}, {{1, n, 1}, 5},
      {n == 4 ? GridShape{2, 1, 2} : GridShape{n, 1, 1}, 6}};
  for (size_t leg = 0; leg < legs.size(); ++leg) {
    const auto& [shape, stop] = legs[leg];
    std::vector<std::string> extra = {std::string("parallel.zero1=") + (leg == 0 ? "false" : "true")};
    if (leg > 0) extra.push_back("checkpoint.resume=latest");
    if (shape.ranks() == 1) {
      if (world().rank() == 0) {
        CpuKernels<float> k;
        TrainingRun<float>(config(run, extra), k).run(stop);
      }
    } else {
      ParallelGrid grid(std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world"), shape);
      CpuKernels<float> k;
      TrainingRun<float>(config(run, extra), k,
                         TrainGroups{&grid.world(), &grid.tp(), &grid.sp(), &grid.dp(),
                                     &grid.replicas()})
          .run(stop);
    }
    world().barrier();
  }
  const std::vector<double> resumed = losses(run);
  ASSERT_EQ(resumed.size(), reference.size());
  for (size_t s = 0; s < resumed.size(); ++s)
    EXPECT_NEAR(resumed[s], reference[s], 2e-5 * std::abs(reference[s])) << "step " << s + 1;
}

}  // namespace
}  // namespace freqkv
