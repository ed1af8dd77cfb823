// The perplexity protocols and the passkey prompts:
//   - a model with all weights zero predicts the uniform distribution: PPL = vocabulary size
//     exactly, under both protocols, in every position bucket;
//   - which windows each protocol takes and which of their positions it scores, by hand, and a
//     "bigram" model (layers switched off, so each loss depends only on the token pair) whose
//     protocol results must equal sums written out here from the protocol's definition;
//   - passkey prompts: the key line once, at the requested depth (± one sentence), the length
//     within a word of the target, for the byte vocabulary and a word-level tokenizer.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <sstream>

#include "trainer/inference/passkey.h"
#include "trainer/inference/perplexity.h"
#include "kernels/cpu/cpu_kernels.h"
#include "model/freqkv_decoder.h"
#include "tests/test_support.h"

namespace freqkv {
namespace {

ModelConfig tiny_config(int64_t vocab) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 100.0;
  return c;
}

FreqKVConfig small_cache() {
  FreqKVConfig f;
  f.cache = 8;
  f.sink = 2;
  f.ratio = 0.5;
  return f;
}

TokenReader reader_of(const std::vector<int32_t>& tokens) {
  return [&tokens](int64_t start, int64_t count, int32_t* out) {
    ASSERT_LE(start + count, static_cast<int64_t>(tokens.size()));
    std::copy(tokens.begin() + start, tokens.begin() + start + count, out);
  };
}

// ---- window arithmetic -------------------------------------------------------------------------

TEST(PerplexityPlan, WindowsAndScoredPositionsByHand) {
  // 20 tokens, windows of 8 every 3: starts 0, 3, 6, 9, 12 (12 + 8 = 20 fits, 15 + 8 does not).
  PerplexityPlan p = plan_perplexity(PerplexityProtocol::kFreqKV, 20, 8, 3, 0);
  EXPECT_EQ(p.window_starts, (std::vector<int64_t>{0, 3, 6, 9, 12}));
  EXPECT_EQ(p.windows_in_file, 5);
  EXPECT_EQ(p.first_scored, 0);  // every one of the 7 predictions
  EXPECT_EQ(p.scored_per_window(), 7);

  // Sliding: the last 3 predictions, input positions 4, 5, 6 (targets 5, 6, 7 of the window).
  p = plan_perplexity(PerplexityProtocol::kSliding, 20, 8, 3, 0);
  EXPECT_EQ(p.window_starts, (std::vector<int64_t>{0, 3, 6, 9, 12}));
  EXPECT_EQ(p.first_scored, 4);
  EXPECT_EQ(p.scored_per_window(), 3);
  // ...so the windows score the file's tokens 5..19 once each, in order.
  std::vector<int64_t> scored_targets;
  for (int64_t s : p.window_starts)
    for (int64_t j = p.first_scored; j < p.seq_len - 1; ++j) scored_targets.push_back(s + j + 1);
  std::vector<int64_t> expected;
  for (int64_t t = 5; t < 20; ++t) expected.push_back(t);
  EXPECT_EQ(scored_targets, expected);

  // max_windows spreads the windows over the file: windows floor(i * 5 / 2) = 0, 2.
  p = plan_perplexity(PerplexityProtocol::kFreqKV, 20, 8, 3, 2);
  EXPECT_EQ(p.window_starts, (std::vector<int64_t>{0, 6}));
  EXPECT_EQ(p.windows_in_file, 5);
  // More windows asked for than exist: all of them.
  EXPECT_EQ(plan_perplexity(PerplexityProtocol::kFreqKV, 20, 8, 3, 50).window_starts.size(), 5u);
  // Exactly one window.
  EXPECT_EQ(plan_perplexity(PerplexityProtocol::kFreqKV, 8, 8, 256, 0).window_starts,
            (std::vector<int64_t>{0}));

  EXPECT_THROW(plan_perplexity(PerplexityProtocol::kFreqKV, 20, 1, 3, 0), std::invalid_argument);
  EXPECT_THROW(plan_perplexity(PerplexityProtocol::kFreqKV, 20, 8, 0, 0), std::invalid_argument);
  EXPECT_THROW(plan_perplexity(PerplexityProtocol::kSliding, 20, 8, 8, 0), std::invalid_argument);
  EXPECT_THROW(plan_perplexity(PerplexityProtocol::kFreqKV, 7, 8, 3, 0), std::invalid_argument);
  EXPECT_THROW(plan_perplexity(PerplexityProtocol::kFreqKV, 20, 8, 3, -1), std::invalid_argument);
  EXPECT_EQ(parse_perplexity_protocol("sliding"), PerplexityProtocol::kSliding);
  EXPECT_THROW(parse_perplexity_protocol("strided"), std::invalid_argument);
}

TEST(PerplexityPlan, BucketsSplitThePredictionsEvenly) {
  // A window of 9 tokens has 8 predictions; 3 buckets: [0, 3), [3, 6), [6, 8).
  EXPECT_EQ(bucket_positions(0, 9, 3), (std::pair<int64_t, int64_t>{0, 3}));
  EXPECT_EQ(bucket_positions(1, 9, 3), (std::pair<int64_t, int64_t>{3, 6}));
  EXPECT_EQ(bucket_positions(2, 9, 3), (std::pair<int64_t, int64_t>{6, 8}));
  const int64_t expected_bucket[8] = {0, 0, 0, 1, 1, 1, 2, 2};
  for (int64_t j = 0; j < 8; ++j) EXPECT_EQ(position_bucket(j, 9, 3), expected_bucket[j]) << j;
  // Every position falls in the bucket whose range holds it, for many shapes.
  for (int64_t T : {2, 5, 17, 100})
    for (int64_t B = 1; B <= T - 1; ++B)
      for (int64_t j = 0; j < T - 1; ++j) {
        const auto [first, last] = bucket_positions(position_bucket(j, T, B), T, B);
        EXPECT_LE(first, j);
        EXPECT_LT(j, last);
      }
}

// ---- a model with a known answer: all weights zero --------------------------------------------

TEST(PerplexityProtocols, ZeroWeightsGiveThePplOfTheUniformDistribution) {
  // Zero embeddings and norm weights: every hidden state and every logit is 0, so each next-token
  // distribution is uniform and the perplexity is the vocabulary size, whatever the protocol,
  // the position or the compression.
  const int64_t V = 37;
  const ModelConfig config = tiny_config(V);
  CpuKernels<double> kernels;
  LlamaModel<double> model(config, small_cache(), kernels);  // parameters start at zero
  const std::vector<int32_t> tokens = random_tokens(200, V, 3);
  for (PerplexityProtocol protocol : {PerplexityProtocol::kFreqKV, PerplexityProtocol::kSliding})
    for (bool freqkv : {true, false}) {
      FreqKVConfig attention = small_cache();
      attention.enabled = freqkv;
      FreqKVDecoder<double> decoder(model, attention);
      const PerplexityPlan plan = plan_perplexity(protocol, 200, 30, 7, 0);
      int64_t callbacks = 0;
      const PerplexityResult r = evaluate_perplexity(decoder, reader_of(tokens), plan, 4,
                                                     [&](int64_t) { ++callbacks; });
      EXPECT_NEAR(r.ppl(), static_cast<double>(V), 1e-9);
      EXPECT_EQ(r.windows, (200 - 30) / 7 + 1);
      EXPECT_EQ(callbacks, r.windows);
      EXPECT_EQ(r.tokens, r.windows * plan.scored_per_window());
      for (size_t b = 0; b < 4; ++b) {
        if (r.bucket_tokens[b] > 0) {
          EXPECT_NEAR(r.bucket_ppl(b), static_cast<double>(V), 1e-9);
        }
      }
      if (freqkv) {
        EXPECT_LE(r.peak_cache_rows, 8);
        EXPECT_GT(r.compressions_per_window, 3);
      } else {
        EXPECT_EQ(r.peak_cache_rows, 29);
      }
    }
}

// ---- a model with a checkable answer: a bigram model ------------------------------------------

// Every layer's output projections are zero, so attention and MLP add nothing and the logits at
// position j are rmsnorm(E[tokens[j]]) W^T: the loss of a prediction depends only on the token
// pair, and a protocol's result is a sum over the pairs it scores, computed here by hand.
struct BigramModel {
  ModelConfig config = tiny_config(11);
  CpuKernels<double> kernels;
  LlamaModel<double> model{config, small_cache(), kernels};
  std::vector<std::vector<double>> loss;  // loss[a][b] = -log p(b | a)

