// freqkv passkey: passkey retrieval accuracy by prompt length and key depth, decoded greedily
// with the FreqKV cache; a table on stdout, the trials as JSON, a heat map PNG on request.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "comm/mpi_communicator.h"
#include "trainer/inference/generation.h"
#include "trainer/inference/passkey.h"
#include "trainer/inference/progress.h"
#include "trainer/commands.h"
#include "trainer/inference_setup.h"

#ifndef FREQKV_SOURCE_DIR
#define FREQKV_SOURCE_DIR "."
#endif

namespace freqkv {

namespace {

struct PasskeyOptions {
  std::vector<int64_t> lengths;
  std::vector<double> depths;
  int64_t trials = 5, max_new_tokens = 12;
  uint64_t seed = 0;
  bool add_bos = false, verbose = false;
  std::string json_path, png_path, plot_script;
};

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) items.push_back(item);
  return items;
}

std::vector<double> parse_depths(const std::string& text) {
  std::vector<double> depths;
  for (const std::string& item : split_list(text)) {
    size_t used = 0;
    double value = -1;
    try {
      value = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || !(value >= 0.0 && value <= 1.0))
      throw UsageError("--depths: '" + item + "' is not a depth in [0, 1]");
    depths.push_back(value);
  }
  if (depths.empty()) throw UsageError("--depths is empty");
  return depths;
}

