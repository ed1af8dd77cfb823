// The FreqKV decoder against the training forward, in double precision:
//   - at every position t, -log softmax(decoder logits)[target] equals the loss LlamaModel::forward
//     gives the same target when it runs on tokens[0..t] (the training schedule of that prefix),
//     through many compressions, for several (C, S, r), grouped-query attention and LoRA;
//   - the cache never holds more than C rows, and holds exactly the rows of training's chunk;
//   - prefill (chunk-wise, any chunk size) and score equal step-by-step decoding and forward;
//   - FreqKV disabled is plain causal attention, with a cache growing past C;
//   - sequence-parallel models are refused (tensor parallelism: test_decoder_tp.cpp, mpirun);
// and the sampler: deterministic per seed, top-k = 1, tiny top-p and temperature 0 are greedy.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <stdexcept>

#include "comm/communicator.h"
#include "trainer/inference/generation.h"
#include "trainer/inference/sampling.h"
#include "kernels/cpu/cpu_kernels.h"
#include "model/freqkv_decoder.h"
#include "model/llama_model.h"
#include "tests/model_fixtures.h"
#include "tests/test_support.h"

namespace freqkv {
namespace {

ModelConfig tiny_config(int64_t n_kv_heads, int64_t vocab = 13) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = n_kv_heads;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 100.0;  // small theta: positions matter even in a short sequence
  return c;
}

// The loss LlamaModel::forward gives target `target` after tokens[0..t] (only that one scored).
double forward_last_loss(LlamaModel<double>& model, const std::vector<int32_t>& tokens, int64_t t,
                         int32_t target) {
  const std::vector<int32_t> inputs(tokens.begin(), tokens.begin() + t + 1);
  std::vector<int32_t> targets(inputs.size(), -1);
  targets.back() = target;
  const LossSum s = model.forward(inputs.data(), targets.data(), 1, t + 1, 0.0);
  EXPECT_EQ(s.count, 1);
  return s.sum;
}

double negative_log_softmax(const std::vector<double>& logits, int32_t target) {
  double top = logits[0];
  for (double v : logits) top = std::max(top, v);
  double sum = 0;
  for (double v : logits) sum += std::exp(v - top);
  return top + std::log(sum) - logits[static_cast<size_t>(target)];
}

// The cache rows training's chunk holding token t (0-based) attends over.
int64_t expected_cache_rows(int64_t t, const FreqKVConfig& f) {
  if (!f.enabled || t < f.cache) return t + 1;
  return f.sink + f.compressed() + (t - f.cache) % f.step() + 1;
}

struct DecoderCase {
  const char* name;
  int64_t n_kv_heads;
  FreqKVConfig freqkv;
  bool lora;
  int64_t tokens;
};

class DecoderVsForward : public ::testing::TestWithParam<DecoderCase> {};

TEST_P(DecoderVsForward, EveryPositionMatchesTheTrainingForward) {
  const DecoderCase& param = GetParam();
  const ModelConfig config = tiny_config(param.n_kv_heads);
  LoraConfig lora;
  lora.enabled = param.lora;
  lora.rank = 2;
  lora.alpha = 3;
  lora.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"};
  CpuKernels<double> kernels;
  LlamaModel<double> model(config, param.freqkv, kernels, lora);
  init_model(model, 11);
  const std::vector<int32_t> tokens = random_tokens(param.tokens + 1, config.vocab_size, 5);

  FreqKVDecoder<double> decoder(model);
  int64_t compressions_seen = 0;
  for (int64_t t = 0; t < param.tokens; ++t) {
    if (t == 0) decoder.prefill({tokens[0]});
    else decoder.step(tokens[t]);
    const double want = forward_last_loss(model, tokens, t, tokens[t + 1]);
    const double got = negative_log_softmax(decoder.last_logits_double(), tokens[t + 1]);
    EXPECT_NEAR(got, want, 1e-11 * std::max(1.0, std::fabs(want))) << "position " << t;
    EXPECT_EQ(decoder.cache_rows(), expected_cache_rows(t, param.freqkv)) << "position " << t;
    if (param.freqkv.enabled) {
      EXPECT_LE(decoder.cache_rows(), param.freqkv.cache) << "position " << t;
    }
    compressions_seen = decoder.compressions();
  }
  EXPECT_EQ(decoder.tokens_seen(), param.tokens);
  if (param.freqkv.enabled) {
    // The case must exercise the memory recurrence, not just one compression.
    EXPECT_GT(compressions_seen, 3);
    EXPECT_EQ(decoder.peak_cache_rows(), param.freqkv.cache);
  } else {
    EXPECT_EQ(decoder.cache_rows(), param.tokens);  // grows without bound
  }
}

INSTANTIATE_TEST_SUITE_P(
    Schedules, DecoderVsForward,
    ::testing::Values(DecoderCase{"C8_S2_r050", 2, freqkv_config(8, 2, 0.5), false, 34},
                      DecoderCase{"C8_S0_r025", 2, freqkv_config(8, 0, 0.25), false, 40},
                      DecoderCase{"C8_S2_r050_gqa", 1, freqkv_config(8, 2, 0.5), false, 34},
                      DecoderCase{"C8_S0_r025_gqa_lora", 1, freqkv_config(8, 0, 0.25), true, 40},
                      DecoderCase{"C7_S3_r034", 2, freqkv_config(7, 3, 0.34), false, 30},
                      DecoderCase{"full_causal", 1, freqkv_config(8, 2, 0.5, false), true, 24}),
    [](const ::testing::TestParamInfo<DecoderCase>& info) { return info.param.name; });

TEST(FreqKVDecoder, PrefillAndScoreEqualStepByStepAndForward) {
  const ModelConfig config = tiny_config(1);
  const FreqKVConfig f = freqkv_config(8, 2, 0.5);
  CpuKernels<double> kernels;
  LlamaModel<double> model(config, f, kernels);
  init_model(model, 3);
  const int64_t T = 29;
  const std::vector<int32_t> tokens = random_tokens(T + 1, config.vocab_size, 9);
  const std::vector<int32_t> inputs(tokens.begin(), tokens.end() - 1);
  const std::vector<int32_t> targets(tokens.begin() + 1, tokens.end());

  FreqKVDecoder<double> stepwise(model);
  stepwise.prefill({inputs[0]});
  for (int64_t t = 1; t < T; ++t) stepwise.step(inputs[t]);
  const std::vector<double> want_logits = stepwise.last_logits_double();

  // The whole prompt at once, and in pieces of 3 rows (cut inside training's chunks).
  for (int64_t max_chunk : {int64_t{1024}, int64_t{3}}) {
    FreqKVDecoder<double> decoder(model, f, max_chunk);
    decoder.prefill(inputs);
    const std::vector<double> got = decoder.last_logits_double();
    for (size_t v = 0; v < got.size(); ++v)
      EXPECT_NEAR(got[v], want_logits[v], 1e-11) << "max_chunk " << max_chunk << " logit " << v;
    EXPECT_EQ(decoder.cache_rows(), stepwise.cache_rows());
    EXPECT_EQ(decoder.compressions(), stepwise.compressions());

    // score: the per-position losses sum to forward's loss over the whole sequence.
    decoder.reset();
    const std::vector<double> losses = decoder.score(inputs, targets);
    double sum = 0;
    for (double l : losses) sum += l;
    const LossSum s = model.forward(inputs.data(), targets.data(), 1, T, 0.0);
    EXPECT_NEAR(sum, s.sum, 1e-10) << "max_chunk " << max_chunk;
  }

  // Unscored positions report 0, scored ones are unchanged by the others' masking.
  FreqKVDecoder<double> decoder(model);
  const std::vector<double> all = decoder.score(inputs, targets);
  std::vector<int32_t> masked = targets;
  for (size_t i = 0; i < masked.size(); i += 2) masked[i] = -1;
  decoder.reset();
  const std::vector<double> some = decoder.score(inputs, masked);
  for (size_t i = 0; i < masked.size(); ++i)
    EXPECT_NEAR(some[i], i % 2 == 0 ? 0.0 : all[i], 1e-12) << "position " << i;
}

TEST(FreqKVDecoder, ShortSequencesEqualFullAttentionAndResetRestarts) {
  const ModelConfig config = tiny_config(2);
  CpuKernels<double> kernels;
  LlamaModel<double> model(config, freqkv_config(8, 2, 0.5), kernels);
  init_model(model, 4);
  const std::vector<int32_t> tokens = random_tokens(8, config.vocab_size, 2);
  FreqKVDecoder<double> freqkv(model);
  FreqKVDecoder<double> full(model, freqkv_config(8, 2, 0.5, false));
  freqkv.prefill(tokens);  // exactly C tokens: no compression yet
  full.prefill(tokens);
  EXPECT_EQ(freqkv.compressions(), 0);
  const std::vector<double> a = freqkv.last_logits_double(), b = full.last_logits_double();
  for (size_t v = 0; v < a.size(); ++v) EXPECT_NEAR(a[v], b[v], 1e-12);
  // The 9th token compresses first: now the two differ.
  freqkv.step(tokens[0]);
  full.step(tokens[0]);
  EXPECT_EQ(freqkv.compressions(), 1);
  EXPECT_EQ(freqkv.cache_rows(), 2 + 3 + 1);
  EXPECT_EQ(full.cache_rows(), 9);
  double difference = 0;
  const std::vector<double> c = freqkv.last_logits_double(), d = full.last_logits_double();
  for (size_t v = 0; v < c.size(); ++v) difference = std::max(difference, std::fabs(c[v] - d[v]));
  EXPECT_GT(difference, 1e-6);

  // reset(): the same prompt gives the same logits again.
  freqkv.reset();
  EXPECT_EQ(freqkv.cache_rows(), 0);
  freqkv.prefill(tokens);
  const std::vector<double> again = freqkv.last_logits_double();
  for (size_t v = 0; v < a.size(); ++v) EXPECT_EQ(again[v], a[v]);
}

TEST(FreqKVDecoder, RejectsBadTokensAndEmptyPrompts) {
  const ModelConfig config = tiny_config(2);
  CpuKernels<double> kernels;
  LlamaModel<double> model(config, freqkv_config(8, 2, 0.5), kernels);
  FreqKVDecoder<double> decoder(model);
  EXPECT_THROW(decoder.prefill({}), std::invalid_argument);
  EXPECT_THROW(decoder.step(static_cast<int32_t>(config.vocab_size)), std::out_of_range);
  EXPECT_THROW(decoder.step(-1), std::out_of_range);
  EXPECT_THROW(decoder.last_logits_double(), std::logic_error);
  EXPECT_THROW(FreqKVDecoder<double>(model, freqkv_config(8, 8, 0.5)), std::invalid_argument);
}

// A communicator of two ranks that must never be used: the model's constructor only asks for
// the rank and the size, and the decoder must refuse before any collective.
class TwoRankGroup : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 2; }
  std::string name() const override { return "two-rank-stub"; }
  void all_reduce(void*, int64_t, CommDType, ReduceOp) override { unexpected(); }
  void all_gather(const void*, void*, int64_t, CommDType) override { unexpected(); }
  void reduce_scatter(const void*, void*, int64_t, CommDType) override { unexpected(); }
  void broadcast(void*, int64_t, CommDType, int) override { unexpected(); }
  void reduce_to(void*, int64_t, CommDType, int) override { unexpected(); }
  void send(const void*, int64_t, CommDType, int) override { unexpected(); }
  void recv(void*, int64_t, CommDType, int) override { unexpected(); }
  void barrier() override { unexpected(); }
  double all_reduce_scalar(double, ReduceOp) override {
    unexpected();
    return 0;
  }
  std::unique_ptr<Communicator> split(int, int, const std::string&) override {
    unexpected();
    return nullptr;
  }

 private:
  [[noreturn]] static void unexpected() {
    throw std::logic_error("TwoRankGroup: no collective was expected");
  }
};

