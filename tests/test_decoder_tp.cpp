// The FreqKV decoder on a tensor-parallel model against the single-rank decoder, under mpirun
// (2 and 4 ranks; with 4 also tp = 2 inside a 2 x 2 grid):
//   - the logits after every position (prefill of one token, then step by step through many
//     compressions) equal the single-rank decoder's: double to 1e-11 relative, float to 1e-5,
//     with and without grouped-query attention, with LoRA on column and row layers, with tied
//     embeddings, and with FreqKV off;
//   - prefill of a whole prompt in pieces and score() (vocabulary-parallel losses, the logits
//     never gathered) equal the single-rank ones;
//   - sampled generation takes the same tokens on every rank as on one rank.
// Every rank runs the single-rank reference itself, so only the tensor-parallel run crosses ranks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "comm/mpi_communicator.h"
#include "comm/parallel_grid.h"
#include "kernels/cpu/cpu_kernels.h"
#include "model/freqkv_decoder.h"
#include "model/llama_model.h"
#include "trainer/inference/generation.h"
#include "trainer/inference/sampling.h"
#include "tests/model_fixtures.h"
#include "tests/test_support.h"

namespace freqkv {
namespace {

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// Heads (query and kv), FFN columns and vocabulary divide by 1, 2 and 4.
ModelConfig tp_config(int64_t n_kv_heads, bool tied) {
  ModelConfig c;
  c.vocab_size = 20;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 8;
  c.num_key_value_heads = n_kv_heads;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 100.0;  // positions matter even in a short sequence
  c.tie_word_embeddings = tied;
  return c;
}

LoraConfig lora_config(bool enabled) {
  LoraConfig lora;
  lora.enabled = enabled;
  lora.rank = 2;
  lora.alpha = 3;
  lora.targets = {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"};  // column and row
  return lora;
}

// max |got - want| / max(1, max |want|): the error relative to the logits' scale.
double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double diff = 0, scale = 1;
  for (size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  return diff / scale;
}

struct TpCase {
  const char* name;
  int64_t n_kv_heads;
  FreqKVConfig freqkv;
  bool lora, tied;
  int64_t tokens;
};

// The decoder's logits after every position, fed token by token (prefill of the first).
template <typename T>
std::vector<std::vector<double>> logits_by_position(LlamaModel<T>& model, const FreqKVConfig& f,
                                                    const std::vector<int32_t>& tokens,
                                                    int64_t* compressions) {
  FreqKVDecoder<T> decoder(model, f);
  std::vector<std::vector<double>> out;
  for (size_t t = 0; t < tokens.size(); ++t) {
    if (t == 0) decoder.prefill({tokens[0]});
    else decoder.step(tokens[t]);
    out.push_back(decoder.last_logits_double());
  }
  *compressions = decoder.compressions();
  return out;
}

// One comparison of the tp decoder with the single-rank one on a grid of `tp` x (world / tp).
template <typename T>
void expect_tp_matches_one_rank(const TpCase& c, int tp, double tolerance) {
  const ModelConfig config = tp_config(c.n_kv_heads, c.tied);
  const LoraConfig lora = lora_config(c.lora);
  const std::vector<int32_t> tokens = random_tokens(c.tokens + 1, config.vocab_size, 5);
  const std::vector<int32_t> inputs(tokens.begin(), tokens.end() - 1);
  std::vector<int32_t> targets(tokens.begin() + 1, tokens.end());
  for (size_t i = 0; i < targets.size(); i += 4) targets[i] = -1;  // some rows unscored

  CpuKernels<T> kernels;
  LlamaModel<T> single(config, c.freqkv, kernels, lora);
  init_model(single, 11);
  ParallelGrid grid(std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world"),
                    GridShape{tp, 1, world_size() / tp});
  ModelParallel parallel;
  parallel.tp = &grid.tp();
  LlamaModel<T> sharded(config, c.freqkv, kernels, lora, parallel);
  init_model(sharded, 11);
  // Inference needs no gradients; the arena (this rank's shard) goes.
  ASSERT_EQ(sharded.release_grads(), sharded.arena_numel() * static_cast<int64_t>(sizeof(T)));
  ASSERT_LT(sharded.arena_numel(), single.arena_numel()) << "the weights are split";

  int64_t want_compressions = 0, got_compressions = 0;
  const auto want = logits_by_position(single, c.freqkv, inputs, &want_compressions);
  const auto got = logits_by_position(sharded, c.freqkv, inputs, &got_compressions);
  EXPECT_EQ(got_compressions, want_compressions);
  if (c.freqkv.enabled) {
    EXPECT_GT(want_compressions, 3) << "exercise the memory recurrence";
  }
  double worst = 0;
  for (size_t t = 0; t < want.size(); ++t) {
    const double err = relative_error(got[t], want[t]);
    worst = std::max(worst, err);
    EXPECT_LE(err, tolerance) << c.name << " tp " << tp << " position " << t;
  }

  // A whole prompt in pieces of 3 rows, and score (vocabulary-parallel losses).
  FreqKVDecoder<T> ref(single, c.freqkv, 3), dec(sharded, c.freqkv, 3);
  ref.prefill(inputs);
  dec.prefill(inputs);
  const double prefill_err = relative_error(dec.last_logits_double(), ref.last_logits_double());
  EXPECT_LE(prefill_err, tolerance) << c.name << " tp " << tp << " prefill";
  ref.reset();
  dec.reset();
  const std::vector<double> want_losses = ref.score(inputs, targets);
  const std::vector<double> got_losses = dec.score(inputs, targets);
  double loss_err = 0;
  for (size_t i = 0; i < want_losses.size(); ++i) {
    if (targets[i] < 0) {
      EXPECT_EQ(got_losses[i], 0.0) << "unscored position " << i;
    }
    loss_err = std::max(loss_err, std::fabs(got_losses[i] - want_losses[i]) /
                                      std::max(1.0, std::fabs(want_losses[i])));
  }
  EXPECT_LE(loss_err, tolerance) << c.name << " tp " << tp << " score";
  if (world_rank() == 0)
    std::printf("  %-22s %-6s tp %d: max relative error of logits %.2e (%zu positions, %lld "
                "compressions), prefill %.2e, score %.2e\n",
                c.name, sizeof(T) == 8 ? "double" : "float", tp, worst, want.size(),
                static_cast<long long>(want_compressions), prefill_err, loss_err);
}

const TpCase kCases[] = {
    {"C8_S2_r050", 8, freqkv_config(8, 2, 0.5), false, false, 34},
    {"C8_S2_r050_gqa_lora", 4, freqkv_config(8, 2, 0.5), true, false, 34},
    {"C7_S0_r034_gqa_tied", 4, freqkv_config(7, 0, 0.34), false, true, 30},
    {"C9_S3_r050_lora", 8, freqkv_config(9, 3, 0.5), true, false, 36},
    {"full_causal_gqa_lora", 4, freqkv_config(8, 2, 0.5, false), true, false, 20},
};

// tp = the world, and with 4 ranks also tp = 2 (two tp groups side by side).
std::vector<int> tp_sizes() {
  std::vector<int> sizes = {world_size()};
  if (world_size() == 4) sizes.push_back(2);
  return sizes;
}

TEST(TensorParallelDecoder, LogitsAndLossesMatchOneRankInDouble) {
  for (int tp : tp_sizes())
    for (const TpCase& c : kCases) expect_tp_matches_one_rank<double>(c, tp, 1e-11);
}

TEST(TensorParallelDecoder, LogitsAndLossesMatchOneRankInFloat) {
  for (int tp : tp_sizes())
    for (const TpCase& c : kCases) expect_tp_matches_one_rank<float>(c, tp, 1e-5);
}

TEST(TensorParallelDecoder, SampledGenerationTakesTheSameTokensOnEveryRank) {
  const ModelConfig config = tp_config(4, false);
  const FreqKVConfig f = freqkv_config(8, 2, 0.5);
  CpuKernels<float> kernels;
  LlamaModel<float> single(config, f, kernels, lora_config(true));
  init_model(single, 3);
  ParallelGrid grid(std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world"),
                    GridShape{world_size(), 1, 1});
  ModelParallel parallel;
  parallel.tp = &grid.tp();
  LlamaModel<float> sharded(config, f, kernels, lora_config(true), parallel);
  init_model(sharded, 3);
  SamplingConfig sampling;
  sampling.greedy = false;
  sampling.temperature = 1.5;  // flat: many tokens are likely, so a divergence would show
  const std::vector<int32_t> prompt = random_tokens(11, config.vocab_size, 8);

  FreqKVDecoder<float> ref(single), dec(sharded);
  TokenSampler ref_sampler(sampling, 99), sampler(sampling, 99);
  const std::vector<int32_t> want = generate_tokens(ref, prompt, 40, ref_sampler, -1);
  const std::vector<int32_t> got = generate_tokens(dec, prompt, 40, sampler, -1);
  EXPECT_EQ(got, want);
  EXPECT_GT(dec.compressions(), 3);
  // Every rank holds rank 0's tokens.
  std::vector<int32_t> rank0 = got;
  MPI_Bcast(rank0.data(), static_cast<int>(rank0.size()), MPI_INT32_T, 0, MPI_COMM_WORLD);
  EXPECT_EQ(got, rank0);
}

TEST(TensorParallelDecoder, SequenceParallelModelsAreRefusedWithTheReason) {
  ParallelGrid grid(std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world"),
                    GridShape{1, world_size(), 1});
  CpuKernels<double> kernels;
  ModelParallel parallel;
  parallel.sp = &grid.sp();
  LlamaModel<double> model(tp_config(4, false), freqkv_config(8, 2, 0.5), kernels, LoraConfig(),
                           parallel);
  try {
    FreqKVDecoder<double> decoder(model);
    FAIL() << "a sequence-parallel model was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("one chunk of new tokens at a time"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace freqkv
