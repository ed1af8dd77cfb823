// freqkv generate: text (or token ids) from a model with the FreqKV cache, greedy or sampled.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "comm/mpi_communicator.h"
#include "trainer/inference/generation.h"
#include "trainer/commands.h"
#include "trainer/inference_setup.h"

namespace freqkv {

namespace {

struct GenerateOptions {
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 128;
  SamplingConfig sampling;
  uint64_t seed = 0;
  bool stop_at_eos = false, print_ids = false;
};

// Token ids separated by whitespace or commas, as --print-ids prints them.
std::vector<int32_t> read_prompt_ids(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read prompt token file " + path);
  std::stringstream whole;
  whole << in.rdbuf();
  std::string text = whole.str();
  for (char& c : text)
    if (c == ',') c = ' ';
  std::istringstream items(text);
  std::vector<int32_t> ids;
  std::string item;
  while (items >> item) {
    size_t used = 0;
    long long value = -1;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || value < 0 || value > INT32_MAX)
      throw std::runtime_error("prompt token file " + path + ": entry " +
                               std::to_string(ids.size() + 1) + " '" + item +
                               "' is not a token id (a non-negative integer)");
    ids.push_back(static_cast<int32_t>(value));
  }
  if (ids.empty()) throw std::runtime_error("prompt token file " + path + " holds no token ids");
  return ids;
}

// Under --tp every rank decodes its shard of the model and takes the same tokens (rank 0's,
// broadcast); only world rank 0 prints.
template <typename T>
int generate_with(const InferenceSetup& setup, const GenerateOptions& o, const Tokenizer* tokenizer,
                  int32_t eos, const ParallelGrid& grid, Kernels<T>& kernels, Communicator* tp) {
  const bool main_rank = grid.world_rank() == 0;
  const std::unique_ptr<LlamaModel<T>> model =
      load_inference_model(setup, kernels, tp);
  FreqKVDecoder<T> decoder(*model, setup.freqkv, setup.max_chunk_tokens);
  TokenSampler sampler(o.sampling, o.seed);
  if (main_rank)
    std::fprintf(stderr, "freqkv generate: %s, backend %s%s; %s; %s, seed %llu\n",
                 setup.source().c_str(), kernels.name().c_str(),
                 setup.tp > 1 ? (", tensor parallel over " + std::to_string(setup.tp) + " ranks")
                                    .c_str()
                              : "",
                 describe_attention(setup.freqkv).c_str(), o.sampling.describe().c_str(),
                 static_cast<unsigned long long>(o.seed));

  // Text is printed as it is generated: the decoded text of all tokens so far, minus what was
  // printed (a token may end inside a UTF-8 character; the next one completes it).
  std::vector<int32_t> so_far;
  std::string printed;
  const auto print_token = [&](int32_t token) {
    if (!main_rank) return;
    so_far.push_back(token);
    if (o.print_ids) {
      std::printf("%s%d", so_far.size() > 1 ? " " : "", token);
    } else {
      const std::string text = tokenizer->decode(so_far);
      if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0) {
        std::fwrite(text.data() + printed.size(), 1, text.size() - printed.size(), stdout);
        printed = text;
      }
    }
    std::fflush(stdout);
  };
  GenerationStats stats;
  generate_tokens(decoder, o.prompt, o.max_new_tokens, sampler, o.stop_at_eos ? eos : -1, &stats,
                  print_token);
  if (!main_rank) return 0;
  std::printf("\n");
  std::fflush(stdout);

  const auto rate = [](double n, double seconds) { return seconds > 0 ? n / seconds : 0.0; };
  std::fprintf(stderr,
               "freqkv generate: prompt %lld tokens in %.3f s (%.1f tokens/s); %lld tokens "
               "generated%s, %lld decode steps in %.3f s (%.1f tokens/s)\n",
               static_cast<long long>(stats.prompt_tokens), stats.prefill_seconds,
               rate(static_cast<double>(stats.prompt_tokens), stats.prefill_seconds),
               static_cast<long long>(stats.generated_tokens),
               stats.stopped_at_stop_token ? " (stopped at EOS)" : "",
               static_cast<long long>(stats.decode_steps), stats.decode_seconds,
               rate(static_cast<double>(stats.decode_steps), stats.decode_seconds));
  std::fprintf(stderr,
               "freqkv generate: cache %lld rows at the end, peak %lld%s; compressions: %lld; "
               "%.1f MiB of cache%s\n",
               static_cast<long long>(stats.final_cache_rows),
               static_cast<long long>(stats.peak_cache_rows),
               setup.freqkv.enabled ? (" (bound C = " + std::to_string(setup.freqkv.cache) + ")").c_str()
                                    : " (no bound: FreqKV off)",
               static_cast<long long>(stats.compressions),
               static_cast<double>(decoder.cache_bytes()) / (1024.0 * 1024.0),
               setup.tp > 1 ? " per rank (its heads)" : "");
  return 0;
}

}  // namespace