TEST(FreqKVDecoder, RefusesSequenceParallelModelsAndTakesTensorParallelOnes) {
  const ModelConfig config = tiny_config(2, /*vocab=*/14);  // divisible by tp = 2
  CpuKernels<double> kernels;
  TwoRankGroup group;
  ModelParallel sp;
  sp.sp = &group;
  LlamaModel<double> sp_model(config, freqkv_config(8, 2, 0.5), kernels, LoraConfig(), sp);
  try {
    FreqKVDecoder<double> decoder(sp_model);
    FAIL() << "a sequence-parallel model was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("sequence parallelism"), std::string::npos) << e.what();
  }
  // Tensor parallelism is decoded (tests/test_decoder_tp.cpp runs it under mpirun); building the
  // decoder needs no collective, and its cache holds this rank's half of the kv heads.
  ModelParallel tp;
  tp.tp = &group;
  LlamaModel<double> tp_model(config, freqkv_config(8, 2, 0.5), kernels, LoraConfig(), tp);
  FreqKVDecoder<double> tp_decoder(tp_model);
  LlamaModel<double> model(config, freqkv_config(8, 2, 0.5), kernels);
  FreqKVDecoder<double> decoder(model);
  EXPECT_EQ(tp_decoder.cache_bytes() * 2, decoder.cache_bytes());
  EXPECT_EQ(tp_decoder.tp_size(), 2);
}