  BigramModel() {
    model.init_random(5, 0.7);
    const ParamTable& table = model.param_table();
    for (size_t i = 0; i < table.size(); ++i) {
      const std::string& name = table[i].name;
      if (name.find("o_proj") != std::string::npos || name.find("down_proj") != std::string::npos) {
        const std::vector<double> zeros(static_cast<size_t>(table[i].numel()), 0.0);
        model.set_param(i, zeros.data());
      }
    }
    // The weights the logits depend on, drawn here and kept, so that the losses below are
    // computed from exactly the model's double-precision values.
    const int64_t V = config.vocab_size, H = config.hidden_size;
    std::mt19937_64 rng(21);
    std::normal_distribution<double> normal(0.0, 0.7);
    std::vector<double> embed(static_cast<size_t>(V * H)), head(static_cast<size_t>(V * H)),
        norm(static_cast<size_t>(H));
    for (double& v : embed) v = normal(rng);
    for (double& v : head) v = normal(rng);
    for (double& v : norm) v = 1.0 + 0.3 * normal(rng);
    model.set_param(static_cast<size_t>(table.find("model.embed_tokens.weight")), embed.data());
    model.set_param(static_cast<size_t>(table.find("lm_head.weight")), head.data());
    model.set_param(static_cast<size_t>(table.find("model.norm.weight")), norm.data());
    loss.assign(static_cast<size_t>(V), std::vector<double>(static_cast<size_t>(V)));
    for (int64_t a = 0; a < V; ++a) {
      double ms = 0;
      for (int64_t h = 0; h < H; ++h) ms += embed[a * H + h] * embed[a * H + h];
      const double r = 1.0 / std::sqrt(ms / static_cast<double>(H) + config.rms_norm_eps);
      std::vector<double> logits(static_cast<size_t>(V), 0.0);
      for (int64_t v = 0; v < V; ++v)
        for (int64_t h = 0; h < H; ++h) logits[v] += embed[a * H + h] * r * norm[h] * head[v * H + h];
      double top = logits[0], sum = 0;
      for (double l : logits) top = std::max(top, l);
      for (double l : logits) sum += std::exp(l - top);
      for (int64_t b = 0; b < V; ++b) loss[a][b] = top + std::log(sum) - logits[b];
    }
  }
};

TEST(PerplexityProtocols, ScoreExactlyThePairsTheirDefinitionsName) {
  BigramModel bigram;
  const int64_t N = 150, T = 24, K = 5, B = 3;
  const std::vector<int32_t> tokens = random_tokens(N, bigram.config.vocab_size, 17);
  FreqKVDecoder<double> decoder(bigram.model);
  const auto pair_loss = [&](int64_t i) {  // -log p(tokens[i + 1] | tokens[i])
    return bigram.loss[static_cast<size_t>(tokens[i])][static_cast<size_t>(tokens[i + 1])];
  };

  // The authors' protocol: windows at 0, 5, 10, ... while s + 24 <= 150, all 23 predictions each,
  // PPL = exp(mean of the windows' mean losses).
  {
    const PerplexityResult r = evaluate_perplexity(
        decoder, reader_of(tokens), plan_perplexity(PerplexityProtocol::kFreqKV, N, T, K, 0), B);
    double mean_of_windows = 0;
    int64_t windows = 0;
    std::vector<double> bucket_sum(B, 0.0);
    for (int64_t s = 0; s + T <= N; s += K, ++windows) {
      double window = 0;
      for (int64_t j = 0; j < T - 1; ++j) {
        window += pair_loss(s + j);
        bucket_sum[static_cast<size_t>(j * B / (T - 1))] += pair_loss(s + j);
      }
      mean_of_windows += window / (T - 1);
    }
    mean_of_windows /= static_cast<double>(windows);
    EXPECT_EQ(r.windows, windows);
    EXPECT_EQ(r.tokens, windows * (T - 1));
    EXPECT_NEAR(r.mean_window_loss, mean_of_windows, 1e-11);
    for (int64_t b = 0; b < B; ++b) EXPECT_NEAR(r.bucket_loss_sum[b], bucket_sum[b], 1e-9) << b;
  }
  // Sliding: the same windows (starts 0, 5, ..., 125), only predictions 18..22 of each, i.e. the
  // pairs (i, i + 1) for i = s + 18 .. s + 22: consecutive windows continue where the previous
  // stopped, so the pairs scored are i = 18 .. 125 + 22 = 147, each once (the last two tokens of
  // the file lie beyond the last window).
  {
    const PerplexityResult r = evaluate_perplexity(
        decoder, reader_of(tokens), plan_perplexity(PerplexityProtocol::kSliding, N, T, K, 0), B);
    double total = 0;
    int64_t scored = 0;
    for (int64_t i = 18; i <= 147; ++i, ++scored) total += pair_loss(i);
    EXPECT_EQ(r.windows, 26);
    EXPECT_EQ(r.tokens, scored);
    EXPECT_NEAR(r.mean_window_loss, total / static_cast<double>(scored), 1e-11);
    // Positions 18..22 of 23 predictions fall in the last of 3 buckets: the others are empty.
    EXPECT_EQ(r.bucket_tokens[0], 0);
    EXPECT_EQ(r.bucket_tokens[1], 0);
    EXPECT_TRUE(std::isnan(r.bucket_ppl(0)));
    EXPECT_EQ(r.bucket_tokens[2], scored);
  }
}

// ---- passkey prompts ---------------------------------------------------------------------------

// One token per whitespace-separated word: a tokenizer whose tokens are much longer than bytes.
class WordTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> encode(const std::string& text, bool add_bos) const override {
    std::vector<int32_t> ids;
    if (add_bos) ids.push_back(0);
    std::istringstream words(text);
    std::string word;
    while (words >> word) ids.push_back(id_of(word));
    return ids;
  }
  int32_t bos_id() const override { return 0; }
  int32_t eos_id() const override { return -1; }
  int64_t vocab_size() const override { return 1 << 20; }
  std::string token_text(int32_t id) const override { return words_.at(id); }
  int32_t token_id(const std::string& text) const override {
    const auto it = ids_.find(text);
    return it == ids_.end() ? -1 : it->second;
  }
  bool is_special(int32_t id) const override { return id == 0; }
  std::string description() const override { return "word-level test tokenizer"; }