// Runs argv (no shell, its stdout sent to stderr) and returns its exit status; -1 if it could
// not be started.
int run_program(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    dup2(STDERR_FILENO, STDOUT_FILENO);  // its messages join ours on stderr: stdout is the table
    execv(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

struct Trial {
  int64_t length = 0, prompt_tokens = 0, trial = 0;
  double depth = 0, token_depth = 0;
  std::string passkey, answer, generated;
  bool correct = false;
};

// Under --tp every rank decodes every prompt with its shard of the model (taking rank 0's
// tokens); only world rank 0 prints and writes the JSON and the PNG.
template <typename T>
int passkey_with(const InferenceSetup& setup, const PasskeyOptions& o, const Tokenizer& tokenizer,
                 const ParallelGrid& grid, Kernels<T>& kernels, Communicator* tp) {
  const bool main_rank = grid.world_rank() == 0;
  // Build every prompt first: a length too short for the prompt fails before any decoding.
  std::vector<Trial> trials;
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t length : o.lengths)
    for (double depth : o.depths)
      for (int64_t t = 0; t < o.trials; ++t) {
        Trial trial;
        trial.length = length;
        trial.depth = depth;
        trial.trial = t;
        trial.passkey = make_passkey(o.seed, length, depth, t);
        PasskeyPrompt prompt;
        try {
          prompt = build_passkey_prompt(tokenizer, length, depth, trial.passkey, o.add_bos);
        } catch (const std::invalid_argument& e) {
          throw UsageError(std::string(e.what()) + " (--lengths)");
        }
        trial.prompt_tokens = static_cast<int64_t>(prompt.tokens.size());
        trial.token_depth = prompt.token_depth;
        trials.push_back(trial);
        prompts.push_back(std::move(prompt.tokens));
      }

  const std::unique_ptr<LlamaModel<T>> model =
      load_inference_model(setup, kernels, tp);
  FreqKVDecoder<T> decoder(*model, setup.freqkv, setup.max_chunk_tokens);
  if (main_rank)
    std::fprintf(stderr, "freqkv passkey: %s, backend %s%s; %s; %s; %zu prompts\n",
                 setup.source().c_str(), kernels.name().c_str(),
                 setup.tp > 1 ? (", tensor parallel over " + std::to_string(setup.tp) + " ranks")
                                    .c_str()
                              : "",
                 describe_attention(setup.freqkv).c_str(), tokenizer.description().c_str(),
                 trials.size());
  SamplingConfig greedy;
  int64_t total_tokens = 0, done_tokens = 0;
  for (const auto& prompt : prompts) total_tokens += static_cast<int64_t>(prompt.size());
  ProgressLine progress("freqkv passkey", total_tokens);
  for (size_t i = 0; i < trials.size(); ++i) {
    Trial& trial = trials[i];
    TokenSampler sampler(greedy, 0);
    const std::vector<int32_t> generated =
        generate_tokens(decoder, prompts[i], o.max_new_tokens, sampler, -1);
    trial.generated = tokenizer.decode(generated);
    trial.answer = first_digit_run(trial.generated);
    trial.correct = trial.answer == trial.passkey;
    done_tokens += static_cast<int64_t>(prompts[i].size());
    if (!main_rank) continue;
    if (o.verbose)
      std::fprintf(stderr, "length %lld depth %.2f trial %lld: key %s, answer '%s'%s\n",
                   static_cast<long long>(trial.length), trial.depth,
                   static_cast<long long>(trial.trial), trial.passkey.c_str(),
                   trial.answer.c_str(), trial.correct ? " (right)" : "");
    else
      progress.update(done_tokens, "length " + std::to_string(trial.length) + " prompt " +
                                       std::to_string(i + 1) + "/" +
                                       std::to_string(trials.size()));
  }
  if (!main_rank) return 0;
  if (!o.verbose) progress.finish();

  // accuracy[length][depth], and the mean prompt length of each row.
  const size_t n_depths = o.depths.size();
  std::vector<std::vector<double>> accuracy(o.lengths.size(), std::vector<double>(n_depths, 0.0));
  std::vector<double> mean_tokens(o.lengths.size(), 0.0);
  for (size_t i = 0; i < trials.size(); ++i) {
    const size_t cell = i / static_cast<size_t>(o.trials);
    const size_t row = cell / n_depths, column = cell % n_depths;
    accuracy[row][column] += trials[i].correct ? 1.0 / static_cast<double>(o.trials) : 0.0;
    mean_tokens[row] += static_cast<double>(trials[i].prompt_tokens) /
                        static_cast<double>(o.trials * static_cast<int64_t>(n_depths));
  }

  std::printf("passkey retrieval accuracy, %lld trial(s) per cell, greedy, %lld new tokens; %s\n\n",
              static_cast<long long>(o.trials), static_cast<long long>(o.max_new_tokens),
              describe_attention(setup.freqkv).c_str());
  std::printf("%8s %8s", "length", "tokens");
  for (double depth : o.depths) {
    char label[32];
    std::snprintf(label, sizeof(label), "depth %g", depth);
    std::printf(" %10s", label);
  }
  std::printf(" %8s\n", "mean");
  double overall = 0;
  for (size_t r = 0; r < o.lengths.size(); ++r) {
    std::printf("%8lld %8.0f", static_cast<long long>(o.lengths[r]), mean_tokens[r]);
    double row_sum = 0;
    for (double a : accuracy[r]) {
      std::printf(" %9.0f%%", 100.0 * a);
      row_sum += a;
    }
    std::printf(" %7.0f%%\n", 100.0 * row_sum / static_cast<double>(n_depths));
    overall += row_sum;
  }
  std::printf("overall: %.1f%% of %zu prompts\n",
              100.0 * overall / static_cast<double>(o.lengths.size() * n_depths), trials.size());

  if (!o.json_path.empty()) {
    nlohmann::json trial_list = nlohmann::json::array();
    for (const Trial& t : trials)
      trial_list.push_back({{"length", t.length},
                            {"prompt_tokens", t.prompt_tokens},
                            {"depth", t.depth},
                            {"token_depth", t.token_depth},
                            {"trial", t.trial},
                            {"passkey", t.passkey},
                            {"generated", t.generated},
                            {"answer", t.answer},
                            {"correct", t.correct}});
    const nlohmann::json out = {{"source", setup.source()},
                                {"backend", kernels.name()},
                                {"attention", describe_attention(setup.freqkv)},
                                {"tokenizer", tokenizer.description()},
                                {"lengths", o.lengths},
                                {"depths", o.depths},
                                {"trials_per_cell", o.trials},
                                {"accuracy", accuracy},
                                {"mean_prompt_tokens", mean_tokens},
                                {"trials", trial_list}};
    std::ofstream file(o.json_path);
    // A model's answer may be any bytes, not UTF-8 (an untrained model, a token ending inside
    // a character): invalid sequences are written as U+FFFD rather than failing the run.
    if (!(file << out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n"))
      throw std::runtime_error("cannot write the passkey results to " + o.json_path);
    std::fprintf(stderr, "freqkv passkey: results written to %s\n", o.json_path.c_str());
  }
  if (!o.png_path.empty()) {
    const int status = run_program(
        {"/usr/bin/python3", o.plot_script, o.json_path, "--out", o.png_path});
    if (status != 0)
      throw std::runtime_error("the heat map script " + o.plot_script + " failed (exit status " +
                               std::to_string(status) + "); the results are in " + o.json_path +
                               " (it needs /usr/bin/python3 with matplotlib)");
    std::fprintf(stderr, "freqkv passkey: heat map written to %s\n", o.png_path.c_str());
  }
  return 0;
}

}  // namespace

int run_passkey(const std::vector<std::string>& args) {
  ArgParser p("passkey",
              "Passkey retrieval (landmark attention / LongLoRA): a 5-digit key hidden at each "
              "depth of filler text of each length, asked for at the end; the model answers "
              "greedily with the FreqKV decoder and is right when the first number it writes is "
              "the key. Prints accuracy by length and depth.");
  add_inference_options(p, true);
  p.option("lengths", "N1,N2,...", "prompt lengths in tokens", "", true);
  p.option("depths", "D1,D2,...", "key depths in [0, 1] (0: start of the filler, 1: its end)",
           "0,0.25,0.5,0.75,1");
  p.option("trials", "N", "prompts (different keys) per length and depth", "5");
  p.option("seed", "S", "seed of the pass keys", "0");
  p.option("max-new-tokens", "N", "tokens generated for the answer", "12");
  p.flag("bos", "begin each prompt with the tokenizer's BOS (LLaMA models expect it)");
  p.flag("verbose", "print every trial's key and answer to stderr");
  p.option("json", "FILE", "write the table and every trial as JSON",
           "the --png path with .json, when --png is given");
  p.option("png", "FILE", "draw the accuracy heat map (launch/plot_passkey.py, matplotlib)");
  p.option("plot-script", "FILE", "the heat map script",
           std::string(FREQKV_SOURCE_DIR) + "/launch/plot_passkey.py");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }
  const InferenceSetup setup = resolve_inference_setup(p);
  const std::unique_ptr<Tokenizer> tokenizer = load_inference_tokenizer(p, setup);
  if (!tokenizer)
    throw UsageError("passkey prompts are text: give --tokenizer DIR|FILE|bytes (the model "
                     "directory holds no tokenizer.json)");
  PasskeyOptions o;
  o.lengths = p.get_int_list("lengths", 1);
  o.depths = parse_depths(p.get("depths"));
  o.trials = p.get_int("trials");
  o.max_new_tokens = p.get_int("max-new-tokens");
  const int64_t seed = p.get_int("seed");
  if (o.trials < 1) throw UsageError("--trials must be >= 1");
  if (o.max_new_tokens < 1) throw UsageError("--max-new-tokens must be >= 1");
  if (seed < 0) throw UsageError("--seed must be >= 0");
  o.seed = static_cast<uint64_t>(seed);
  o.add_bos = p.flag_set("bos");
  if (o.add_bos && tokenizer->bos_id() < 0)
    throw UsageError("--bos: the " + tokenizer->description() + " has no BOS token");
  o.verbose = p.flag_set("verbose");
  o.png_path = p.get("png");
  o.json_path = p.given("json") ? p.get("json")
                : o.png_path.empty()
                    ? ""
                    : std::filesystem::path(o.png_path).replace_extension(".json").string();
  o.plot_script = p.get("plot-script");
  if (!o.png_path.empty() && !std::filesystem::exists(o.plot_script))
    throw UsageError("--png: the heat map script " + o.plot_script +
                     " does not exist (give --plot-script)");
  MpiSession mpi;
  const std::unique_ptr<ParallelGrid> grid = make_inference_grid(setup);
  return with_inference_backend(setup, *grid, [&](auto& kernels, Communicator* tp) {
    return passkey_with(setup, o, *tokenizer, *grid, kernels, tp);
  });
}

}  // namespace freqkv