TEST(FreqKVDecoder, InferenceModelsNeedNoGradientArena) {
  const ModelConfig config = tiny_config(2);
  CpuKernels<double> kernels;
  LlamaModel<double> model(config, freqkv_config(8, 2, 0.5), kernels);
  init_model(model, 4);
  const std::vector<int32_t> tokens = random_tokens(20, config.vocab_size, 2);
  FreqKVDecoder<double> decoder(model);
  const std::vector<double> before = decoder.score(tokens, tokens);
  EXPECT_EQ(model.release_grads(), model.arena_numel() * static_cast<int64_t>(sizeof(double)));
  EXPECT_EQ(model.release_grads(), 0);  // already gone
  decoder.reset();
  const std::vector<double> after = decoder.score(tokens, tokens);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(after[i], before[i]) << "position " << i;
  // Evaluating with the training forward needs no gradient either.
  std::vector<int32_t> targets(tokens.begin() + 1, tokens.end());
  targets.push_back(-1);
  EXPECT_GT(model.forward(tokens.data(), targets.data(), 1, 20, 0.0).count, 0);
}

// ---- sampling ----------------------------------------------------------------------------------

std::vector<float> random_logits(int64_t n, uint64_t seed, double scale = 2.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<float> logits(static_cast<size_t>(n));
  for (float& v : logits) v = static_cast<float>(normal(rng));
  return logits;
}