int run_generate(const std::vector<std::string>& args) {
  ArgParser p("generate",
              "Continues a prompt with the FreqKV decoder (the training schedule, token by token) "
              "and prints the continuation to stdout; statistics go to stderr.");
  add_inference_options(p, true);
  p.option("prompt", "TEXT", "the prompt text (encoded with the tokenizer)");
  p.option("prompt-tokens", "FILE", "the prompt as token ids separated by spaces or commas");
  p.flag("bos", "begin the --prompt text with the tokenizer's BOS (LLaMA models expect it)");
  p.option("max-new-tokens", "N", "tokens to generate at most", "128");
  p.flag("greedy", "always the most likely token (the default when no sampling option is given)");
  p.option("temperature", "X", "sample from softmax(logits / X) (0: greedy)", "1 when sampling");
  p.option("top-k", "K", "sample among the K most likely tokens (0: all)", "0");
  p.option("top-p", "P", "sample within the smallest set of probability >= P (1: all)", "1");
  p.option("seed", "S", "random seed of the sampler (same seed, same output)", "0");
  p.flag("stop-at-eos", "stop after the end-of-sequence token");
  p.flag("print-ids", "print token ids instead of text");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }
  const InferenceSetup setup = resolve_inference_setup(p);
  const std::unique_ptr<Tokenizer> tokenizer = load_inference_tokenizer(p, setup);

  GenerateOptions o;
  if (p.given("prompt") == p.given("prompt-tokens"))
    throw UsageError("give exactly one of --prompt TEXT and --prompt-tokens FILE");
  if (p.given("prompt")) {
    if (!tokenizer)
      throw UsageError("--prompt needs a tokenizer: give --tokenizer DIR|FILE|bytes (the model "
                       "directory holds no tokenizer.json)");
    if (p.flag_set("bos") && tokenizer->bos_id() < 0)
      throw UsageError("--bos: the " + tokenizer->description() + " has no BOS token");
    o.prompt = tokenizer->encode(p.get("prompt"), p.flag_set("bos"));
    if (o.prompt.empty()) throw UsageError("--prompt is empty: give some text (or --bos)");
  } else {
    if (p.flag_set("bos")) throw UsageError("--bos applies to --prompt text, not to token ids");
    o.prompt = read_prompt_ids(p.get("prompt-tokens"));
  }
  o.print_ids = p.flag_set("print-ids");
  if (!o.print_ids && !tokenizer)
    throw UsageError("printing text needs a tokenizer: give --tokenizer DIR|FILE|bytes, or "
                     "--print-ids");
  o.max_new_tokens = p.get_int("max-new-tokens");
  if (o.max_new_tokens < 0) throw UsageError("--max-new-tokens must be >= 0");
  const bool sampling = p.given("temperature") || p.given("top-k") || p.given("top-p");
  if (sampling && p.flag_set("greedy"))
    throw UsageError("--greedy excludes --temperature/--top-k/--top-p");
  o.sampling.greedy = !sampling;
  if (sampling) {
    o.sampling.temperature = p.given("temperature") ? p.get_double("temperature") : 1.0;
    o.sampling.top_k = p.given("top-k") ? p.get_int("top-k") : 0;
    o.sampling.top_p = p.given("top-p") ? p.get_double("top-p") : 1.0;
    try {
      o.sampling.validate();
    } catch (const std::invalid_argument& e) {
      throw UsageError(e.what());
    }
  }
  const int64_t seed = p.get_int("seed");
  if (seed < 0) throw UsageError("--seed must be >= 0");
  o.seed = static_cast<uint64_t>(seed);
  o.stop_at_eos = p.flag_set("stop-at-eos");
  const int32_t eos = tokenizer && tokenizer->eos_id() >= 0
                          ? tokenizer->eos_id()
                          : static_cast<int32_t>(setup.config.eos_token_id);
  if (o.stop_at_eos && eos < 0)
    throw UsageError("--stop-at-eos: neither the tokenizer nor the model config names an EOS");
  MpiSession mpi;
  const std::unique_ptr<ParallelGrid> grid = make_inference_grid(setup);
  return with_inference_backend(setup, *grid, [&](auto& kernels, Communicator* tp) {
    return generate_with(setup, o, tokenizer.get(), eos, *grid, kernels, tp);
  });
}

}  // namespace freqkv