 protected:
  std::string decode_ids(const std::vector<int32_t>& ids, bool) const override {
    std::string text;
    for (int32_t id : ids)
      if (id != 0) text += (text.empty() ? "" : " ") + words_.at(id);
    return text;
  }

 private:
  int32_t id_of(const std::string& word) const {
    const auto it = ids_.find(word);
    if (it != ids_.end()) return it->second;
    const int32_t id = static_cast<int32_t>(words_.size()) + 1;
    ids_[word] = id;
    words_[id] = word;
    return id;
  }
  mutable std::map<std::string, int32_t> ids_;
  mutable std::map<int32_t, std::string> words_;
};

int64_t count_occurrences(const std::string& text, const std::string& piece) {
  int64_t n = 0;
  for (size_t at = text.find(piece); at != std::string::npos; at = text.find(piece, at + 1)) ++n;
  return n;
}

TEST(Passkey, PromptHoldsTheKeyOnceAtTheDepthAndFitsTheLength) {
  const std::unique_ptr<Tokenizer> bytes = load_tokenizer("bytes");
  const std::string question = "What is the pass key? The pass key is";
  const int64_t longest_sentence_bytes = 22;  // "There and back again. "
  for (int64_t length : {300, 1000, 4000})
    for (double depth : {0.0, 0.25, 0.5, 0.75, 1.0}) {
      SCOPED_TRACE("length " + std::to_string(length) + " depth " + std::to_string(depth));
      const std::string key = make_passkey(1, length, depth, 0);
      const PasskeyPrompt p = build_passkey_prompt(*bytes, length, depth, key, true);
      // Bytes + BOS: the length is the text's plus one; short of the target by less than a word.
      EXPECT_EQ(static_cast<int64_t>(p.tokens.size()), static_cast<int64_t>(p.text.size()) + 1);
      EXPECT_LE(static_cast<int64_t>(p.tokens.size()), length);
      EXPECT_GE(static_cast<int64_t>(p.tokens.size()), length - 8);
      EXPECT_EQ(p.tokens.front(), bytes->bos_id());

      const std::string line = "The pass key is " + key + ". Remember it. " + key + " is the pass key.";
      EXPECT_EQ(count_occurrences(p.text, line), 1);
      EXPECT_EQ(count_occurrences(p.text, key), 2);
      ASSERT_GE(p.text.size(), question.size());
      EXPECT_EQ(p.text.substr(p.text.size() - question.size()), question);

      // Depth, in bytes of filler before the key line over all filler bytes.
      const int64_t filler_start = static_cast<int64_t>(p.text.find('\n')) + 1;
      const int64_t key_start = static_cast<int64_t>(p.text.find(line));
      const int64_t question_start = static_cast<int64_t>(p.text.size() - question.size());
      const int64_t before = key_start - filler_start;
      const int64_t after = question_start - (key_start + static_cast<int64_t>(line.size()) + 1);
      ASSERT_GE(before, 0);
      ASSERT_GE(after, 0);
      EXPECT_LE(std::fabs(static_cast<double>(before) - depth * (before + after)),
                longest_sentence_bytes + 2.0);
      EXPECT_NEAR(p.token_depth, depth,
                  (longest_sentence_bytes + 2.0) / static_cast<double>(before + after));
      if (depth == 0.0) {
        EXPECT_EQ(before, 0);
      }
      if (depth == 1.0) {
        EXPECT_EQ(after, 0);
      }
    }
}