SamplingConfig sampling(double temperature, int64_t top_k, double top_p) {
  SamplingConfig c;
  c.greedy = false;
  c.temperature = temperature;
  c.top_k = top_k;
  c.top_p = top_p;
  return c;
}

TEST(Sampling, DeterministicPerSeed) {
  const SamplingConfig config = sampling(1.0, 0, 1.0);
  std::vector<int32_t> first, second, other;
  TokenSampler a(config, 42), b(config, 42), c(config, 43);
  for (int i = 0; i < 200; ++i) {
    const std::vector<float> logits = random_logits(50, static_cast<uint64_t>(i), 0.5);
    first.push_back(a.next(logits));
    second.push_back(b.next(logits));
    other.push_back(c.next(logits));
  }
  EXPECT_EQ(first, second);
  EXPECT_NE(first, other);  // 200 draws over ~50 likely tokens: equal only by a miracle
}

TEST(Sampling, TopKOneTinyTopPAndZeroTemperatureAreGreedy) {
  TokenSampler top_k_one(sampling(1.3, 1, 1.0), 1);
  TokenSampler tiny_top_p(sampling(0.7, 0, 1e-9), 2);
  TokenSampler zero_temperature(sampling(0.0, 0, 1.0), 3);
  SamplingConfig greedy_config;
  TokenSampler greedy(greedy_config, 4);
  for (int i = 0; i < 100; ++i) {
    const std::vector<float> logits = random_logits(64, static_cast<uint64_t>(1000 + i));
    const int32_t best = argmax_token(logits);
    EXPECT_EQ(greedy.next(logits), best);
    EXPECT_EQ(top_k_one.next(logits), best);
    EXPECT_EQ(tiny_top_p.next(logits), best);
    EXPECT_EQ(zero_temperature.next(logits), best);
  }
  // Ties go to the lowest id, in greedy and in top-k alike.
  const std::vector<float> tied = {0.f, 3.f, 1.f, 3.f};
  EXPECT_EQ(argmax_token(tied), 1);
  EXPECT_EQ(TokenSampler(sampling(1.0, 1, 1.0), 0).next(tied), 1);
}

TEST(Sampling, DistributionAppliesTemperatureTopKAndTopP) {
  const std::vector<float> logits = {std::log(0.1f), std::log(0.4f), std::log(0.2f),
                                     std::log(0.3f)};
  // Plain: the softmax, most likely first.
  auto d = sampling_distribution(logits, sampling(1.0, 0, 1.0));
  ASSERT_EQ(d.size(), 4u);
  EXPECT_EQ(d[0].first, 1);
  EXPECT_NEAR(d[0].second, 0.4, 1e-6);
  EXPECT_EQ(d[3].first, 0);
  EXPECT_NEAR(d[3].second, 0.1, 1e-6);
  // top-k 2: tokens 1 and 3, renormalised 0.4/0.7 and 0.3/0.7.
  d = sampling_distribution(logits, sampling(1.0, 2, 1.0));
  ASSERT_EQ(d.size(), 2u);
  EXPECT_NEAR(d[0].second, 4.0 / 7.0, 1e-6);
  EXPECT_NEAR(d[1].second, 3.0 / 7.0, 1e-6);
  // top-p 0.65: 0.4 + 0.3 reaches it, so tokens 1 and 3.
  d = sampling_distribution(logits, sampling(1.0, 0, 0.65));
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[1].first, 3);
  // temperature 0.5 squares the odds: p ∝ p^2.
  d = sampling_distribution(logits, sampling(0.5, 0, 1.0));
  EXPECT_NEAR(d[0].second, 0.16 / 0.30, 1e-6);
  // Draw frequencies follow the distribution (5 sigma of 20000 draws).
  TokenSampler sampler(sampling(1.0, 0, 1.0), 7);
  std::vector<int> counts(4, 0);
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) ++counts[static_cast<size_t>(sampler.next(logits))];
  const double probability[4] = {0.1, 0.4, 0.2, 0.3};
  for (int v = 0; v < 4; ++v) {
    const double sigma = std::sqrt(draws * probability[v] * (1 - probability[v]));
    EXPECT_NEAR(counts[static_cast<size_t>(v)], draws * probability[v], 5 * sigma) << "token " << v;
  }
  EXPECT_THROW(sampling_distribution(logits, sampling(-1.0, 0, 1.0)), std::invalid_argument);
  EXPECT_THROW(sampling_distribution(logits, sampling(1.0, -1, 1.0)), std::invalid_argument);
  EXPECT_THROW(sampling_distribution(logits, sampling(1.0, 0, 0.0)), std::invalid_argument);
}

TEST(Generation, SeededSamplingRepeatsAndTopKOneEqualsGreedy) {
  const ModelConfig config = tiny_config(1);
  CpuKernels<double> kernels;
  LlamaModel<double> model(config, freqkv_config(8, 2, 0.5), kernels);
  init_model(model, 8);
  FreqKVDecoder<double> decoder(model);
  const std::vector<int32_t> prompt = random_tokens(5, config.vocab_size, 1);

  TokenSampler first(sampling(1.0, 0, 0.9), 123), second(sampling(1.0, 0, 0.9), 123);
  GenerationStats stats;
  const std::vector<int32_t> a = generate_tokens(decoder, prompt, 30, first, -1, &stats);
  const std::vector<int32_t> b = generate_tokens(decoder, prompt, 30, second, -1);
  EXPECT_EQ(a, b);
  EXPECT_EQ(stats.generated_tokens, 30);
  EXPECT_EQ(stats.decode_steps, 29);
  EXPECT_LE(stats.peak_cache_rows, 8);
  EXPECT_GT(stats.compressions, 3);  // 5 + 29 tokens through an 8-row cache

  SamplingConfig greedy_config;
  TokenSampler greedy(greedy_config, 0), top_k_one(sampling(1.0, 1, 1.0), 99);
  const std::vector<int32_t> g = generate_tokens(decoder, prompt, 30, greedy, -1);
  EXPECT_EQ(generate_tokens(decoder, prompt, 30, top_k_one, -1), g);

  // Stopping at a token keeps it and stops there.
  TokenSampler again(greedy_config, 0);
  const std::vector<int32_t> stopped = generate_tokens(decoder, prompt, 30, again, g[3], &stats);
  const size_t first_stop = static_cast<size_t>(std::find(g.begin(), g.end(), g[3]) - g.begin());
  EXPECT_EQ(stopped, std::vector<int32_t>(g.begin(), g.begin() + first_stop + 1));
  EXPECT_TRUE(stats.stopped_at_stop_token);
}

}  // namespace
}  // namespace freqkv