TEST(Passkey, WordLevelTokenizerAndErrors) {
  WordTokenizer words;
  for (int64_t length : {80, 500})
    for (double depth : {0.0, 0.3, 1.0}) {
      const PasskeyPrompt p = build_passkey_prompt(words, length, depth, "12345", false);
      EXPECT_LE(static_cast<int64_t>(p.tokens.size()), length);
      EXPECT_GE(static_cast<int64_t>(p.tokens.size()), length - 1);  // one word = one token
      EXPECT_NEAR(p.token_depth, depth, 5.0 / static_cast<double>(p.filler_words)) << length;
    }
  const std::unique_ptr<Tokenizer> bytes = load_tokenizer("bytes");
  EXPECT_THROW(build_passkey_prompt(*bytes, 100, 0.5, "12345", false), std::invalid_argument);
  EXPECT_THROW(build_passkey_prompt(*bytes, 1000, 1.5, "12345", false), std::invalid_argument);

  const std::string key = make_passkey(7, 1024, 0.5, 3);
  EXPECT_EQ(key.size(), 5u);
  EXPECT_EQ(key, make_passkey(7, 1024, 0.5, 3));
  EXPECT_NE(key, make_passkey(7, 1024, 0.5, 4));
  EXPECT_EQ(first_digit_run(" 68302. The grass"), "68302");
  EXPECT_EQ(first_digit_run("is 6 8302"), "6");
  EXPECT_EQ(first_digit_run("no digits"), "");
}

}  // namespace
}  // namespace freqkv
